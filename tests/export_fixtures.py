"""Tiny T2Diff exports shaped like ``t2diff export`` writes them, and two-version deployments.

Shared by the split-tower, xhat-warm and tower-worker tests, which each need a real export
(ONNX graphs, items, manifest; optionally the two parts and the torch checkpoint) of a small
model without a training run.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from service_fixtures import build_tiny_index, point_link

from contracts import manifest as mf
from model.export import (
    OPSET,
    export_diffusion_one_onnx,
    export_onnx,
    export_split_onnx,
    save_torch_tower,
)
from model.t2diff import T2Diff


def export_tiny_t2diff(
    out_dir: Path,
    model: T2Diff,
    version: str,
    *,
    noise_seed: int,
    item_name: Callable[[int], str],
    split: bool = False,
    torch_tower: bool = False,
) -> Path:
    """Single graph, optionally the two parts and the one-request diffusion part (``split``)
    and the worker's checkpoint
    (``torch_tower``), items named ``item_name(row)``, manifest."""
    out_dir.mkdir(parents=True)
    length, n_items = model.config.max_seq_len, model.n_items
    export_onnx(model, out_dir / mf.USER_TOWER_FILE, length)
    parts = export_split_onnx(model, out_dir, length) if split else None
    one = export_diffusion_one_onnx(model, out_dir, length) if split else None
    if torch_tower:
        meta = {"model_name": "t2diff", "model_config": asdict(model.config)}
        save_torch_tower(model, meta, out_dir / mf.TORCH_TOWER_FILE, np.ones(n_items + 1))
    with torch.no_grad():
        table = model.item_embeddings()[1:].float().numpy()
    np.save(out_dir / mf.ITEM_EMBEDDINGS_FILE, np.ascontiguousarray(table))
    (out_dir / mf.ITEM_IDS_FILE).write_text(json.dumps([item_name(r) for r in range(n_items)]))
    np.save(out_dir / mf.POPULARITY_FILE, np.arange(n_items, 0, -1).astype(np.float64))
    fields = {
        "kind": "user_tower",
        "model_name": "t2diff",
        "model_version": version,
        "embedding_dim": model.config.dim,
        "max_seq_len": length,
        "num_items": n_items,
        "diffusion_steps": model.config.diffusion_steps,
        "noise_shape": list(model.noise_shape),
        "noise_seed": noise_seed,
        "opset": OPSET,
        **({mf.TOWER_PARTS_FIELD: parts} if parts else {}),
        **({mf.TOWER_DIFFUSION_ONE_FIELD: one} if one else {}),
        **({mf.TORCH_TOWER_FIELD: mf.TORCH_TOWER_FILE} if torch_tower else {}),
    }
    mf.write_manifest(out_dir, fields)
    return out_dir


def deploy_versions(
    root: Path, export: Callable[[Path, str], Path], versions: tuple[str, ...]
) -> Path:
    """``root/artifacts/V`` (by ``export(dir, V)``) and ``root/indexes/V`` for each version."""
    for version in versions:
        build_tiny_index(export(root / "artifacts" / version, version), root / "indexes" / version)
    return root


def point_current(root: Path, version: str) -> None:
    """``root/{indexes,artifacts}/current`` -> ``version`` (index first, as a promotion)."""
    for kind in ("indexes", "artifacts"):
        point_link(root / kind / "current", version)
