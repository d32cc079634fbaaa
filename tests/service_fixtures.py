"""A tiny but real user-tower export, built without torch, for fast service tests.

The export follows the artifact contract exactly (``contracts.manifest``, ``contracts.tower``):
an ONNX graph with inputs ``item_seq``/``time_lag``/``noise`` and output ``user_embedding``,
the item table, ids, popularity and a checksummed manifest.  Its "model" is a masked mean of
the embeddings of the user's items (plus a tiny time-lag term and ``0 * mean(noise)`` so both
inputs exist and are used), so a user's recall lands in the cluster of their items: tests
can check results for meaning, not just shape.  The real T2Diff export has its own end-to-end
test; this keeps the service tests torch-free and quick.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from contracts.manifest import (
    ITEM_EMBEDDINGS_FILE,
    ITEM_IDS_FILE,
    POPULARITY_FILE,
    USER_TOWER_FILE,
    write_manifest,
)
from contracts.tower import INPUT_ITEM_SEQ, INPUT_NOISE, INPUT_TIME_LAG, OUTPUT_USER_EMBEDDING

TINY_OPSET = 17
TINY_MODEL_VERSION = "tiny-0001"
# Weight of the mean log1p(time lag) added to every dimension: small enough not to reorder
# clusters, large enough that a graph ignoring time_lag would change the output.
TIME_LAG_WEIGHT = 1e-4


def item_id(row: int) -> str:
    # One id contains '|' to exercise the session layout's split-at-first-'|' rule.
    return f"sku|{row}" if row == 7 else f"item-{row}"


def make_item_table(
    num_items: int, dim: int, n_clusters: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Unit-norm item vectors around ``n_clusters`` centres; returns (table, cluster of row)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, dim)).astype(np.float32)
    cluster = np.arange(num_items) % n_clusters
    table = centres[cluster] + 0.25 * rng.standard_normal((num_items, dim)).astype(np.float32)
    table /= np.linalg.norm(table, axis=1, keepdims=True)
    return table.astype(np.float32), cluster


def mean_pool_tower(table: np.ndarray, noise_shape: list[int]) -> onnx.ModelProto:
    """ONNX graph: masked mean of ``table[item_seq - 1]`` + w * mean(log1p(lag)) + 0 * mean(noise)."""
    num_items, dim = table.shape
    # Row 0 of the constant is the padding token's (zero) vector, so Gather takes tokens as-is.
    padded = np.vstack([np.zeros((1, dim), np.float32), table]).astype(np.float32)
    inits = [
        numpy_helper.from_array(padded, "table"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        numpy_helper.from_array(np.array([2], np.int64), "axis2"),
        numpy_helper.from_array(np.array(0, np.int64), "zero_i"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero_f"),
        numpy_helper.from_array(np.array(TIME_LAG_WEIGHT, np.float32), "lag_w"),
    ]
    nodes = [
        helper.make_node("Gather", ["table", INPUT_ITEM_SEQ], ["emb"], axis=0),  # [B,L,d]
        helper.make_node("Greater", [INPUT_ITEM_SEQ, "zero_i"], ["mask_b"]),
        helper.make_node("Cast", ["mask_b"], ["mask"], to=TensorProto.FLOAT),  # [B,L]
        helper.make_node("Unsqueeze", ["mask", "axis2"], ["mask3"]),  # [B,L,1]
        helper.make_node("Mul", ["emb", "mask3"], ["emb_m"]),
        helper.make_node("ReduceSum", ["emb_m", "axis1"], ["total"], keepdims=0),  # [B,d]
        helper.make_node("ReduceSum", ["mask", "axis1"], ["count0"], keepdims=1),  # [B,1]
        helper.make_node("Max", ["count0", "one"], ["count"]),
        helper.make_node("Div", ["total", "count"], ["mean"]),
        # Time term: w * sum(log(1 + lag) * mask) / count, broadcast over d.
        helper.make_node("Add", [INPUT_TIME_LAG, "one"], ["lag1"]),
        helper.make_node("Log", ["lag1"], ["loglag"]),
        helper.make_node("Mul", ["loglag", "mask"], ["loglag_m"]),
        helper.make_node("ReduceSum", ["loglag_m", "axis1"], ["lag_sum"], keepdims=1),
        helper.make_node("Div", ["lag_sum", "count"], ["lag_mean"]),
        helper.make_node("Mul", ["lag_mean", "lag_w"], ["lag_term"]),
        helper.make_node("Add", ["mean", "lag_term"], ["with_lag"]),
        # Noise term: 0 * mean(noise); keeps the input in the graph like the real tower's.
        helper.make_node("ReduceMean", [INPUT_NOISE], ["noise_mean"], keepdims=0),
        helper.make_node("Mul", ["noise_mean", "zero_f"], ["noise_term"]),
        helper.make_node("Add", ["with_lag", "noise_term"], [OUTPUT_USER_EMBEDDING]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_mean_pool_tower",
        [
            helper.make_tensor_value_info(INPUT_ITEM_SEQ, TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info(INPUT_TIME_LAG, TensorProto.FLOAT, ["batch", "seq"]),
            helper.make_tensor_value_info(INPUT_NOISE, TensorProto.FLOAT, list(noise_shape)),
        ],
        [helper.make_tensor_value_info(OUTPUT_USER_EMBEDDING, TensorProto.FLOAT, ["batch", dim])],
        initializer=inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", TINY_OPSET)],
        producer_name="t2diff-tests",
    )
    model.ir_version = 8  # what opset 17 needs; old enough for any recent ONNX Runtime
    onnx.checker.check_model(model, full_check=True)
    return model


def build_tiny_export(
    out_dir: Path,
    num_items: int = 500,
    dim: int = 16,
    n_clusters: int = 10,
    max_seq_len: int = 20,
    diffusion_steps: int = 2,
    noise_seed: int = 1234,
    seed: int = 0,
    model_version: str = TINY_MODEL_VERSION,
    with_popularity: bool = True,
) -> Path:
    """Write a contract-conforming user-tower export to ``out_dir``; returns ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table, _ = make_item_table(num_items, dim, n_clusters, seed)
    noise_shape = [diffusion_steps + 1, dim]
    onnx.save(mean_pool_tower(table, noise_shape), out_dir / USER_TOWER_FILE)
    np.save(out_dir / ITEM_EMBEDDINGS_FILE, table)
    (out_dir / ITEM_IDS_FILE).write_text(
        json.dumps([item_id(r) for r in range(num_items)]), encoding="utf-8"
    )
    if with_popularity:
        # Zipf-like counts in a shuffled order, so "most popular" is not simply "first rows".
        rng = np.random.default_rng(seed + 1)
        counts = np.floor(1000.0 / np.arange(1, num_items + 1))
        np.save(out_dir / POPULARITY_FILE, rng.permutation(counts).astype(np.float64))
    write_manifest(
        out_dir,
        {
            "kind": "user_tower",
            "model_name": "tiny-mean-pool",
            "model_version": model_version,
            "embedding_dim": dim,
            "max_seq_len": max_seq_len,
            "num_items": num_items,
            "diffusion_steps": diffusion_steps,
            "noise_shape": noise_shape,
            "noise_seed": noise_seed,
            "opset": TINY_OPSET,
            "training_metrics": {},
        },
    )
    return out_dir


def build_tiny_index(artifacts_dir: Path, out_dir: Path) -> Path:
    """Build the FAISS index of an export with the project's own builder; returns its dir."""
    from index_builder.build import build_from_artifacts

    out_dir = Path(out_dir)
    build_from_artifacts(Path(artifacts_dir), out_dir)
    return out_dir


# --------------------------------------------------------------------------- versions


def build_version(
    root: Path, model_version: str, seed: int = 0, index_version: str | None = None
) -> tuple[Path, Path]:
    """``root/artifacts/VERSION`` and ``root/indexes/INDEX_VERSION`` (default: VERSION) of
    one tiny model version."""
    artifacts = build_tiny_export(
        Path(root) / "artifacts" / model_version, model_version=model_version, seed=seed
    )
    index_dir = Path(root) / "indexes" / (index_version or model_version)
    return artifacts, build_tiny_index(artifacts, index_dir)


def point_link(link: Path, version: str) -> None:
    """Atomically (re)point the relative symlink ``link`` at its sibling ``version``, the
    way a promotion does: a new link beside it, then ``rename`` over the old one."""
    link = Path(link)
    tmp = link.with_name(f".{link.name}.tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(version)
    tmp.replace(link)
