"""Online recall service: Redis sessions -> ONNX user tower -> FAISS item index -> top k.

Serving installs without torch: nothing in this package may import it (directly or via
``model``, except the torch-free ``model.data`` for offline session loading).
"""
