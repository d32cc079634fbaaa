"""The user tower: a model export's ONNX graph run by ONNX Runtime (contract:
``contracts.tower``).

Loading verifies the export (manifest checksums, graph inputs/outputs, item table shapes)
so that a broken or mismatched version is refused at startup, never discovered by a request.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from contracts.manifest import (
    ITEM_EMBEDDINGS_FILE,
    ITEM_IDS_FILE,
    POPULARITY_FILE,
    USER_TOWER_FILE,
    ArtifactError,
    read_manifest,
)
from contracts.sessions import Session
from contracts.tower import (
    INPUT_ITEM_SEQ,
    INPUT_NOISE,
    INPUT_TIME_LAG,
    OUTPUT_USER_EMBEDDING,
    make_noise,
    pad_batch,
)

log = logging.getLogger(__name__)

USER_TOWER_KIND = "user_tower"


def _providers() -> list[str]:
    # CUDA first when this onnxruntime build has it (onnxruntime-gpu), CPU always last as
    # the fallback ORT uses for nodes CUDA cannot run.
    available = ort.get_available_providers()
    wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return [p for p in wanted if p in available] or ["CPUExecutionProvider"]


def _required(manifest: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = manifest.get(name)
    # bool is an int subclass, but `true` is never a valid dimension or seed.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise ArtifactError(f"manifest field {name!r} is missing or not {kind}: {value!r}")
    return value


class UserTowerRunner:
    """One loaded model export: the ONNX session plus the item vocabulary and popularity.

    Thread-safe: ``InferenceSession.run`` may be called from several threads at once, and
    nothing else here is mutated after construction.
    """

    def __init__(self, artifacts_dir: Path, intra_op_threads: int | None = None) -> None:
        self.artifacts_dir = Path(artifacts_dir)
        if not self.artifacts_dir.is_dir():
            raise ArtifactError(f"{self.artifacts_dir}: artifacts directory does not exist")
        self.manifest = read_manifest(self.artifacts_dir)
        manifest = self.manifest
        if manifest.get("kind") != USER_TOWER_KIND:
            raise ArtifactError(
                f"{self.artifacts_dir}: manifest kind is {manifest.get('kind')!r}, "
                f"expected {USER_TOWER_KIND!r}"
            )
        self.model_name: str = str(manifest.get("model_name", "unknown"))
        self.model_version: str = str(_required(manifest, "model_version", (str, int)))
        self.embedding_dim: int = _required(manifest, "embedding_dim", int)
        self.max_seq_len: int = _required(manifest, "max_seq_len", int)
        self.num_items: int = _required(manifest, "num_items", int)
        noise_shape = _required(manifest, "noise_shape", list)
        noise_seed = _required(manifest, "noise_seed", int)
        if not all(isinstance(n, int) and n > 0 for n in noise_shape):
            raise ArtifactError(
                f"manifest noise_shape is not a list of positive ints: {noise_shape}"
            )
        for name in (USER_TOWER_FILE, ITEM_EMBEDDINGS_FILE, ITEM_IDS_FILE):
            if name not in manifest["files"]:
                raise ArtifactError(f"{self.artifacts_dir}: manifest does not list {name}")

        self.item_ids: list[str] = self._load_item_ids()
        # Raw id -> token (row + 1); the only per-request lookup, so a plain dict.
        self.token_of: dict[str, int] = {item: row + 1 for row, item in enumerate(self.item_ids)}
        if len(self.token_of) != self.num_items:
            raise ArtifactError(f"{ITEM_IDS_FILE} holds duplicate item ids")
        self._check_item_table()
        self.popularity: np.ndarray = self._load_popularity()
        # Rows by descending popularity (stable: ties keep row order), for cold starts.
        self.popular_rows: np.ndarray = np.argsort(-self.popularity, kind="stable")
        total = float(self.popularity.sum())
        self.popularity_share: np.ndarray = (
            self.popularity / total if total > 0 else np.full(self.num_items, 1 / self.num_items)
        )

        # The reverse-diffusion noise is part of the model version: drawn once from the
        # manifest's seed so every request (and every replica) gets the same embedding.
        self.noise: np.ndarray = make_noise(noise_shape, noise_seed)
        self.session = self._open_session(intra_op_threads)
        log.info(
            "user tower %s %s loaded: %d items, d=%d, L=%d, providers=%s",
            self.model_name,
            self.model_version,
            self.num_items,
            self.embedding_dim,
            self.max_seq_len,
            self.session.get_providers(),
        )

    # ------------------------------------------------------------------ loading

    def _load_item_ids(self) -> list[str]:
        try:
            raw = json.loads((self.artifacts_dir / ITEM_IDS_FILE).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ArtifactError(f"{ITEM_IDS_FILE}: unreadable ({exc})") from exc
        if (
            not isinstance(raw, list)
            or len(raw) != self.num_items
            or not all(isinstance(item, str) for item in raw)
        ):
            raise ArtifactError(
                f"{ITEM_IDS_FILE} must be a list of num_items={self.num_items} string ids"
            )
        return raw

    def _check_item_table(self) -> None:
        # Only the header is read (mmap): the vectors themselves live in the FAISS index.
        try:
            table = np.load(
                self.artifacts_dir / ITEM_EMBEDDINGS_FILE, mmap_mode="r", allow_pickle=False
            )
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"{ITEM_EMBEDDINGS_FILE}: unreadable ({exc})") from exc
        if table.shape != (self.num_items, self.embedding_dim):
            raise ArtifactError(
                f"{ITEM_EMBEDDINGS_FILE} has shape {table.shape}, manifest says "
                f"({self.num_items}, {self.embedding_dim})"
            )

    def _load_popularity(self) -> np.ndarray:
        path = self.artifacts_dir / POPULARITY_FILE
        if POPULARITY_FILE not in self.manifest["files"]:
            # Optional file: without it every item is equally popular (cold starts then
            # get the first rows, which is at least deterministic).
            return np.ones(self.num_items, dtype=np.float64)
        try:
            popularity = np.load(path, allow_pickle=False).astype(np.float64)
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"{POPULARITY_FILE}: unreadable ({exc})") from exc
        if popularity.shape != (self.num_items,):
            # A common slip is the training-side count with a padding slot (N+1).
            raise ArtifactError(
                f"{POPULARITY_FILE} has shape {popularity.shape}, expected ({self.num_items},)"
            )
        if not np.isfinite(popularity).all() or (popularity < 0).any():
            raise ArtifactError(f"{POPULARITY_FILE} holds negative or non-finite counts")
        return popularity

    def _open_session(self, intra_op_threads: int | None) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Measured on the 2-core box (docs/results/inference.md): one intra-op thread per
        # session, sequential execution and no memory-pattern reuse are fastest for the
        # 50-step tower; parallelism comes from concurrent requests (INFERENCE_CONCURRENCY),
        # not from ORT's thread pool, which spins and doubles the latency under load.
        options.intra_op_num_threads = intra_op_threads if intra_op_threads is not None else 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.enable_mem_reuse = False
        try:
            session = ort.InferenceSession(
                str(self.artifacts_dir / USER_TOWER_FILE), options, providers=_providers()
            )
        except Exception as exc:  # ORT raises its own pybind exception types
            raise ArtifactError(f"{USER_TOWER_FILE}: ONNX Runtime cannot load it ({exc})") from exc
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = {o.name: o for o in session.get_outputs()}
        expected = {
            INPUT_ITEM_SEQ: "tensor(int64)",
            INPUT_TIME_LAG: "tensor(float)",
            INPUT_NOISE: "tensor(float)",
        }
        for name, dtype in expected.items():
            if name not in inputs or inputs[name].type != dtype:
                raise ArtifactError(f"{USER_TOWER_FILE}: needs input {name} of {dtype}")
        if set(inputs) != set(expected):
            raise ArtifactError(f"{USER_TOWER_FILE}: unexpected inputs {sorted(inputs)}")
        if OUTPUT_USER_EMBEDDING not in outputs:
            raise ArtifactError(f"{USER_TOWER_FILE}: no output {OUTPUT_USER_EMBEDDING}")
        noise_dims = inputs[INPUT_NOISE].shape
        if len(noise_dims) != self.noise.ndim or any(
            isinstance(g, int) and g != n for g, n in zip(noise_dims, self.noise.shape, strict=True)
        ):
            raise ArtifactError(
                f"{USER_TOWER_FILE}: noise input has shape {noise_dims}, manifest noise_shape "
                f"is {list(self.noise.shape)}"
            )
        out_dims = outputs[OUTPUT_USER_EMBEDDING].shape
        if len(out_dims) != 2 or (
            isinstance(out_dims[1], int) and out_dims[1] != self.embedding_dim
        ):
            raise ArtifactError(
                f"{USER_TOWER_FILE}: output shape {out_dims}, expected [B, {self.embedding_dim}]"
            )
        return session

    # ------------------------------------------------------------------ inference

    def tokens_and_times(self, session: Session) -> tuple[list[int], list[float]]:
        """The session's known items as tokens, with their timestamps; unknown ids dropped
        (items newer than the export cannot be embedded)."""
        tokens: list[int] = []
        stamps: list[float] = []
        token_of = self.token_of
        for item_id, ts in zip(session.item_ids, session.timestamps, strict=True):
            token = token_of.get(item_id)
            if token is not None:
                tokens.append(token)
                stamps.append(ts)
        return tokens, stamps

    def tokens_for(self, session: Session) -> list[int]:
        """Tokens of the session's known items (row = token - 1), oldest first."""
        return self.tokens_and_times(session)[0]

    def embed(self, sessions: Sequence[Session], now: float) -> np.ndarray:
        """User embeddings ``[B, d]`` float32 for ``sessions`` at request time ``now``."""
        if not sessions:
            return np.zeros((0, self.embedding_dim), dtype=np.float32)
        pairs = [self.tokens_and_times(s) for s in sessions]
        return self.embed_tokens([p[0] for p in pairs], [p[1] for p in pairs], now)

    def embed_tokens(
        self,
        token_lists: Sequence[Sequence[int]],
        timestamp_lists: Sequence[Sequence[float]],
        now: float,
    ) -> np.ndarray:
        item_seq, time_lag = pad_batch(token_lists, timestamp_lists, now, self.max_seq_len)
        (embedding,) = self.session.run(
            [OUTPUT_USER_EMBEDDING],
            {INPUT_ITEM_SEQ: item_seq, INPUT_TIME_LAG: time_lag, INPUT_NOISE: self.noise},
        )
        return np.ascontiguousarray(embedding, dtype=np.float32)
