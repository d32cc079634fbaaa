"""The settings of one release operation: plain dataclasses, no heavy imports, so the CLI
can build them at start-up and tests can construct them directly."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_MIN_RECALL = 0.9
DEFAULT_MIN_RATIO = 0.5
DEFAULT_MAX_RATIO = 2.0
DEFAULT_VALIDATION_QUERIES = 200


@dataclass(frozen=True)
class ValidationThresholds:
    """What a version must reach to be promoted (``release.validate.validate_release``)."""

    #: recall@100 of the index against exact search.
    min_recall: float = DEFAULT_MIN_RECALL
    #: item count within [min_ratio, max_ratio] x the served version's.
    min_ratio: float = DEFAULT_MIN_RATIO
    max_ratio: float = DEFAULT_MAX_RATIO
    #: queries the recall check runs.
    queries: int = DEFAULT_VALIDATION_QUERIES


@dataclass(frozen=True)
class RebuildSettings:
    """One ``t2diff rebuild`` (the defaults are the CLI's).

    The version's source is one of: ``artifacts`` (a ready export, copied), ``retrain``
    (train on ``data`` into ``ROOT/runs/VERSION``, then export), ``run`` (export that run),
    or, when none is given, the newest trained run under ``runs_dir`` (``ROOT/runs``).
    """

    root: Path
    #: the new version's name (default: the UTC time, ``20260101T000000Z``).
    version: str | None = None
    run: Path | None = None
    runs_dir: Path | None = None
    artifacts: Path | None = None
    retrain: bool = False
    data: Path | None = None
    #: model name and options (``--set``) for ``retrain``.
    model: str = "t2diff"
    model_overrides: Mapping[str, Any] = field(default_factory=dict)
    epochs: int = 20
    device: str = "auto"
    #: FAISS factory string and nprobe (default: chosen by the index builder).
    factory: str | None = None
    nprobe: int | None = None
    thresholds: ValidationThresholds = field(default_factory=ValidationThresholds)
    #: versions kept on disk after a promotion (the current and previous ones always are).
    keep: int = 5
    #: rename a failed version to ``.failed-VERSION`` rather than delete it.
    keep_failed: bool = False
    noise_seed: int = 0
