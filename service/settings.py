"""Service configuration, read from ``T2DIFF_*`` environment variables (or passed in).

One flat class so that every knob of the serving process is listed in one place and can be
set from a container's environment: ``T2DIFF_ARTIFACTS_DIR=/models/v3 T2DIFF_NPROBE=16 ...``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
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
    redis_url: str = "redis://localhost:6379/0"
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

    # Threads.  FAISS defaults to one OpenMP thread per core *per call*; with concurrent
    # requests that oversubscribes the CPU, so serving uses 1 and scales by concurrency.
    faiss_threads: int = Field(default=1, gt=0)
    ort_intra_threads: int | None = Field(default=None, gt=0, description="None = ORT default")

    # HTTP server.
    host: str = "127.0.0.1"
    port: int = Field(default=8000, gt=0, lt=65536)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, value: object) -> object:
        # T2DIFF_LOG_LEVEL=INFO and =info both work; uvicorn wants lower case.
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _k_bounds(self) -> Settings:
        if self.default_k > self.max_k:
            raise ValueError(f"default_k ({self.default_k}) exceeds max_k ({self.max_k})")
        return self
