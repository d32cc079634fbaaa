"""Export a trained run as a versioned user-tower artifact (ONNX + item embeddings).

The user tower, with its fixed T-step reverse process unrolled, becomes one ONNX graph
following ``contracts.tower``.  A T2Diff tower is exported through ``model.fast_tower``
(the same function re-expressed for inference: channels-last U-Net on MatMuls, per-step
constants folded); ``fast=False`` traces the training module as it is.  The directory gets ``manifest.json`` with checksums of every
file, so the index builder and the service refuse a corrupted or half-copied export.

The trained model also goes in as a torch checkpoint (``user_tower.pt``, manifest field
``torch_tower``: see :func:`save_torch_tower`), so that a GPU tower worker
(``worker.server``) can run the fused kernel on exactly this version.

A T2Diff with diffusion is also exported as two parts (``contracts.tower``): the reverse
process (``item_seq``, ``noise`` -> ``xhat``) and the attention that takes ``xhat``.  The
reverse process reads no time lag, so the service can cache ``xhat`` per session; the single
graph stays for every other consumer.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from contracts import manifest as mf
from contracts.tower import (
    INPUT_ITEM_SEQ,
    INPUT_NOISE,
    INPUT_TIME_LAG,
    OUTPUT_USER_EMBEDDING,
    PART_ATTENTION,
    PART_DIFFUSION,
    XHAT,
)
from model.base import ExportedTower, SequentialRecommender
from model.fast_tower import FastAttentionPart, FastDiffusionPart, FastTower
from model.t2diff import T2Diff
from model.train import load_run

OPSET = 17


def export_onnx(
    model: SequentialRecommender, path: Path, max_seq_len: int, *, fast: bool = True
) -> None:
    """Trace ``model``'s user tower (batch axis dynamic) into ``path``.

    ``fast``: a T2Diff goes through ``FastTower`` (same answer, far fewer FLOPs and nodes).
    """
    model = model.cpu().eval()
    # eval() on the wrapper too: the exporter restores the wrapper's mode on every submodule.
    with torch.no_grad():
        if fast and isinstance(model, T2Diff):
            tower: torch.nn.Module = FastTower(model).eval()
        else:
            tower = ExportedTower(model).eval()
    item_seq = torch.ones(2, max_seq_len, dtype=torch.int64)
    time_lag = torch.zeros(2, max_seq_len, dtype=torch.float32)
    noise = torch.zeros(model.noise_shape, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python ints are expected
        torch.onnx.export(
            tower,
            (item_seq, time_lag, noise),
            str(path),
            input_names=[INPUT_ITEM_SEQ, INPUT_TIME_LAG, INPUT_NOISE],
            output_names=[OUTPUT_USER_EMBEDDING],
            dynamic_axes={
                INPUT_ITEM_SEQ: {0: "batch"},
                INPUT_TIME_LAG: {0: "batch"},
                OUTPUT_USER_EMBEDDING: {0: "batch"},
            },
            opset_version=OPSET,
            dynamo=False,
        )


def can_split(model: SequentialRecommender) -> bool:
    """Whether ``model``'s tower has a reverse process to export as its own part."""
    return isinstance(model, T2Diff) and bool(model.config.use_diffusion)


def export_split_onnx(model: T2Diff, out_dir: Path, max_seq_len: int) -> dict[str, str]:
    """Write the ``diffusion`` and ``attention`` parts into ``out_dir``; {part: file name}."""
    model = model.cpu().eval()
    with torch.no_grad():
        diffusion = FastDiffusionPart(model).eval()
        attention = FastAttentionPart(model).eval()
    item_seq = torch.ones(2, max_seq_len, dtype=torch.int64)
    time_lag = torch.zeros(2, max_seq_len, dtype=torch.float32)
    noise = torch.zeros(model.noise_shape, dtype=torch.float32)
    xhat = torch.zeros(2, model.config.dim, dtype=torch.float32)
    batch_axis = {0: "batch"}
    _export_diffusion(diffusion, item_seq, noise, out_dir / mf.TOWER_DIFFUSION_FILE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python ints are expected
        torch.onnx.export(
            attention,
            (item_seq, time_lag, xhat),
            str(out_dir / mf.TOWER_ATTENTION_FILE),
            input_names=[INPUT_ITEM_SEQ, INPUT_TIME_LAG, XHAT],
            output_names=[OUTPUT_USER_EMBEDDING],
            dynamic_axes={
                INPUT_ITEM_SEQ: batch_axis,
                INPUT_TIME_LAG: batch_axis,
                XHAT: batch_axis,
                OUTPUT_USER_EMBEDDING: batch_axis,
            },
            opset_version=OPSET,
            dynamo=False,
        )
    return {PART_DIFFUSION: mf.TOWER_DIFFUSION_FILE, PART_ATTENTION: mf.TOWER_ATTENTION_FILE}


def export_diffusion_one_onnx(model: T2Diff, out_dir: Path, max_seq_len: int) -> str:
    """Write the one-request diffusion part (batch fixed at 1) into ``out_dir``; its file
    name (``contracts.manifest.TOWER_DIFFUSION_ONE_FIELD``)."""
    model = model.cpu().eval()
    with torch.no_grad():
        diffusion = FastDiffusionPart(model, one_sample=True).eval()
    item_seq = torch.ones(1, max_seq_len, dtype=torch.int64)
    noise = torch.zeros(model.noise_shape, dtype=torch.float32)
    _export_diffusion(diffusion, item_seq, noise, out_dir / mf.TOWER_DIFFUSION_ONE_FILE)
    return mf.TOWER_DIFFUSION_ONE_FILE


def _export_diffusion(
    diffusion: FastDiffusionPart, item_seq: torch.Tensor, noise: torch.Tensor, path: Path
) -> None:
    """Trace a diffusion part into ``path``: batch axis dynamic, or fixed at 1 for the
    one-request part (``diffusion.one_sample``)."""
    batch_axis = {0: "batch"}
    dynamic = {} if diffusion.one_sample else {INPUT_ITEM_SEQ: batch_axis, XHAT: batch_axis}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python ints are expected
        torch.onnx.export(
            diffusion,
            (item_seq, noise),
            str(path),
            input_names=[INPUT_ITEM_SEQ, INPUT_NOISE],
            output_names=[XHAT],
            dynamic_axes=dynamic,
            opset_version=OPSET,
            dynamo=False,
        )


TORCH_TOWER_FORMAT = 1


def save_torch_tower(model: SequentialRecommender, meta: dict[str, Any], path: Path,
                     popularity: np.ndarray) -> None:  # fmt: skip
    """The model as ``model.registry.build_model`` rebuilds it: name, config, item count,
    train popularity (it shapes some models' buffers) and the weights; only tensors and
    plain types, so ``torch.load(weights_only=True)`` reads it (no pickled code)."""
    torch.save(
        {
            "format": TORCH_TOWER_FORMAT,
            "model_name": meta["model_name"],
            "model_config": meta["model_config"],
            "n_items": int(model.n_items),
            "popularity": torch.as_tensor(np.asarray(popularity, dtype=np.float64)),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        },
        path,
    )


def export_run(
    run_dir: Path, out_dir: Path, version: str | None = None, noise_seed: int = 0
) -> dict[str, Any]:
    """Write ``out_dir`` (a new directory) with the ONNX tower, embeddings, ids, manifest."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists; a version is never written over")
    run = load_run(run_dir)
    model, meta = run.model, run.meta
    max_len = int(meta["model_config"]["max_seq_len"])
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        export_onnx(model, staging / mf.USER_TOWER_FILE, max_len)
        parts = export_split_onnx(model, staging, max_len) if can_split(model) else None
        one = export_diffusion_one_onnx(model, staging, max_len) if parts else None
        with torch.no_grad():
            embeddings = model.item_embeddings()[1:].detach().cpu().float().numpy()
        np.save(staging / mf.ITEM_EMBEDDINGS_FILE, np.ascontiguousarray(embeddings))
        (staging / mf.ITEM_IDS_FILE).write_text(json.dumps(meta["item_ids"]))
        np.save(staging / mf.POPULARITY_FILE, run.popularity[1:].astype(np.float64))
        save_torch_tower(model, meta, staging / mf.TORCH_TOWER_FILE, run.popularity)
        metrics_path = run_dir / "metrics.json"
        metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
        fields = {
            "kind": "user_tower",
            "model_name": meta["model_name"],
            "model_version": version or out_dir.name,
            "model_config": meta["model_config"],
            "embedding_dim": int(embeddings.shape[1]),
            "max_seq_len": max_len,
            "num_items": int(embeddings.shape[0]),
            "diffusion_steps": int(meta["model_config"].get("diffusion_steps", 0)),
            "noise_shape": list(model.noise_shape),
            "noise_seed": noise_seed,
            "opset": OPSET,
            **({mf.TOWER_PARTS_FIELD: parts} if parts else {}),
            **({mf.TOWER_DIFFUSION_ONE_FIELD: one} if one else {}),
            mf.TORCH_TOWER_FIELD: mf.TORCH_TOWER_FILE,
            "scoring": "inner_product",
            "training_metrics": metrics.get(meta["model_name"], {}),
            "baseline_metrics": {"popularity": metrics.get("popularity", {})},
            "run_dir": str(run_dir),
            "torch_version": torch.__version__,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        manifest = mf.write_manifest(staging, fields)
        if out_dir.exists():
            out_dir.rmdir()
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest
