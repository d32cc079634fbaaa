"""The nightly rebuild and the manual promotion, as library calls.

:func:`rebuild` is what ``t2diff rebuild`` (compose service ``rebuild``, k8s CronJob
``t2diff-rebuild``) runs: under the rebuild lock, produce a new version (copy a ready
export, or retrain and/or export a run), build its FAISS index, VALIDATE it against the
served version (:func:`release.validate.validate_version`) and only then switch the
``current`` links (:func:`release.links.promote`) and prune old versions.  Any failure
removes the new version (or hides it with ``keep_failed``), records it in
``releases.jsonl``, leaves ``current`` untouched and raises :class:`RebuildFailed`.

Nothing here exits or prints to stderr: errors are :mod:`release.errors` (the CLI prints
them and exits with their ``exit_code``), progress lines go to ``echo``.  Heavy imports
(torch, FAISS, ONNX) happen inside the steps that need them, so the CLI starts fast.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from contracts.manifest import read_manifest, write_manifest
from release.errors import RebuildError, RebuildFailed, ReleaseUsageError, ValidationFailed
from release.links import (
    REBUILD_LOCK_FILE,
    append_history,
    artifacts_dir,
    check_version_name,
    current_version,
    index_dir,
    mark_failed,
    promote,
    prune,
    release_lock,
)
from release.settings import RebuildSettings, ValidationThresholds

if TYPE_CHECKING:
    from release.validate import ValidationReport

Echo = Callable[[str], None]


def new_version() -> str:
    """The default version name: the UTC time to the second (sorts by age)."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


def newest_run(runs_dir: Path) -> Path:
    """The run under ``runs_dir`` whose trained model (``model.pt``) is the newest."""
    candidates = (
        [p for p in runs_dir.glob("*/model.pt") if p.is_file()] if runs_dir.is_dir() else []
    )
    if not candidates:
        raise RebuildError(f"no run with a trained model (model.pt) under {runs_dir}")
    return max(candidates, key=lambda p: (p.stat().st_mtime, str(p))).parent


def copy_export(source: Path, dest: Path) -> None:
    """Copy a ready export into ``dest`` (hidden temp dir + rename), rewriting its version."""
    read_manifest(source, verify=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.tmp-"))
    try:
        for path in source.iterdir():
            if path.is_file() and not path.name.startswith("."):
                shutil.copy2(path, tmp / path.name)
        manifest = read_manifest(tmp, verify=True)
        fields = {k: v for k, v in manifest.items() if k not in ("files", "schema_version")}
        write_manifest(tmp, {**fields, "model_version": dest.name, "copied_from": str(source)})
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_settings(settings: RebuildSettings) -> str:
    """The version name to build; raises before anything is locked or written."""
    version = check_version_name(settings.version or new_version())
    if settings.retrain and settings.data is None:
        raise ReleaseUsageError("--retrain needs --data")
    sources = sum(x is not None for x in (settings.run, settings.artifacts))
    if sources + int(settings.retrain) > 1:
        raise ReleaseUsageError("give at most one of --run, --artifacts, --retrain")
    return version


def rebuild(settings: RebuildSettings, echo: Echo = print) -> dict[str, Any]:
    """One nightly rebuild (see the module docstring); returns the promotion's history entry.

    Raises :class:`ReleaseUsageError` (bad settings, the version exists),
    :class:`ReleaseError` (another rebuild holds the lock) or :class:`RebuildFailed` (a
    step or the validation failed; ``current`` untouched).
    """
    root = Path(settings.root).resolve()
    version = check_settings(settings)
    # Non-blocking: a second rebuild started while one runs (a slow night, a manual run)
    # fails at once rather than queueing behind it.
    with release_lock(root, wait=False, name=REBUILD_LOCK_FILE):
        return _rebuild_locked(settings, root, version, echo)


def _rebuild_locked(
    settings: RebuildSettings, root: Path, version: str, echo: Echo
) -> dict[str, Any]:
    a_dir, i_dir = artifacts_dir(root, version), index_dir(root, version)
    if a_dir.exists() or i_dir.exists():
        raise ReleaseUsageError(f"version {version} already exists under {root}")
    served = current_version(root)
    echo(f"rebuild {version} under {root} (serving {served or 'nothing'})")
    a_dir.parent.mkdir(parents=True, exist_ok=True)
    i_dir.parent.mkdir(parents=True, exist_ok=True)
    # The step names are the prefix of an unexpected error's reason in releases.jsonl.
    step = "source"
    report: ValidationReport | None = None
    try:
        if settings.artifacts is not None:
            step = "copy export"
            copy_export(Path(settings.artifacts).resolve(), a_dir)
        else:
            run = settings.run
            if settings.retrain:
                step = "train"
                from model.train import DataSource, TrainConfig, train_run

                assert settings.data is not None  # check_settings
                run = root / "runs" / version
                echo(f"training {settings.model} on {settings.data} into {run}")
                train_run(
                    DataSource(str(Path(settings.data).resolve())),
                    run,
                    settings.model,
                    dict(settings.model_overrides),
                    TrainConfig(epochs=settings.epochs, device=settings.device, progress=False),
                )
            elif run is None:
                run = newest_run(settings.runs_dir or root / "runs")
            if not (run / "model.pt").is_file():
                raise RebuildError(f"{run}: no trained model (model.pt)")
            step = "export"
            echo(f"exporting {run} -> {a_dir}")
            from model.export import export_run

            export_run(run, a_dir, version, settings.noise_seed)
        step = "build-index"
        from index_builder.build import build_from_artifacts
        from index_builder.loaded import configure_threads

        configure_threads(os.cpu_count() or 1)
        manifest = build_from_artifacts(
            a_dir, i_dir, factory=settings.factory, nprobe=settings.nprobe, index_version=version
        )
        echo(
            f"index {version}: {manifest['factory']} nprobe {manifest['nprobe']} k_factor "
            f"{manifest['k_factor']} recall@100 {manifest['recall_at_100']:.4f}, "
            f"{manifest['bytes_per_item']:.0f} bytes/item"
        )
        step = "validate"
        from release.validate import validate_version

        report = validate_version(root, version, settings.thresholds)
        for line in report.lines():
            echo(line)
        if not report.ok:
            raise ValidationFailed(f"validation failed: {report.reason()}", report)
    except Exception as exc:  # noqa: BLE001 - every failure is reported, current kept
        known = isinstance(exc, RebuildError | ValidationFailed)
        reason = str(exc) if known else f"{step}: {exc!r}"
        kept = mark_failed(root, version, keep=settings.keep_failed)
        with release_lock(root):
            append_history(root, {"event": "failed", "version": version, "reason": reason})
        raise RebuildFailed(
            version=version, served=served, step=step, reason=reason, kept=kept, report=report
        ) from exc
    entry = promote(root, version, validation=report.as_dict())
    echo(f"promoted {version} (previous {entry['previous']})")
    removed = prune(root, settings.keep)
    if removed:
        echo(f"pruned {', '.join(removed)}")
    return entry


def promote_version(
    root: Path,
    version: str,
    thresholds: ValidationThresholds | None = None,
    validate: bool = True,
    echo: Echo = print,
) -> dict[str, Any]:
    """Validate ``version`` (unless ``validate`` is False) and switch both ``current``
    links to it; returns the history entry.  Raises :class:`ValidationFailed` (nothing
    switched) or :class:`ReleaseError`."""
    root = Path(root).resolve()
    check_version_name(version)
    details: dict[str, Any] = {}
    if validate:
        from release.validate import validate_version

        report = validate_version(root, version, thresholds)
        for line in report.lines():
            echo(line)
        if not report.ok:
            raise ValidationFailed(f"{version} not promoted: {report.reason()}", report)
        details["validation"] = report.as_dict()
    entry = promote(root, version, **details)
    echo(f"promoted {version} (previous {entry['previous']})")
    return entry
