"""Plain contracts shared by every part: artifact manifests and the Redis session layout.

Nothing here imports torch, ONNX Runtime or FAISS, so every part (training, index builder,
service) can depend on it.
"""
