"""Service configuration, read from ``T2DIFF_*`` environment variables (or passed in).

One flat class so that every knob of the serving process is listed in one place and can be
set from a container's environment: ``T2DIFF_ARTIFACTS_DIR=/models/v3 T2DIFF_NPROBE=16 ...``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from contracts.sessions import DEFAULT_MAX_LEN, DEFAULT_PREFIX


class Settings(BaseSettings):
    """Every setting of the recall service; env var = ``T2DIFF_`` + upper-case field name."""

    # No .env file is read implicitly: what configures production must be visible in the
    # process environment (or the explicit constructor call), never a stray file in the cwd.
    model_config = SettingsConfigDict(env_prefix="T2DIFF_", extra="ignore")

    # Artifacts: one model export (``artifacts/VERSION``) and one index built from it.
    artifacts_dir: Path = Path("artifacts/current")
    index_dir: Path = Path("indexes/current")

    # Redis sessions.  The timeouts are deliberately tight (tens of ms): a recall has a
    # latency budget of a few ms, and redis-py's defaults (seconds) would let one sick Redis
    # stall every worker instead of failing fast.
    # The URL is redis-py's: redis://[[user]:password@]host:port/db, rediss://... for TLS
    # (query options too, e.g. ?ssl_check_hostname=false).  redis_password is for a URL
    # without a password (kept in a Secret apart from the URL: T2DIFF_REDIS_PASSWORD); a
    # password in the URL wins.  The TLS files need a rediss:// URL: a CA bundle to verify
    # the server (else the system's CAs), and a client certificate + key for mutual TLS.
    redis_url: str = "redis://localhost:6379/0"
    redis_password: SecretStr | None = None
    redis_tls_ca_file: Path | None = None
    redis_tls_cert_file: Path | None = None
    redis_tls_key_file: Path | None = None
    redis_prefix: str = DEFAULT_PREFIX
    redis_timeout_ms: int = Field(default=50, gt=0, description="socket read/write timeout")
    redis_connect_timeout_ms: int = Field(default=200, gt=0, description="TCP connect timeout")
    redis_pool_timeout_ms: int = Field(
        default=50, gt=0, description="wait for a free pooled connection before failing"
    )
    redis_max_connections: int = Field(default=32, gt=0)
    session_max_len: int = Field(default=DEFAULT_MAX_LEN, gt=0)

    # Recall.
    default_k: int = Field(default=100, gt=0)
    max_k: int = Field(default=1000, gt=0)
    nprobe: int | None = Field(default=None, gt=0, description="None = the index's own default")
    # How many recalls compute (ORT + FAISS) at once; more would only oversubscribe the cores
    # each library already parallelises over, and raise tail latency.
    inference_concurrency: int = Field(default=4, gt=0)

    # Entries of the per-version LRU of the diffusion output (xhat) by padded session, used
    # when the export has the split tower (manifest tower_parts); 0 = no cache (every
    # request runs the reverse process).  An entry of d = 64 takes ~0.5 KB (key, array,
    # LRU links): 100,000 entries are ~50 MB per loaded version.
    xhat_cache_size: int = Field(default=100_000, ge=0)
    # Near-line xhat (service/xhat_warm.py; docs/operations.md, "Warming the xhat cache").
    # When a version is loaded (startup, and a hot swap before the switch), compute the xhat
    # of the xhat_warm_users most recently active users (Redis ZSET {prefix}:active), for at
    # most xhat_warm_seconds; either 0 turns the warm off.  /readyz says "warming" until it
    # ends.  20,000 covers every ML-1M user (6,040) and a day's actives of a mid-size site;
    # the width-16 ML-1M tower warms ~160 sessions/s per core (batch 32, 2-core box).
    xhat_warm_users: int = Field(default=20_000, ge=0)
    xhat_warm_seconds: float = Field(default=60.0, ge=0, le=3600)
    xhat_warm_batch: int = Field(default=32, gt=0, le=1024, description="rows per diffusion run")
    xhat_warm_threads: int | None = Field(
        default=None,
        gt=0,
        le=64,
        description="startup warm threads; None = usable cores, at most INFERENCE_CONCURRENCY",
    )
    # After an /events write, the user's new xhat is computed in the background (a queue of
    # at most xhat_recompute_queue users, the newest dropped when full; 0 = off), so the next
    # recall hits.  Background work (this and a hot swap's warm) runs in threads at this
    # nice level: live recalls always get the cores first.
    xhat_recompute_queue: int = Field(default=1_000, ge=0)
    xhat_background_nice: int = Field(default=19, ge=0, le=19)

    # Where the user tower runs.  "onnx": ONNX Runtime in this process (CUDA EP when the
    # onnxruntime build has it, else CPU).  "worker": the tower worker process
    # (`python -m worker.server`, torch + the fused Triton kernel on a GPU) at
    # tower_worker_socket; unreachable at load = the version is not loaded.  "auto": the
    # worker when a socket is set and it answers at load time, else ONNX Runtime.
    tower_backend: Literal["auto", "onnx", "worker"] = "auto"
    tower_worker_socket: Path | None = None
    # One worker round trip (the fused kernel answers B = 256 in ~6 ms on an H100); a
    # request's own budget still applies on top (tower_timeout).
    tower_worker_timeout_ms: int = Field(default=1000, gt=0, le=60_000)
    # Loading a version into the worker compiles the kernel and captures its CUDA graphs.
    tower_worker_load_timeout_s: float = Field(default=600.0, gt=0)
    # Busy-polling for the worker's answer before a blocking wait, µs (0 = block at once, the
    # old behaviour).  `t2diff serve` passes it to the worker child too (`--spin-us`; a
    # sidecar reads the same T2DIFF_TOWER_WORKER_SPIN_US), which then polls that long for a
    # connection's next request after each answer.  Why: waking a core that went idle in a
    # blocking recv cost p99 tails of 1.4-2.4 ms on the H100 box (docs/operations.md).
    # None (the default): 3000 where the process may use >= 4 cores (its CPU affinity,
    # capped by a container's CPU quota), else 0 (contracts.tower_wire.default_spin_us;
    # not imported here: it pulls numpy).
    # Why 3000: the window must outlast the round trip, or the slow requests (the tail
    # this is for) are exactly the ones that fall back to the blocking wait.  A B = 1 round
    # trip on the H100 is ~1.7 ms of kernel + ~0.2 ms of overhead, and the target is p99
    # <= 2 ms: 3 ms covers it with a margin (2 ms would sit right at it; on the CPU box a
    # window shorter than the wait helped less, docs/operations.md).  Longer waits (large
    # batches) fall back to the blocking recv after 3 ms.  The cost is CPU, bounded: at
    # most ONE thread per process polls at a time (the others block), so a service of
    # WORKERS uvicorn processes burns at most WORKERS cores, and only while tower requests
    # are in flight (<= 3 ms each; the worker: <= 3 ms after each answer); the poll yields
    # the GIL each ~2 µs, so the process's other threads (the event loop) are not held
    # up.  Why >= 4 cores: a poller needs a core of its own; on 2 shared cores spinning
    # made the tails far worse.
    tower_worker_spin_us: int | None = Field(default=None, ge=0, le=100_000)

    # Latency budget.  A recall answers within min(budget, the caller's deadline header):
    # a stage that would overrun it is abandoned and the answer falls back to popular items
    # (marked ``degraded``).  ``max_budget_ms`` bounds what a request may ask for.
    budget_ms: int = Field(default=200, gt=0, le=60_000)
    max_budget_ms: int = Field(default=5_000, gt=0, le=60_000)

    # Micro-batching of concurrent /recall requests into one engine call.  A request that
    # finds no batch in flight is dispatched at once; while one is in flight, newcomers are
    # gathered for at most batch_wait_ms (or until max_batch).  max_batch=1 turns it off.
    batch_wait_ms: float = Field(default=2.0, ge=0, le=1000)
    max_batch: int = Field(default=64, gt=0, le=4096)

    # Overload: at most max_in_flight requests (recall + events) in the process; more are
    # shed with 503 + Retry-After instead of queueing without bound.
    max_in_flight: int = Field(default=256, gt=0)
    retry_after_s: int = Field(default=1, gt=0, le=3600)
    # Circuit breaker on Redis: after this many consecutive failures, skip Redis for
    # redis_breaker_open_ms (answers degraded at once), then try again.
    redis_breaker_failures: int = Field(default=5, gt=0)
    redis_breaker_open_ms: int = Field(default=250, gt=0, le=60_000)

    # Writes (POST /events) and input bounds.
    max_events_per_request: int = Field(default=100, gt=0, le=10_000)
    event_dedup_ttl_s: int = Field(default=86_400, gt=0)
    max_body_bytes: int = Field(default=65_536, gt=0, le=16 * 1024 * 1024)

    # Hot swap: poll the realpaths of artifacts_dir and index_dir every watch_interval_s
    # seconds and load a newly promoted version (0 = off; POST /admin/reload still works).
    watch_interval_s: float = Field(default=5.0, ge=0)

    # Admin endpoints (POST /admin/reload) need "Authorization: Bearer <token>"; without a
    # token they do not exist (404).
    admin_token: SecretStr | None = None
    # Release root (``ROOT/artifacts/current``, ``ROOT/indexes/current``, ``releases.jsonl``)
    # for POST /admin/rollback; None = rollback only from the CLI (``t2diff rollback``), as
    # when the model volume is mounted read-only.
    release_root: Path | None = None
    # CORS: off (no header sent) unless origins are listed.
    cors_origins: list[str] = Field(default_factory=list)

    # Threads.  FAISS defaults to one OpenMP thread per core *per call*; with concurrent
    # requests that oversubscribes the CPU, so serving uses 1 and scales by concurrency.
    faiss_threads: int = Field(default=1, gt=0)
    ort_intra_threads: int | None = Field(
        default=None, gt=0, description="ORT intra-op threads per session; None = 1"
    )
    ort_cpu_arena: Literal["off", "own", "shared"] = Field(
        default="off",
        description="ONNX Runtime's CPU memory arena: off (memory flat over hot swaps, "
        "~3 % slower per request), own (one per session), shared (one per process)",
    )
    # AnyIO's default thread limiter (FastAPI's sync code and file loads); inference has its
    # own limiter of inference_concurrency tokens.
    default_thread_limit: int = Field(default=16, gt=0, le=1024)

    # HTTP server.
    host: str = "127.0.0.1"
    port: int = Field(default=8000, gt=0, lt=65536)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    log_json: bool = True
    # uvicorn worker processes; each loads its own model, index and Redis pool.
    workers: int = Field(default=1, gt=0, le=64)

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, value: object) -> object:
        # T2DIFF_LOG_LEVEL=INFO and =info both work; uvicorn wants lower case.
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _k_bounds(self) -> Settings:
        if self.default_k > self.max_k:
            raise ValueError(f"default_k ({self.default_k}) exceeds max_k ({self.max_k})")
        if self.budget_ms > self.max_budget_ms:
            raise ValueError(
                f"budget_ms ({self.budget_ms}) exceeds max_budget_ms ({self.max_budget_ms})"
            )
        return self

    @field_validator(
        "redis_tls_ca_file", "redis_tls_cert_file", "redis_tls_key_file", mode="before"
    )
    @classmethod
    def _empty_path_is_none(cls, value: object) -> object:
        # T2DIFF_REDIS_TLS_CA_FILE= (empty) means unset, not the current directory.
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _redis_tls_needs_rediss(self) -> Settings:
        tls_files = [
            name
            for name in ("redis_tls_ca_file", "redis_tls_cert_file", "redis_tls_key_file")
            if getattr(self, name) is not None
        ]
        if tls_files and not self.redis_url.lower().startswith("rediss://"):
            raise ValueError(f"{', '.join(tls_files)} need a rediss:// redis_url")
        if (self.redis_tls_cert_file is None) != (self.redis_tls_key_file is None):
            raise ValueError("redis_tls_cert_file and redis_tls_key_file go together")
        return self

    @field_validator("admin_token", "redis_password", mode="after")
    @classmethod
    def _empty_token_is_none(cls, value: SecretStr | None) -> SecretStr | None:
        # T2DIFF_ADMIN_TOKEN= (empty) must not enable admin with an empty password; an empty
        # T2DIFF_REDIS_PASSWORD= (an optional Secret key left empty) means no password.
        if value is not None and not value.get_secret_value().strip():
            return None
        return value
