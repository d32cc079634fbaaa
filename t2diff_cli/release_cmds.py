"""``t2diff rebuild | promote | rollback | release status | release validate``.

The nightly job (compose service ``rebuild``, k8s CronJob ``t2diff-rebuild``) runs
``t2diff rebuild``: export the newest trained run (or retrain), build the index, validate
the pair, and only then switch the ``current`` links.  The layout and the link switching
are ``contracts/release.py``; the checks are ``index_builder/validate.py``.  Heavy imports
(torch, FAISS) happen inside the commands.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from contracts.release import (
    REBUILD_LOCK_FILE,
    ReleaseError,
    append_history,
    artifacts_dir,
    check_version_name,
    current_links,
    current_version,
    index_dir,
    list_versions,
    mark_failed,
    previous_version,
    promote,
    prune,
    release_lock,
    rollback,
)

release_app = typer.Typer(help="Versions on disk and the current links.", no_args_is_help=True)

RootOption = Annotated[
    Path,
    typer.Option(
        envvar="T2DIFF_DATA_ROOT",
        help="folder holding artifacts/, indexes/, runs/ and releases.jsonl",
    ),
]
MinRecall = Annotated[
    float, typer.Option(help="validation: recall@100 vs exact search must reach this")
]
MinRatio = Annotated[float, typer.Option(help="validation: item count >= this x previous")]
MaxRatio = Annotated[float, typer.Option(help="validation: item count <= this x previous")]


class RebuildError(RuntimeError):
    """A rebuild step failed; the message is the reason printed to the operator."""


def _fail(message: str, code: int = 1) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=code)


def _new_version() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


def newest_run(runs_dir: Path) -> Path:
    """The run under ``runs_dir`` whose trained model (``model.pt``) is the newest."""
    candidates = (
        [p for p in runs_dir.glob("*/model.pt") if p.is_file()] if runs_dir.is_dir() else []
    )
    if not candidates:
        raise RebuildError(f"no run with a trained model (model.pt) under {runs_dir}")
    return max(candidates, key=lambda p: (p.stat().st_mtime, str(p))).parent


def _copy_export(source: Path, dest: Path) -> None:
    """Copy a ready export into ``dest`` (hidden temp dir + rename), rewriting its version."""
    from contracts.manifest import read_manifest, write_manifest

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


def validate_version(
    root: Path,
    version: str,
    min_recall: float,
    min_ratio: float,
    max_ratio: float,
    queries: int = 200,
) -> Any:
    """Validate ``version`` against the currently served one; returns the report."""
    from index_builder.loaded import configure_threads
    from index_builder.validate import validate_release

    configure_threads(os.cpu_count() or 1)
    current = current_version(root)
    previous_dir = index_dir(root, current) if current and current != version else None
    if previous_dir is not None and not previous_dir.is_dir():
        previous_dir = None
    return validate_release(
        artifacts_dir(root, version),
        index_dir(root, version),
        previous_index_dir=previous_dir,
        min_recall=min_recall,
        min_ratio=min_ratio,
        max_ratio=max_ratio,
        n_queries=queries,
        serving_check=serving_check,
    )


def serving_check(artifacts: Path, index: Path) -> dict[str, Any]:
    """The ``serving`` check: the candidate loads through the service's own loader and
    answers a warm-up recall (``service.release_check``).  Without the serving extras it
    fails: a version nobody checked the service can load is not promoted."""
    try:
        from service.release_check import check_serving
    except ImportError as exc:
        raise RebuildError(
            f"cannot load the service to check the version (pip install .[serve]): {exc}"
        ) from exc
    return check_serving(artifacts, index)


def _print_report(report: Any) -> None:
    for name, note in report.checks.items():
        typer.echo(f"  {name:<12} {note}")


def rebuild(
    root: RootOption = Path("."),
    run: Annotated[Path | None, typer.Option(help="run to export (default: newest)")] = None,
    runs_dir: Annotated[
        Path | None, typer.Option(help="where to look for the newest run (default ROOT/runs)")
    ] = None,
    artifacts: Annotated[
        Path | None, typer.Option(help="use this ready export instead of exporting a run")
    ] = None,
    retrain: Annotated[
        bool, typer.Option(envvar="T2DIFF_REBUILD_RETRAIN", help="train first (needs --data)")
    ] = False,
    data: Annotated[
        Path | None, typer.Option(envvar="T2DIFF_REBUILD_DATA", help="interactions to retrain on")
    ] = None,
    model: Annotated[str, typer.Option(help="model name for --retrain")] = "t2diff",
    model_set: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="model option key=value for --retrain, repeatable "
            "(e.g. unet_width=16, what the bootstrap serves)",
        ),
    ] = None,
    epochs: Annotated[int, typer.Option(envvar="T2DIFF_REBUILD_EPOCHS")] = 20,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda for --retrain")] = "auto",
    version: Annotated[str | None, typer.Option(help="new version (default: UTC time)")] = None,
    factory: Annotated[str | None, typer.Option(help="FAISS factory string")] = None,
    nprobe: int | None = None,
    min_recall: Annotated[
        float,
        typer.Option(envvar="T2DIFF_REBUILD_MIN_RECALL", help="validation: recall@100 floor"),
    ] = 0.9,
    min_ratio: Annotated[
        float, typer.Option(envvar="T2DIFF_REBUILD_MIN_RATIO", help="items >= this x previous")
    ] = 0.5,
    max_ratio: Annotated[
        float, typer.Option(envvar="T2DIFF_REBUILD_MAX_RATIO", help="items <= this x previous")
    ] = 2.0,
    validation_queries: int = 200,
    keep: Annotated[
        int,
        typer.Option(envvar="T2DIFF_REBUILD_KEEP", help="versions kept (current, previous too)"),
    ] = 5,
    keep_failed: Annotated[
        bool, typer.Option(help="rename a failed version to .failed-VERSION, not delete")
    ] = False,
    noise_seed: int = 0,
) -> None:
    """Nightly: export (or retrain), build, VALIDATE, then promote; prune old versions.

    A failed step or check leaves `current` untouched, removes the new version (or keeps it
    hidden with --keep-failed), records it in releases.jsonl and exits 1 with the reason.
    """
    root = root.resolve()
    version = check_version_name(version or _new_version())
    if retrain and data is None:
        _fail("--retrain needs --data", code=2)
    if sum(x is not None for x in (run, artifacts)) + int(retrain) > 1:
        _fail("give at most one of --run, --artifacts, --retrain", code=2)
    from t2diff_cli.main import _parse_overrides  # main imports this module

    model_overrides = _parse_overrides(model_set or [])
    try:
        with release_lock(root, wait=False, name=REBUILD_LOCK_FILE):
            _rebuild_locked(
                root, version, run, runs_dir, artifacts, retrain, data, model, model_overrides,
                epochs, device,
                factory, nprobe, min_recall, min_ratio, max_ratio, validation_queries, keep,
                keep_failed, noise_seed,
            )  # fmt: skip
    except ReleaseError as exc:
        _fail(str(exc))


def _rebuild_locked(
    root: Path,
    version: str,
    run: Path | None,
    runs_dir: Path | None,
    artifacts: Path | None,
    retrain: bool,
    data: Path | None,
    model: str,
    model_overrides: dict[str, Any],
    epochs: int,
    device: str,
    factory: str | None,
    nprobe: int | None,
    min_recall: float,
    min_ratio: float,
    max_ratio: float,
    validation_queries: int,
    keep: int,
    keep_failed: bool,
    noise_seed: int,
) -> None:
    a_dir, i_dir = artifacts_dir(root, version), index_dir(root, version)
    if a_dir.exists() or i_dir.exists():
        _fail(f"version {version} already exists under {root}", code=2)
    served = current_version(root)
    typer.echo(f"rebuild {version} under {root} (serving {served or 'nothing'})")
    a_dir.parent.mkdir(parents=True, exist_ok=True)
    i_dir.parent.mkdir(parents=True, exist_ok=True)
    step = "source"
    try:
        if artifacts is not None:
            step = "copy export"
            _copy_export(artifacts.resolve(), a_dir)
        else:
            if retrain:
                step = "train"
                from model.train import DataSource, TrainConfig, train_run

                run = root / "runs" / version
                typer.echo(f"training {model} on {data} into {run}")
                train_run(
                    DataSource(str(Path(data).resolve())),  # type: ignore[arg-type]
                    run,
                    model,
                    model_overrides,
                    TrainConfig(epochs=epochs, device=device, progress=False),
                )
            elif run is None:
                run = newest_run(runs_dir or root / "runs")
            if not (run / "model.pt").is_file():
                raise RebuildError(f"{run}: no trained model (model.pt)")
            step = "export"
            typer.echo(f"exporting {run} -> {a_dir}")
            from model.export import export_run

            export_run(run, a_dir, version, noise_seed)
        step = "build-index"
        from index_builder.build import build_from_artifacts
        from index_builder.loaded import configure_threads

        configure_threads(os.cpu_count() or 1)
        manifest = build_from_artifacts(
            a_dir, i_dir, factory=factory, nprobe=nprobe, index_version=version
        )
        typer.echo(
            f"index {version}: {manifest['factory']} nprobe {manifest['nprobe']} k_factor "
            f"{manifest['k_factor']} recall@100 {manifest['recall_at_100']:.4f}, "
            f"{manifest['bytes_per_item']:.0f} bytes/item"
        )
        step = "validate"
        report = validate_version(
            root, version, min_recall, min_ratio, max_ratio, validation_queries
        )
        _print_report(report)
        if not report.ok:
            raise RebuildError(f"validation failed: {report.reason()}")
    except Exception as exc:  # noqa: BLE001 - every failure is reported, current kept
        reason = str(exc) if isinstance(exc, RebuildError) else f"{step}: {exc!r}"
        kept = mark_failed(root, version, keep=keep_failed)
        with release_lock(root):
            append_history(root, {"event": "failed", "version": version, "reason": reason})
        where = f" (kept in {', '.join(map(str, kept))})" if kept else ""
        _fail(f"rebuild {version} failed, still serving {served or 'nothing'}{where}: {reason}")
    entry = promote(root, version, validation=report.as_dict())
    typer.echo(f"promoted {version} (previous {entry['previous']})")
    removed = prune(root, keep)
    if removed:
        typer.echo(f"pruned {', '.join(removed)}")


def promote_cmd(
    version: Annotated[str, typer.Argument(help="version present in artifacts/ and indexes/")],
    root: RootOption = Path("."),
    validate: Annotated[bool, typer.Option(help="validate before switching")] = True,
    min_recall: MinRecall = 0.9,
    min_ratio: MinRatio = 0.5,
    max_ratio: MaxRatio = 2.0,
) -> None:
    """Validate VERSION and point artifacts/current and indexes/current at it."""
    root = root.resolve()
    try:
        check_version_name(version)
        details: dict[str, Any] = {}
        if validate:
            report = validate_version(root, version, min_recall, min_ratio, max_ratio)
            _print_report(report)
            if not report.ok:
                _fail(f"{version} not promoted: {report.reason()}")
            details["validation"] = report.as_dict()
        entry = promote(root, version, **details)
    except ReleaseError as exc:
        _fail(str(exc))
    typer.echo(f"promoted {version} (previous {entry['previous']})")


def rollback_cmd(root: RootOption = Path(".")) -> None:
    """Point both current links back at the previously promoted version."""
    try:
        entry = rollback(root.resolve())
    except ReleaseError as exc:
        _fail(str(exc))
    typer.echo(f"rolled back {entry['previous']} -> {entry['version']}")


@release_app.command("status")
def status(
    root: RootOption = Path("."),
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable")] = False,
) -> None:
    """List versions on disk, which one is current and which a rollback would restore."""
    root = root.resolve()
    versions = list_versions(root)
    artifacts_link, index_link = current_links(root)
    links = {
        "artifacts": os.readlink(artifacts_link) if artifacts_link.is_symlink() else None,
        "indexes": os.readlink(index_link) if index_link.is_symlink() else None,
    }
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "root": str(root),
                    "current": current_version(root),
                    "previous": previous_version(root),
                    "links": links,
                    "versions": [v.__dict__ for v in versions],
                },
                indent=2,
            )
        )
        return
    typer.echo(f"root {root}: artifacts/current -> {links['artifacts']}, "
               f"indexes/current -> {links['indexes']}")  # fmt: skip
    for info in versions:
        mark = "current" if info.current else "previous" if info.previous else ""
        parts = "".join(("A" if info.has_artifacts else "-", "I" if info.has_index else "-"))
        stamp = datetime.fromtimestamp(info.mtime, UTC).isoformat(timespec="seconds")
        typer.echo(f"  {info.name:<28} {parts}  {stamp}  {mark}")


@release_app.command("validate")
def validate_cmd(
    version: str,
    root: RootOption = Path("."),
    min_recall: MinRecall = 0.9,
    min_ratio: MinRatio = 0.5,
    max_ratio: MaxRatio = 2.0,
) -> None:
    """Run the release checks on VERSION without promoting it (exit 1 on failure)."""
    root = root.resolve()
    report = validate_version(root, check_version_name(version), min_recall, min_ratio, max_ratio)
    _print_report(report)
    if not report.ok:
        _fail(report.reason())


def register(app: typer.Typer) -> None:
    """Add the release commands to the ``t2diff`` app."""
    app.command("rebuild")(rebuild)
    app.command("promote")(promote_cmd)
    app.command("rollback")(rollback_cmd)
    app.add_typer(release_app, name="release")
