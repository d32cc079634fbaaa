"""``t2diff rebuild | promote | rollback | release status | release validate``: thin.

Each command parses its options into the release room's settings (``release.settings``),
calls it (``release.pipeline``, ``release.validate``, ``release.links``) and turns a
``release.errors.ReleaseError`` into ``error: <message>`` on stderr and its ``exit_code``.
The pipeline itself, its checks and the links live in ``release/``; heavy imports (torch,
FAISS) happen inside the commands.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from release.errors import ReleaseError
from release.links import (
    check_version_name,
    current_links,
    current_version,
    list_versions,
    previous_version,
    rollback,
)
from release.settings import (
    DEFAULT_MAX_RATIO,
    DEFAULT_MIN_RATIO,
    DEFAULT_MIN_RECALL,
    DEFAULT_VALIDATION_QUERIES,
    RebuildSettings,
    ValidationThresholds,
)
from t2diff_cli.common import fail, parse_overrides

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


@contextmanager
def _reported() -> Iterator[None]:
    """A ``ReleaseError`` becomes ``error: <message>`` and its exit code (1, or 2 for bad
    usage); anything else is a bug and keeps its traceback."""
    try:
        yield
    except ReleaseError as exc:
        fail(str(exc), code=exc.exit_code)


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
    ] = DEFAULT_MIN_RECALL,
    min_ratio: Annotated[
        float, typer.Option(envvar="T2DIFF_REBUILD_MIN_RATIO", help="items >= this x previous")
    ] = DEFAULT_MIN_RATIO,
    max_ratio: Annotated[
        float, typer.Option(envvar="T2DIFF_REBUILD_MAX_RATIO", help="items <= this x previous")
    ] = DEFAULT_MAX_RATIO,
    validation_queries: int = DEFAULT_VALIDATION_QUERIES,
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
    from release.pipeline import rebuild as run_rebuild

    settings = RebuildSettings(
        root=root,
        version=version,
        run=run,
        runs_dir=runs_dir,
        artifacts=artifacts,
        retrain=retrain,
        data=data,
        model=model,
        model_overrides=parse_overrides(model_set or []),
        epochs=epochs,
        device=device,
        factory=factory,
        nprobe=nprobe,
        thresholds=ValidationThresholds(min_recall, min_ratio, max_ratio, validation_queries),
        keep=keep,
        keep_failed=keep_failed,
        noise_seed=noise_seed,
    )
    with _reported():
        run_rebuild(settings, echo=typer.echo)


def promote_cmd(
    version: Annotated[str, typer.Argument(help="version present in artifacts/ and indexes/")],
    root: RootOption = Path("."),
    validate: Annotated[bool, typer.Option(help="validate before switching")] = True,
    min_recall: MinRecall = DEFAULT_MIN_RECALL,
    min_ratio: MinRatio = DEFAULT_MIN_RATIO,
    max_ratio: MaxRatio = DEFAULT_MAX_RATIO,
) -> None:
    """Validate VERSION and point artifacts/current and indexes/current at it."""
    from release.pipeline import promote_version

    thresholds = ValidationThresholds(min_recall, min_ratio, max_ratio)
    with _reported():
        promote_version(root, version, thresholds, validate=validate, echo=typer.echo)


def rollback_cmd(root: RootOption = Path(".")) -> None:
    """Point both current links back at the previously promoted version."""
    with _reported():
        entry = rollback(root.resolve())
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
    min_recall: MinRecall = DEFAULT_MIN_RECALL,
    min_ratio: MinRatio = DEFAULT_MIN_RATIO,
    max_ratio: MaxRatio = DEFAULT_MAX_RATIO,
) -> None:
    """Run the release checks on VERSION without promoting it (exit 1 on failure)."""
    from release.validate import validate_version

    thresholds = ValidationThresholds(min_recall, min_ratio, max_ratio)
    with _reported():
        report = validate_version(root.resolve(), check_version_name(version), thresholds)
    for line in report.lines():
        typer.echo(line)
    if not report.ok:
        fail(report.reason(), code=1)


def register(app: typer.Typer) -> None:
    """Add the release commands to the ``t2diff`` app."""
    app.command("rebuild")(rebuild)
    app.command("promote")(promote_cmd)
    app.command("rollback")(rollback_cmd)
    app.add_typer(release_app, name="release")
