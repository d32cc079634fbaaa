"""What a batch-1 graph with 2-D activations would buy on the CPU (the next lever for the
single request; not served yet).

    OMP_WAIT_POLICY=PASSIVE python bench/b1_graph_probe.py EXPORT [--runs 400]

``EXPORT`` is a ``t2diff export`` directory with its torch checkpoint (``user_tower.pt``).
The served graph has a batch axis, so every activation is ``[B, L + 1, C]`` and ONNX
Runtime leaves each convolution's MatMul and its per-position bias Add as two nodes (it
fuses them into one Gemm only for 2-D inputs).  This traces the same ``FastTower`` with the
reverse process on ``[L + 1, C]`` activations (``FastUNetSteps`` on a ``[L, d]`` history),
batch fixed at 1, and times it against the export's own graph, interleaved call by call
under the service's session options.  Prints the node counts after ORT_ENABLE_ALL, the
largest output difference and p50 / p99 per call.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from contracts.manifest import USER_TOWER_FILE  # noqa: E402
from model.base import Batch, keep_contract_inputs  # noqa: E402
from model.export import OPSET  # noqa: E402
from model.fast_tower import FastTower  # noqa: E402
from worker.tower import load_checkpoint  # noqa: E402


class FastTowerOneSample(FastTower):
    """``FastTower`` for exactly one request: the reverse process without a batch axis."""

    def forward(
        self, item_seq: torch.Tensor, time_lag: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        batch = Batch(item_seq, time_lag)
        x = self.model.item_emb(item_seq)
        assert self.steps is not None
        x_next = self.steps(x[0], noise)[None]
        return keep_contract_inputs(self.model._tower(batch, x, x_next), batch, noise)


def session(path: Path, optimized: Path) -> ort.InferenceSession:
    """The service's options (service.tower), saving the optimised graph to count nodes."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.enable_mem_reuse = False
    options.log_severity_level = 3
    options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("export", type=Path)
    parser.add_argument("--runs", type=int, default=400)
    args = parser.parse_args()
    manifest, model = load_checkpoint(args.export)
    length = int(manifest["max_seq_len"])
    with tempfile.TemporaryDirectory(prefix="b1-probe-") as tmp:
        work = Path(tmp)
        with torch.no_grad():
            tower = FastTowerOneSample(model).eval()
        inputs = (torch.ones(1, length, dtype=torch.int64), torch.zeros(1, length),
                  torch.zeros(model.noise_shape))  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python ints
            torch.onnx.export(tower, inputs, str(work / "b1.onnx"),
                              input_names=["item_seq", "time_lag", "noise"],
                              output_names=["user_embedding"], opset_version=OPSET,
                              dynamo=False)  # fmt: skip
        sessions = {
            "served graph (batch axis)": session(args.export / USER_TOWER_FILE, work / "a.onnx"),
            "batch-1 graph (2-D)": session(work / "b1.onnx", work / "b.onnx"),
        }
        for name, optimized in zip(sessions, ("a.onnx", "b.onnx"), strict=True):
            ops = collections.Counter(n.op_type for n in onnx.load(work / optimized).graph.node)
            print(f"{name:28s} {sum(ops.values())} nodes: {dict(ops.most_common(5))}")
    rng = np.random.default_rng(0)
    feeds = {
        "item_seq": rng.integers(1, int(manifest["num_items"]) + 1, (1, length)),
        "time_lag": (rng.random((1, length)) * 1e5).astype(np.float32),
        "noise": rng.standard_normal(model.noise_shape).astype(np.float32),
    }
    outs = [s.run(None, feeds)[0] for s in sessions.values()]
    print(f"largest output difference {np.abs(outs[0] - outs[1]).max():.2e}")
    times: dict[str, list[float]] = {name: [] for name in sessions}
    items = list(sessions.items())
    for call in range(args.runs):
        for name, s in items if call % 2 == 0 else items[::-1]:
            started = time.perf_counter()
            s.run(None, feeds)
            times[name].append((time.perf_counter() - started) * 1000)
    for name, sample in times.items():
        p50, p99 = np.percentile(sample, [50, 99])
        print(f"{name:28s} B=1 p50 {p50:7.3f}  p99 {p99:7.3f} ms")


if __name__ == "__main__":
    main()
