"""Does the exported (fast) ONNX tower rank like the PyTorch model it came from?

    python bench/check_export_recall.py --run runs/NAME --artifacts artifacts/NAME

Evaluates the test (and validation) split twice with the harness's full-ranking evaluator
and the same reverse-process noise: once with the trained PyTorch model, once with the
export's ``user_tower.onnx`` in ONNX Runtime (the serving graph, fast export included) and
its ``item_embeddings.npy``.  Prints both metric sets, their largest difference and the
largest user-embedding difference; exits 1 when a metric differs by more than
``--tolerance`` (default 0: the same ranks).  ``--split``: the export's two tower parts
(``diffusion`` -> ``xhat`` -> ``attention``, what the service runs when the manifest has
``tower_parts``) instead of the single graph.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from contracts.tower import INPUT_ITEM_SEQ, INPUT_NOISE, INPUT_TIME_LAG  # noqa: E402
from model.base import Batch  # noqa: E402
from model.harness import DeviceSequences, evaluate  # noqa: E402
from model.train import load_run  # noqa: E402


class OnnxTower:
    """The export behind the evaluator's model contract (``full_sort_scores``, ``eval``)."""

    def __init__(self, artifacts: Path, noise_shape: tuple[int, ...], split: bool = False) -> None:
        self.session = ort.InferenceSession(
            str(artifacts / "user_tower.onnx"), providers=["CPUExecutionProvider"]
        )
        self.parts: dict[str, ort.InferenceSession] = {}
        if split:
            manifest = json.loads((artifacts / "manifest.json").read_text())
            self.parts = {
                part: ort.InferenceSession(
                    str(artifacts / name), providers=["CPUExecutionProvider"]
                )
                for part, name in manifest["tower_parts"].items()
            }
        items = np.load(artifacts / "item_embeddings.npy", allow_pickle=False)
        # Token 0 is padding: a zero row, so token t scores row t - 1 of the export.
        self.items = torch.from_numpy(
            np.vstack([np.zeros((1, items.shape[1]), items.dtype), items])
        )
        self.noise_shape = noise_shape
        self.max_embedding_diff = 0.0
        self.reference: torch.nn.Module | None = None

    def eval(self) -> OnnxTower:
        return self

    def user_embedding(self, batch: Batch, noise: torch.Tensor) -> torch.Tensor:
        if self.parts:
            item_seq = batch.item_seq.cpu().numpy()
            (xhat,) = self.parts["diffusion"].run(
                None, {INPUT_ITEM_SEQ: item_seq, INPUT_NOISE: noise.cpu().numpy()}
            )
            (out,) = self.parts["attention"].run(
                None,
                {
                    INPUT_ITEM_SEQ: item_seq,
                    INPUT_TIME_LAG: batch.time_lag.cpu().numpy(),
                    "xhat": xhat,
                },
            )
        else:
            (out,) = self.session.run(
                None,
                {
                    INPUT_ITEM_SEQ: batch.item_seq.cpu().numpy(),
                    INPUT_TIME_LAG: batch.time_lag.cpu().numpy(),
                    INPUT_NOISE: noise.cpu().numpy(),
                },
            )
        user = torch.from_numpy(out)
        if self.reference is not None:
            with torch.no_grad():
                expected = self.reference.user_embedding(batch, noise)  # type: ignore[operator]
            diff = float((user - expected).abs().max())
            self.max_embedding_diff = max(self.max_embedding_diff, diff)
        return user

    def full_sort_scores(self, batch: Batch, noise: torch.Tensor) -> torch.Tensor:
        return self.user_embedding(batch, noise) @ self.items.T


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--tolerance", type=float, default=0.0)
    parser.add_argument("--split", action="store_true", help="the two tower parts")
    args = parser.parse_args(argv)
    run = load_run(args.run, "cpu")
    max_len = int(run.meta["model_config"]["max_seq_len"])
    sequences = DeviceSequences.from_data(run.data, "cpu")
    onnx_tower = OnnxTower(args.artifacts, tuple(run.model.noise_shape), args.split)
    onnx_tower.reference = run.model
    report: dict[str, dict[str, dict[str, float]]] = {}
    worst = 0.0
    for split, targets in (("valid", run.split.valid_targets), ("test", run.split.test_targets)):
        torch_metrics = evaluate(run.model, sequences, targets, max_len)
        onnx_metrics = evaluate(onnx_tower, sequences, targets, max_len)  # type: ignore[arg-type]
        report[split] = {"torch": torch_metrics, "onnx": onnx_metrics}
        worst = max(worst, *(abs(torch_metrics[k] - onnx_metrics[k]) for k in torch_metrics))
    print(json.dumps(report, indent=1, sort_keys=True))
    print(f"max |metric difference| {worst:.6f}, max |embedding difference| "
          f"{onnx_tower.max_embedding_diff:.2e}")  # fmt: skip
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
