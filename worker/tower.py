"""The tower worker's compute, free of transport: the exports it holds (``TowerVersion``:
one version's model on one path, checked against eager at load, with its CUDA graphs) and
``TowerWorker`` (load / health / embed, coalescing concurrent requests into one batch on
one compute thread).  ``worker.server`` puts it behind the Unix socket.

What runs (``--path``):

* ``fused`` (default on CUDA): ``FusedTower``, precision ``--precision`` (default
  ``tf32x3tail``: tf32 tensor-core products with operands rounded to nearest in every
  reverse step but the last ``--exact-tail`` (5), which use three tf32 products (``tf32x3``);
  the reverse process damps the early steps' rounding, so the answer stays within 1e-4 of
  eager at ~1.8x ``tf32x3``'s speed; ``tf32x3`` in every step is the slower parity-safe
  choice (max |diff| vs eager <= 3.8e-6 on the H100), ``ieee`` too; ``tf32`` everywhere
  is an opt-in judged by recall (~1e-2 embedding differences).
  One CUDA graph per batch bucket (1, 2, 4, ..., ``--max-bucket``); a batch is padded to
  its bucket (rows are independent, so padding rows change nothing), larger ones are
  split.  On the CPU it runs only under ``TRITON_INTERPRET=1`` (tests).
* ``fast``: ``model.fast_tower.FastTower`` (the ONNX export's function), CUDA graphs on a GPU.
* ``eager`` (default on CPU): the model's own ``user_embedding``, the reference.

The noise is the manifest's fixed draw (``contracts.tower.make_noise``), as in the ONNX
path, so both compute the same function.  At load, a non-eager path is checked against
eager on random rows; a parity-safe precision that misses 1e-4 refuses to load, except
``tf32x3tail``, which then serves ``tf32x3``.

Several versions can be held (the newest ``--keep-versions``): the service asks the worker
to ``load`` a promoted version before it swaps, and names the version in every request, so
a request is answered by exactly the version its engine belongs to, never a mix.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import time
from collections import OrderedDict, deque
from pathlib import Path
from typing import Any

import numpy as np
import torch

from contracts.manifest import TORCH_TOWER_FIELD, ArtifactError, read_manifest
from contracts.tower import make_noise
from model.base import Batch, ExportedTower, SequentialRecommender
from model.registry import build_model

# One logger name for the whole worker process (its log lines keep their old name).
log = logging.getLogger("t2diff.tower_worker")

PATHS = ("auto", "fused", "fast", "eager")
# Precisions whose answer matches eager within PARITY_TOL (fp32 arithmetic); the others are
# judged by recall (docs/results/inference.md) and only warned about.
# "tf32x3tail" (tf32 steps rounded to nearest, the last exact_tail in tf32x3) keeps parity
# by the reverse process damping the early steps' rounding (ML-1M, all 6,040 users, CPU
# emulation that reproduces the H100's figures: max 5.4e-5, rankings unchanged); a model
# where it misses 1e-4 at load is served at PARITY_FALLBACK's precision instead.
PARITY_PRECISIONS = ("ieee", "tf32x3", "tf32x3tail")
PARITY_FALLBACK = {"tf32x3tail": "tf32x3"}
# H100, width 16, B = 1: tf32x3tail ~1.9 ms per request against 3.4 ms for tf32x3
# (docs/results/inference.md, runs R4).
DEFAULT_PRECISION = "tf32x3tail"
PARITY_TOL = 1e-4
MAX_ROWS = 4096  # one request; the service's MAX_BATCH is at most 4096 too


class RequestError(ValueError):
    """A well-formed frame asking for something the worker refuses; ``code`` goes on the wire."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code


def _buckets(max_bucket: int) -> list[int]:
    out, size = [], 1
    while size < max_bucket:
        out.append(size)
        size *= 2
    return [*out, max_bucket]


def load_checkpoint(artifacts: Path) -> tuple[dict[str, Any], SequentialRecommender]:
    """The export's manifest (checksums verified) and its model rebuilt from the torch
    checkpoint the export carries (``user_tower.pt``), in eval mode on the CPU."""
    manifest = read_manifest(artifacts)
    file_name = manifest.get(TORCH_TOWER_FIELD)
    if not isinstance(file_name, str) or file_name not in manifest["files"]:
        raise ArtifactError(
            f"{artifacts}: the export has no torch checkpoint (manifest {TORCH_TOWER_FIELD!r});"
            " re-export it with this version of `t2diff export`"
        )
    state = torch.load(artifacts / file_name, map_location="cpu", weights_only=True)
    popularity = state["popularity"].numpy()
    model = build_model(state["model_name"], int(state["n_items"]), state["model_config"],
                        popularity)  # fmt: skip
    model.load_state_dict(state["state_dict"])
    model.eval()
    if int(manifest["num_items"]) != model.n_items or int(manifest["max_seq_len"]) != int(
        state["model_config"]["max_seq_len"]
    ):
        raise ArtifactError(f"{artifacts}: checkpoint and manifest disagree on the model's shape")
    return manifest, model


class TowerVersion:
    """One loaded export: its model on ``device`` through the chosen path, graphs captured."""

    def __init__(
        self,
        artifacts: Path,
        device: str,
        path: str = "auto",
        precision: str = DEFAULT_PRECISION,
        num_warps: int = 4,
        max_bucket: int = 256,
        graphs: bool = True,
        capture_lock: threading.Lock | None = None,
        exact_tail: int = 5,
        parity_tol: float = PARITY_TOL,
    ) -> None:
        self.artifacts = Path(artifacts)
        # Held around each graph capture: a capture must not see another thread's launches
        # (the worker serves the versions it holds while it loads a new one).
        self._capture_lock = capture_lock or threading.Lock()
        started = time.perf_counter()
        manifest, model = load_checkpoint(self.artifacts)
        self.model_version = str(manifest["model_version"])
        self.max_seq_len = int(manifest["max_seq_len"])
        self.num_items = int(manifest["num_items"])
        self.embedding_dim = int(manifest["embedding_dim"])
        self.device = torch.device(device)
        self.noise = torch.from_numpy(
            make_noise(manifest["noise_shape"], int(manifest["noise_seed"]))
        ).to(self.device)
        self.reference = copy.deepcopy(model).to(self.device).eval()
        self.path = path if path != "auto" else ("fused" if self.device.type == "cuda" else "eager")
        self.precision = precision if self.path == "fused" else "fp32"
        # The re-expressions fold their constants on the CPU (as the export does), then move.
        if self.path == "fused":
            from model.fused_tower import FusedTower

            def fused(precision: str) -> torch.nn.Module:
                tower = FusedTower(copy.deepcopy(model), precision=precision,
                                   num_warps=num_warps, exact_tail=exact_tail)  # fmt: skip
                return tower.to(self.device).eval()

            self.tower: torch.nn.Module = fused(precision)
        elif self.path == "fast":
            from model.fast_tower import FastTower

            self.tower = FastTower(model)  # type: ignore[arg-type]
        elif self.path == "eager":
            self.tower = ExportedTower(self.reference)
        else:
            raise ValueError(f"path must be one of {PATHS}, not {path!r}")
        self.tower = self.tower.to(self.device).eval()
        self.max_bucket = max_bucket
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor,
                                     torch.Tensor]] = {}  # fmt: skip
        self.parity: float | None = None
        self.parity_tol = parity_tol
        try:
            self._check_parity()
        except ArtifactError as error:
            if self.precision not in PARITY_FALLBACK:
                raise
            # A model whose last steps do not damp the tf32 steps' rounding enough: serve it
            # at full parity (slower) rather than refuse it.
            fallback = PARITY_FALLBACK[self.precision]
            log.warning("%s: serving %s instead", error, fallback)
            self.precision, self.tower = fallback, fused(fallback)
            self._check_parity()
        if graphs and self.device.type == "cuda":
            for bucket in _buckets(max_bucket):
                self._capture(bucket)
            # Pinned host staging of the graph path (one set per version; embed runs under
            # the worker's compute lock, one call at a time).  Copies from pageable numpy
            # memory are staged by the driver synchronously; from pinned memory they are
            # plain DMA, queued with the replay, and one synchronize ends the call.
            width = self.graphs[max_bucket][3].shape[1]
            self._pinned_seq = torch.empty((max_bucket, self.max_seq_len), dtype=torch.int64,
                                           pin_memory=True)  # fmt: skip
            self._pinned_lag = torch.empty((max_bucket, self.max_seq_len), dtype=torch.float32,
                                           pin_memory=True)  # fmt: skip
            self._pinned_out = torch.empty((max_bucket, width), dtype=torch.float32,
                                           pin_memory=True)  # fmt: skip
            self._bucket_of = [next(b for b in sorted(self.graphs) if b >= rows)
                               for rows in range(max_bucket + 1)]  # fmt: skip
        self.load_s = time.perf_counter() - started
        log.info(
            "loaded %s from %s: path=%s precision=%s device=%s graphs=%s parity=%s (%.1f s)",
            self.model_version, self.artifacts, self.path, self.precision, self.device,
            sorted(self.graphs), self.parity, self.load_s,
        )  # fmt: skip

    def describe(self) -> dict[str, Any]:
        return {
            "model_version": self.model_version,
            "path": self.path,
            "precision": self.precision,
            "device": str(self.device),
            "buckets": sorted(self.graphs),
            "parity_max_abs_diff": self.parity,
            "max_seq_len": self.max_seq_len,
            "embedding_dim": self.embedding_dim,
        }

    def _random_inputs(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(batch)
        item_seq = torch.randint(1, self.num_items + 1, (batch, self.max_seq_len), generator=gen)
        item_seq[0, : self.max_seq_len // 2] = 0  # one left-padded, short history
        time_lag = torch.rand(batch, self.max_seq_len, generator=gen) * 1e6
        return item_seq.to(self.device), time_lag.to(self.device)

    def _check_parity(self) -> None:
        if self.path == "eager":
            return
        item_seq, time_lag = self._random_inputs(4)
        with torch.no_grad():
            got = self.tower(item_seq, time_lag, self.noise)
            want = self.reference.user_embedding(Batch(item_seq, time_lag), self.noise)
        self.parity = float((got.float() - want.float()).abs().max())
        if self.parity > self.parity_tol or not np.isfinite(self.parity):
            message = f"{self.path}/{self.precision} differs from eager by {self.parity:.2e}"
            if self.precision in PARITY_PRECISIONS or self.path != "fused":
                raise ArtifactError(message + f" (limit {self.parity_tol})")
            log.warning("%s (reduced precision, judged by recall)", message)

    def _capture(self, bucket: int) -> None:
        item_seq, time_lag = self._random_inputs(bucket)
        item_seq, time_lag = item_seq.contiguous(), time_lag.contiguous()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(2):  # the first call compiles the Triton kernel
                self.tower(item_seq, time_lag, self.noise)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with self._capture_lock, torch.no_grad(), torch.cuda.graph(graph):
            out = self.tower(item_seq, time_lag, self.noise)
        self.graphs[bucket] = (graph, item_seq, time_lag, out)

    def validate(self, item_seq: np.ndarray, time_lag: np.ndarray) -> None:
        if item_seq.ndim != 2 or item_seq.shape[1] != self.max_seq_len:
            raise RequestError(
                "bad_request", f"item_seq shape {item_seq.shape}, want [B, {self.max_seq_len}]"
            )
        if time_lag.shape != item_seq.shape:
            raise RequestError("bad_request", f"time_lag shape {time_lag.shape} != item_seq's")
        if not 1 <= item_seq.shape[0] <= MAX_ROWS:
            raise RequestError("bad_request", f"batch of {item_seq.shape[0]} rows (1..{MAX_ROWS})")
        if item_seq.min() < 0 or item_seq.max() > self.num_items:
            raise RequestError("bad_request", f"item_seq tokens outside 0..{self.num_items}")
        if not np.isfinite(time_lag).all():
            raise RequestError("bad_request", "time_lag holds NaN or inf")

    def embed(self, item_seq: np.ndarray, time_lag: np.ndarray) -> np.ndarray:
        """``user_embedding`` [B, d] float32 for validated inputs (caller holds the lock)."""
        if not self.graphs:
            with torch.no_grad():
                out = self.tower(
                    torch.from_numpy(np.array(item_seq)).to(self.device),
                    torch.from_numpy(np.array(time_lag)).to(self.device),
                    self.noise,
                )
            return out.float().cpu().numpy()
        parts = []
        for start in range(0, item_seq.shape[0], self.max_bucket):
            parts.append(self._replay(item_seq[start : start + self.max_bucket],
                                      time_lag[start : start + self.max_bucket]))  # fmt: skip
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _replay(self, item_seq: np.ndarray, time_lag: np.ndarray) -> np.ndarray:
        rows = item_seq.shape[0]
        bucket = self._bucket_of[rows]
        graph, static_seq, static_lag, out = self.graphs[bucket]
        host_seq, host_lag = self._pinned_seq.numpy(), self._pinned_lag.numpy()
        host_seq[:rows] = item_seq
        host_lag[:rows] = time_lag
        if rows < bucket:
            # Padding rows repeat row 0 (a real history): rows never mix, and an all-padding
            # row would be a case the model never saw.  Written on the host, so the bucket
            # goes over in one copy per input (no device-side padding kernels).
            host_seq[rows:bucket] = item_seq[0]
            host_lag[rows:bucket] = time_lag[0]
        static_seq.copy_(self._pinned_seq[:bucket], non_blocking=True)
        static_lag.copy_(self._pinned_lag[:bucket], non_blocking=True)
        graph.replay()
        result = out[:rows] if out.dtype == torch.float32 else out[:rows].float()
        self._pinned_out[:rows].copy_(result, non_blocking=True)
        # The one wait of the call: the copies, the replay and the copy back are queued in
        # order on this stream; the answer is read from host memory only after it.
        torch.cuda.current_stream(self.device).synchronize()
        # A copy: the staging buffer is reused by the next call.
        return self._pinned_out.numpy()[:rows].copy()


class TowerWorker:
    """The versions held, the one compute thread (one GPU stream) and its queue."""

    def __init__(
        self,
        artifacts: Path,
        device: str,
        allow_root: Path | None = None,
        keep_versions: int = 2,
        coalesce: bool = True,
        **version_options: Any,
    ) -> None:
        self.device = device
        self.spin_us = 0  # set by serve() (--spin-us); reported by health
        self.version_options = version_options
        self.keep_versions = max(1, keep_versions)
        self.allow_root = Path(os.path.realpath(allow_root or Path(artifacts).resolve().parent))
        self.versions: OrderedDict[str, TowerVersion] = OrderedDict()
        self._compute = threading.Lock()
        self._loading = threading.Lock()
        self.version_options["capture_lock"] = self._compute
        self._add(TowerVersion(Path(os.path.realpath(artifacts)), device, **self.version_options))
        # Coalescing concurrent requests: up to one graph bucket of rows per call.
        self.coalesce_rows = int(version_options.get("max_bucket", 256)) if coalesce else 1
        self._queue: deque[_Job] = deque()
        self._queue_cv = threading.Condition()
        threading.Thread(target=self._compute_forever, name="tower-compute", daemon=True).start()

    def _add(self, version: TowerVersion) -> None:
        with self._compute:
            self.versions[version.model_version] = version
            self.versions.move_to_end(version.model_version)
            while len(self.versions) > self.keep_versions:
                old, _ = self.versions.popitem(last=False)
                log.info("dropped version %s (keeping %d)", old, self.keep_versions)

    def health(self) -> dict[str, Any]:
        return {
            "ok": True,
            "versions": list(self.versions),
            "pid": os.getpid(),
            "spin_us": self.spin_us,
            **(next(reversed(self.versions.values())).describe() if self.versions else {}),
        }

    def load(self, header: dict[str, Any]) -> dict[str, Any]:
        artifacts, wanted = header.get("artifacts"), header.get("model_version")
        if not isinstance(artifacts, str) or not isinstance(wanted, str):
            raise RequestError("bad_request", "load needs artifacts and model_version strings")
        if wanted in self.versions:
            return {"ok": True, "versions": list(self.versions), "loaded": False}
        real = Path(os.path.realpath(artifacts))
        # The worker reads only exports under its artifact root: the socket must not let a
        # client make it unpickle-free-but-still-arbitrary files elsewhere.
        if not real.is_relative_to(self.allow_root):
            raise RequestError("load_failed", f"{real} is not under {self.allow_root}")
        with self._loading:  # one load at a time; requests keep being served meanwhile
            if wanted not in self.versions:
                try:
                    manifest = read_manifest(real, verify=False)
                    if str(manifest.get("model_version")) != wanted:
                        raise RequestError(
                            "version_mismatch",
                            f"{real} holds model {manifest.get('model_version')}, not {wanted}",
                        )
                    version = TowerVersion(real, self.device, **self.version_options)
                except RequestError:
                    raise
                except Exception as exc:  # any load failure is the client's answer
                    raise RequestError("load_failed", f"{type(exc).__name__}: {exc}") from exc
                if version.model_version != wanted:
                    raise RequestError("version_mismatch", f"{real} changed during the load")
                self._add(version)
        return {"ok": True, "versions": list(self.versions), "loaded": True}

    def embed(
        self, header: dict[str, Any], arrays: dict[str, np.ndarray]
    ) -> tuple[dict[str, Any], np.ndarray]:
        wanted = header.get("model_version")
        version = self.versions.get(wanted) if isinstance(wanted, str) else None
        if version is None:
            raise RequestError(
                "version_mismatch", f"model {wanted!r} is not loaded here: {list(self.versions)}"
            )
        if set(arrays) != {"item_seq", "time_lag"}:
            raise RequestError("bad_request", f"embed needs item_seq and time_lag: {list(arrays)}")
        item_seq, time_lag = arrays["item_seq"], arrays["time_lag"]
        if item_seq.dtype != np.int64 or time_lag.dtype != np.float32:
            raise RequestError("bad_request", "item_seq must be int64 and time_lag float32")
        version.validate(item_seq, time_lag)
        # Fast path: device idle and nothing queued -> compute on this thread.  Handing the
        # request to the compute thread costs a thread wake-up each way (~0.5 ms p50 at
        # B = 1 on the H100 run), which only pays off when requests queue.
        if self._compute.acquire(blocking=False):
            try:
                with self._queue_cv:
                    idle = not self._queue
                if idle:
                    started = time.perf_counter()
                    out = version.embed(item_seq, time_lag)
                    compute_ms = (time.perf_counter() - started) * 1000
                    return {"ok": True, "model_version": version.model_version,
                            "compute_ms": round(compute_ms, 4),
                            "batch_rows": int(item_seq.shape[0])}, out  # fmt: skip
            finally:
                self._compute.release()
        job = _Job(version, item_seq, time_lag)
        with self._queue_cv:
            self._queue.append(job)
            self._queue_cv.notify()
        job.done.wait()
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return {"ok": True, "model_version": version.model_version,
                "compute_ms": round(job.compute_ms, 4), "batch_rows": job.batch_rows}, job.result  # fmt: skip

    def _compute_forever(self) -> None:
        """The one compute thread: takes every queued request of the oldest one's version
        (up to ``coalesce_rows`` rows) and runs them as ONE batch.

        Why: connections are served by threads, but the GPU runs one call at a time; requests
        that arrive while a call runs would each wait for a whole call of their own.  Taken
        together they cost about one call (B = 1 and B = 64 differ by ~3% on the H100).  This
        matters when several service processes (``--scale api=N``, ``WORKERS``) share the
        worker; one process's micro-batcher already sends batches.  Nothing waits on
        purpose: a request that finds the GPU idle runs at once.
        """
        while True:
            with self._queue_cv:
                while not self._queue:
                    self._queue_cv.wait()
                first = self._queue.popleft()
                group, rows = [first], first.item_seq.shape[0]
                kept: deque[_Job] = deque()
                while self._queue:
                    job = self._queue.popleft()
                    if job.version is first.version and rows + job.item_seq.shape[0] <= (
                        self.coalesce_rows
                    ):
                        group.append(job)
                        rows += job.item_seq.shape[0]
                    else:
                        kept.append(job)
                self._queue.extendleft(reversed(kept))
            try:
                with self._compute:
                    started = time.perf_counter()
                    if len(group) == 1:
                        outs = [first.version.embed(first.item_seq, first.time_lag)]
                    else:
                        out = first.version.embed(
                            np.concatenate([j.item_seq for j in group]),
                            np.concatenate([j.time_lag for j in group]),
                        )
                        bounds = np.cumsum([j.item_seq.shape[0] for j in group])[:-1]
                        outs = np.split(out, bounds)
                    compute_ms = (time.perf_counter() - started) * 1000
                for job, result in zip(group, outs, strict=True):
                    job.result, job.compute_ms, job.batch_rows = result, compute_ms, rows
            except Exception as exc:  # a CUDA failure or a bug: every request of the batch
                log.exception("batch of %d requests failed", len(group))
                for job in group:
                    job.error = exc
            for job in group:
                job.done.set()


class _Job:
    """One embed request waiting for the compute thread."""

    __slots__ = ("version", "item_seq", "time_lag", "done", "result", "error", "compute_ms",
                 "batch_rows")  # fmt: skip

    def __init__(self, version: TowerVersion, item_seq: np.ndarray, time_lag: np.ndarray) -> None:
        self.version, self.item_seq, self.time_lag = version, item_seq, time_lag
        self.done = threading.Event()
        self.result: np.ndarray | None = None
        self.error: BaseException | None = None
        self.compute_ms = 0.0
        self.batch_rows = 0
