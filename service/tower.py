"""The user tower: a model export's ONNX graph run by ONNX Runtime (contract:
``contracts.tower``).

Loading verifies the export (manifest checksums, graph inputs/outputs, item table shapes)
so that a broken or mismatched version is refused at startup, never discovered by a request.

When the export also has the split tower (manifest ``tower_parts``: ``diffusion`` and
``attention``, see ``contracts.tower``), requests go through the two parts, and the
diffusion part's output ``xhat`` is kept in a bounded LRU (:class:`XhatCache`) keyed by the
padded ``item_seq`` row: the reverse process (most of the tower's cost) reads no time lag,
so a user whose session has not changed since the last request reuses it exactly; a new
behaviour changes the row and so the key.  The cache belongs to one loaded version (one
runner), so a hot swap never serves another version's ``xhat``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from contracts.manifest import (
    ITEM_EMBEDDINGS_FILE,
    ITEM_IDS_FILE,
    POPULARITY_FILE,
    TOWER_DIFFUSION_ONE_FIELD,
    TOWER_PARTS_FIELD,
    USER_TOWER_FILE,
    ArtifactError,
    TowerExportManifest,
    member_path,
)
from contracts.sessions import Session
from contracts.tower import (
    INPUT_ITEM_SEQ,
    INPUT_NOISE,
    INPUT_TIME_LAG,
    OUTPUT_USER_EMBEDDING,
    PART_ATTENTION,
    PART_DIFFUSION,
    XHAT,
    make_noise,
    pad_batch,
)
from service.remote_tower import TowerBackend, TowerWorkerClient

log = logging.getLogger(__name__)


def _providers() -> list[str]:
    # CUDA first when this onnxruntime build has it (onnxruntime-gpu), CPU always last as
    # the fallback ORT uses for nodes CUDA cannot run.
    available = ort.get_available_providers()
    wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return [p for p in wanted if p in available] or ["CPUExecutionProvider"]


CPU_ARENA_MODES = ("off", "own", "shared")
_SHARED_ARENA: list[bool] = []  # [registered?], set once per process


def _shared_cpu_arena() -> bool:
    """Register one CPU arena allocator in ONNX Runtime's environment (once per process);
    False where this ORT build cannot (sessions then keep their own arenas)."""
    if not _SHARED_ARENA:
        try:
            memory = ort.OrtMemoryInfo(
                "Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT
            )
            # 0 / -1: ORT's defaults (no cap, its own growth strategy and chunk sizes)
            ort.create_and_register_allocator(memory, ort.OrtArenaCfg(0, -1, -1, -1))
            _SHARED_ARENA.append(True)
        except Exception as exc:  # an ORT without the API, or one registered already
            _SHARED_ARENA.append("already registered" in str(exc).lower())
    return _SHARED_ARENA[0]


class XhatCache:
    """A bounded, thread-safe LRU of ``xhat`` rows (float32 ``[d]``) by key.

    Engine calls run in several worker threads at once, hence the lock; it is held only for
    dictionary operations (microseconds), never while a graph runs.
    """

    def __init__(self, max_entries: int) -> None:
        if max_entries < 1:
            raise ValueError("an xhat cache holds at least one entry")
        self.max_entries = max_entries
        self._rows: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._rows)

    def get_many(self, keys: Sequence[bytes]) -> list[np.ndarray | None]:
        with self._lock:
            found: list[np.ndarray | None] = []
            for key in keys:
                row = self._rows.get(key)
                if row is not None:
                    self._rows.move_to_end(key)
                found.append(row)
            return found

    def contains_many(self, keys: Sequence[bytes]) -> list[bool]:
        with self._lock:
            return [key in self._rows for key in keys]

    def put_many(self, keys: Sequence[bytes], rows: np.ndarray) -> None:
        with self._lock:
            for key, row in zip(keys, rows, strict=True):
                # A copy: the row must not keep the whole batch's output array alive.
                self._rows[key] = np.array(row, dtype=np.float32, copy=True)
                self._rows.move_to_end(key)
            while len(self._rows) > self.max_entries:
                self._rows.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._rows.clear()


class UserTowerRunner:
    """One loaded model export: the ONNX session plus the item vocabulary and popularity.

    Thread-safe: ``InferenceSession.run`` may be called from several threads at once, the
    xhat cache has its own lock, and nothing else here is mutated after construction.

    ``xhat_cache_size``: entries of the xhat cache (0 = no cache); used only when the
    export has the split tower, which is then always used (with or without the cache), so
    turning the cache on or off runs the same graphs.

    ``backend``: where the tower runs (``service.remote_tower.TowerBackend``); with the tower
    worker no ONNX session is opened and requests go to the worker (whole tower, no xhat
    cache: the fused GPU kernel costs about as much for a batch as for one row).
    """

    def __init__(
        self,
        artifacts_dir: Path,
        intra_op_threads: int | None = None,
        xhat_cache_size: int = 0,
        backend: TowerBackend | None = None,
        cpu_arena: str = "off",
    ) -> None:
        if cpu_arena not in CPU_ARENA_MODES:
            raise ValueError(f"cpu_arena is one of {CPU_ARENA_MODES}, not {cpu_arena!r}")
        self._cpu_arena = cpu_arena
        self.artifacts_dir = Path(artifacts_dir)
        if not self.artifacts_dir.is_dir():
            raise ArtifactError(f"{self.artifacts_dir}: artifacts directory does not exist")
        # Checksums, kind, typed fields, the item table listed; then what the tower needs.
        self.manifest = manifest = TowerExportManifest.load(self.artifacts_dir)
        self.max_seq_len, noise_shape, noise_seed = manifest.require_tower()
        self.model_name: str = manifest.model_name
        self.model_version: str = manifest.model_version
        self.embedding_dim: int = manifest.embedding_dim
        self.num_items: int = manifest.num_items

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
        self.worker: TowerWorkerClient | None = (backend or TowerBackend()).attach(
            self.artifacts_dir, self.model_version, self.embedding_dim
        )
        self._intra_op_threads = intra_op_threads
        self._session: ort.InferenceSession | None = None
        self.diffusion_session: ort.InferenceSession | None = None
        self.attention_session: ort.InferenceSession | None = None
        # the diffusion part for a lone miss (batch fixed at 1), when the export has it
        self.diffusion_one_session: ort.InferenceSession | None = None
        if self.worker is None and manifest.tower_parts is not None:
            self.diffusion_session, self.attention_session = self._open_parts(intra_op_threads)
            if manifest.tower_diffusion_one is not None:
                self.diffusion_one_session = self._open_diffusion_one(intra_op_threads)
        elif self.worker is None:
            self._session = self._open_session(intra_op_threads)
        self.xhat_cache: XhatCache | None = (
            XhatCache(xhat_cache_size)
            if self.diffusion_session is not None and xhat_cache_size > 0
            else None
        )
        opened = self._session if self._session is not None else self.attention_session
        log.info(
            "user tower %s %s loaded: %d items, d=%d, L=%d, providers=%s",
            self.model_name,
            self.model_version,
            self.num_items,
            self.embedding_dim,
            self.max_seq_len,
            opened.get_providers() if opened is not None else "tower worker",
        )

    @property
    def session(self) -> ort.InferenceSession | None:
        """The single graph (``user_tower.onnx``; None behind a tower worker).  A split
        export serves every request through its two parts, so its single graph is opened
        only when something asks for it (the parity tests and benchmarks that compare the
        two): that saves ~1 s of each version's load (docs/operations.md)."""
        if self._session is None and self.worker is None:
            self._session = self._open_session(self._intra_op_threads)
        return self._session

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
        if not self.manifest.lists(POPULARITY_FILE):
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

    def _session_options(self, intra_op_threads: int | None) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Measured on the 2-core box (docs/results/inference.md): one intra-op thread per
        # session, sequential execution and no memory-pattern reuse are fastest for the
        # 50-step tower; parallelism comes from concurrent requests (INFERENCE_CONCURRENCY),
        # not from ORT's thread pool, which spins and doubles the latency under load.
        options.intra_op_num_threads = intra_op_threads if intra_op_threads is not None else 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.enable_mem_reuse = False
        # ORT's CPU memory arena (ORT_CPU_ARENA): "own", one per session, keeps the peak of
        # every batch size the session ran and gives nothing back, so hot swaps left the
        # old versions' blocks in the heap (RSS +16 % over 30 swaps); "shared", one arena
        # for the process, did no better (+16.8 %); "off" (the default) kept RSS flat over
        # 30 swaps at a cost of ~3 % per request (docs/results/service.md, "Memory over hot
        # swaps"; bench/ort_arena_probe.py).
        options.enable_cpu_mem_arena = self._cpu_arena != "off"
        if self._cpu_arena == "shared" and _shared_cpu_arena():
            options.add_session_config_entry("session.use_env_allocators", "1")
        return options

    def _load_graph(self, file_name: str, intra_op_threads: int | None) -> ort.InferenceSession:
        path = member_path(self.artifacts_dir, file_name)  # inside the version dir
        try:
            return ort.InferenceSession(
                str(path),
                self._session_options(intra_op_threads),
                providers=_providers(),
            )
        except Exception as exc:  # ORT raises its own pybind exception types
            raise ArtifactError(f"{file_name}: ONNX Runtime cannot load it ({exc})") from exc

    def _open_session(self, intra_op_threads: int | None) -> ort.InferenceSession:
        session = self._load_graph(USER_TOWER_FILE, intra_op_threads)
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

    def _open_parts(
        self, intra_op_threads: int | None
    ) -> tuple[ort.InferenceSession, ort.InferenceSession]:
        """The split tower's ``diffusion`` and ``attention`` graphs, checked against the
        contract (``contracts.tower``)."""
        parts = self.manifest.tower_parts
        if parts is None or set(parts) != {PART_DIFFUSION, PART_ATTENTION}:
            raise ArtifactError(
                f"manifest {TOWER_PARTS_FIELD} must name {PART_DIFFUSION!r} and "
                f"{PART_ATTENTION!r}: {parts!r}"
            )
        for part, file_name in parts.items():
            self._check_listed(file_name, f"tower part {part}")
        expected = {
            PART_DIFFUSION: (
                {INPUT_ITEM_SEQ: "tensor(int64)", INPUT_NOISE: "tensor(float)"},
                XHAT,
            ),
            PART_ATTENTION: (
                {
                    INPUT_ITEM_SEQ: "tensor(int64)",
                    INPUT_TIME_LAG: "tensor(float)",
                    XHAT: "tensor(float)",
                },
                OUTPUT_USER_EMBEDDING,
            ),
        }
        sessions: dict[str, ort.InferenceSession] = {}
        for part, (wanted_inputs, wanted_output) in expected.items():
            file_name = parts[part]
            session = self._load_graph(file_name, intra_op_threads)
            inputs = {i.name: i.type for i in session.get_inputs()}
            if inputs != wanted_inputs:
                raise ArtifactError(
                    f"{file_name}: inputs {inputs}, the {part} part needs {wanted_inputs}"
                )
            outputs = {o.name: o.shape for o in session.get_outputs()}
            dims = outputs.get(wanted_output)
            if (
                dims is None
                or len(dims) != 2
                or (isinstance(dims[1], int) and dims[1] != self.embedding_dim)
            ):
                raise ArtifactError(
                    f"{file_name}: needs output {wanted_output} [B, {self.embedding_dim}], "
                    f"has {outputs}"
                )
            sessions[part] = session
        return sessions[PART_DIFFUSION], sessions[PART_ATTENTION]

    def _check_listed(self, file_name: object, what: str) -> None:
        """A graph the manifest names must be one of its checksummed files."""
        if not isinstance(file_name, str) or not self.manifest.lists(file_name):
            raise ArtifactError(f"{what}: {file_name!r} is not a listed file")

    def _open_diffusion_one(self, intra_op_threads: int | None) -> ort.InferenceSession:
        """The one-request diffusion part: the diffusion part's contract at batch 1."""
        file_name = self.manifest.tower_diffusion_one
        self._check_listed(file_name, f"manifest {TOWER_DIFFUSION_ONE_FIELD}")
        session = self._load_graph(file_name, intra_op_threads)
        inputs = {i.name: (i.type, i.shape) for i in session.get_inputs()}
        seq = inputs.get(INPUT_ITEM_SEQ)
        outputs = {o.name: o.shape for o in session.get_outputs()}
        if (
            seq != ("tensor(int64)", [1, self.max_seq_len])
            or set(inputs) != {INPUT_ITEM_SEQ, INPUT_NOISE}
            or inputs[INPUT_NOISE][0] != "tensor(float)"
            or outputs.get(XHAT) != [1, self.embedding_dim]
        ):
            raise ArtifactError(
                f"{file_name}: inputs {inputs}, outputs {outputs}; the one-request diffusion "
                f"part needs {INPUT_ITEM_SEQ} int64 [1, {self.max_seq_len}], {INPUT_NOISE} "
                f"float and {XHAT} [1, {self.embedding_dim}]"
            )
        return session

    @property
    def split(self) -> bool:
        """Whether requests go through the two tower parts (the export has them)."""
        return self.diffusion_session is not None

    def clear_xhat_cache(self) -> None:
        if self.xhat_cache is not None:
            self.xhat_cache.clear()

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
        timings: dict[str, float] | None = None,
        counts: dict[str, int] | None = None,
    ) -> np.ndarray:
        """User embeddings ``[B, d]`` of token sequences (oldest first) at time ``now``.

        With the split tower, ``timings`` gets the seconds of the ``diffusion`` part (when
        it ran) and of the ``attention`` part, and ``counts`` the ``xhat_hit`` and
        ``xhat_miss`` rows of the xhat cache (all rows miss without a cache).
        """
        item_seq, time_lag = pad_batch(token_lists, timestamp_lists, now, self.max_seq_len)
        if self.worker is not None:
            return self.worker.embed(self.model_version, item_seq, time_lag)
        if self.attention_session is None:
            assert self._session is not None
            (embedding,) = self._session.run(
                [OUTPUT_USER_EMBEDDING],
                {INPUT_ITEM_SEQ: item_seq, INPUT_TIME_LAG: time_lag, INPUT_NOISE: self.noise},
            )
            return np.ascontiguousarray(embedding, dtype=np.float32)
        xhat = self._xhat(item_seq, timings, counts)
        started = time.perf_counter()
        (embedding,) = self.attention_session.run(
            [OUTPUT_USER_EMBEDDING],
            {INPUT_ITEM_SEQ: item_seq, INPUT_TIME_LAG: time_lag, XHAT: xhat},
        )
        if timings is not None:
            timings["attention"] = time.perf_counter() - started
        return np.ascontiguousarray(embedding, dtype=np.float32)

    def xhat_cached(self, token_lists: Sequence[Sequence[int]]) -> list[bool] | None:
        """Per sequence, whether its ``xhat`` is in the cache now (None without a cache).

        A hint for scheduling only: an entry may be evicted before it is read, and is then
        computed like any miss.
        """
        if self.xhat_cache is None:
            return None
        stamps = [[0.0] * len(tokens) for tokens in token_lists]
        item_seq, _ = pad_batch(token_lists, stamps, 0.0, self.max_seq_len)
        return self.xhat_cache.contains_many([self.xhat_key(row) for row in item_seq])

    def xhat_key(self, item_seq_row: np.ndarray) -> bytes:
        """Cache key of one padded ``item_seq`` row, exactly as fed to the graph.

        The version is part of the key although each loaded version has its own cache, so
        that no code path can ever read another version's entry.  BLAKE2b-128 of the row's
        bytes: a collision needs ~2^64 distinct sessions.
        """
        digest = hashlib.blake2b(item_seq_row.tobytes(), digest_size=16)
        digest.update(self.model_version.encode())
        return digest.digest()

    def fill_xhat(
        self,
        token_lists: Sequence[Sequence[int]],
        batch_size: int = 32,
        deadline: float | None = None,
    ) -> int:
        """Compute and cache the ``xhat`` of those sequences not cached yet, ``batch_size``
        rows per diffusion run, stopping between runs once ``time.monotonic()`` passes
        ``deadline``.  Returns the rows computed (0 without a cache).

        The warm and background paths of :mod:`service.xhat_warm`: the rows and keys are
        exactly a recall's (same padding), so the next recall of these sessions hits.
        """
        if self.xhat_cache is None or not token_lists:
            return 0
        stamps = [[0.0] * len(tokens) for tokens in token_lists]
        item_seq, _ = pad_batch(token_lists, stamps, 0.0, self.max_seq_len)
        keys = [self.xhat_key(row) for row in item_seq]
        # Several sessions may share a key (same recent items): compute each key once.
        first_of: dict[bytes, int] = {}
        for i, (key, cached) in enumerate(
            zip(keys, self.xhat_cache.contains_many(keys), strict=True)
        ):
            if not cached:
                first_of.setdefault(key, i)
        missing = list(first_of.values())
        computed = 0
        for start in range(0, len(missing), max(1, batch_size)):
            if deadline is not None and time.monotonic() >= deadline:
                break
            rows = missing[start : start + batch_size]
            self._run_diffusion(np.ascontiguousarray(item_seq[rows]), [keys[i] for i in rows], None)
            computed += len(rows)
        return computed

    def _xhat(
        self,
        item_seq: np.ndarray,
        timings: dict[str, float] | None,
        counts: dict[str, int] | None,
    ) -> np.ndarray:
        """``xhat [B, d]``: cached rows as they are, the others through the diffusion part."""
        assert self.diffusion_session is not None
        cache = self.xhat_cache
        batch = item_seq.shape[0]
        if cache is None:
            keys: list[bytes] = []
            cached: list[np.ndarray | None] = [None] * batch
        else:
            keys = [self.xhat_key(row) for row in item_seq]
            cached = cache.get_many(keys)
        missed = [i for i, row in enumerate(cached) if row is None]
        if counts is not None:
            counts["xhat_hit"] = counts.get("xhat_hit", 0) + batch - len(missed)
            counts["xhat_miss"] = counts.get("xhat_miss", 0) + len(missed)
        if len(missed) == batch:  # all rows new: no gather, no scatter
            return self._run_diffusion(item_seq, keys, timings)
        xhat = np.empty((batch, self.embedding_dim), dtype=np.float32)
        for i, row in enumerate(cached):
            if row is not None:
                xhat[i] = row
        if missed:
            xhat[missed] = self._run_diffusion(
                np.ascontiguousarray(item_seq[missed]), [keys[i] for i in missed], timings
            )
        return xhat

    def _run_diffusion(
        self, item_seq: np.ndarray, keys: list[bytes], timings: dict[str, float] | None
    ) -> np.ndarray:
        assert self.diffusion_session is not None
        started = time.perf_counter()
        one = self.diffusion_one_session
        session = one if one is not None and item_seq.shape[0] == 1 else self.diffusion_session
        (xhat,) = session.run([XHAT], {INPUT_ITEM_SEQ: item_seq, INPUT_NOISE: self.noise})
        if timings is not None:
            timings["diffusion"] = time.perf_counter() - started
        xhat = np.ascontiguousarray(xhat, dtype=np.float32)
        if self.xhat_cache is not None:
            self.xhat_cache.put_many(keys, xhat)
        return xhat
