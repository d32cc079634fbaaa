"""The fast ONNX export keeps shape arithmetic away from the tensors it computes on.

ONNX Runtime's CUDA EP puts shape subgraphs on the CPU; when one of them feeds a compute
node (as the attention scale ``head_dim ** 0.5`` traced from ``x.shape`` did, through a
``Pow``), ORT inserts a host-to-device copy and refuses CUDA-graph capture
(``docs/results/inference.md``, "GPU (H100)").  Checked on the graph, no GPU needed.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import torch

from model.export import export_onnx
from model.t2diff import T2Diff, T2DiffConfig


def test_fast_export_has_no_traced_attention_scale(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = T2DiffConfig(dim=16, unet_width=8, max_seq_len=12, session_len=4, diffusion_steps=2)
    path = tmp_path / "tower.onnx"
    export_onnx(T2Diff(30, config).eval(), path, config.max_seq_len)
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "Pow" not in ops
    assert "Sqrt" not in ops
