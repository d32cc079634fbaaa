"""Release layout: versioned model + index directories and the ``current`` links that pick one.

Plain Python (no FAISS, no torch) over ``contracts.manifest``, so the service can import it
(``POST /admin/rollback`` runs :func:`rollback`; the one import of this package the layering
contract allows the service).  Layout under a root
(``/data`` in the containers, the working directory by default)::

    ROOT/
      artifacts/VERSION/        user-tower export (manifest.json, user_tower.onnx, ...)
      artifacts/current -> VERSION      relative symlink: valid wherever ROOT is mounted
      indexes/VERSION/          FAISS index built from artifacts/VERSION (manifest.json, ...)
      indexes/current -> VERSION
      releases.jsonl            promotion history, one JSON object per line (see below)
      .release.lock             flock(2) lock held while promoting / rolling back / pruning

A version is the same name in both folders; the index manifest's ``model_version`` equals
the export's.  The service reads ``T2DIFF_ARTIFACTS_DIR=ROOT/artifacts/current`` and
``T2DIFF_INDEX_DIR=ROOT/indexes/current`` and resolves both links
(:func:`resolve_current`).

Promotion (:func:`promote`) switches each link atomically: a new symlink with a temporary
name is created beside it and renamed over it with ``os.replace`` (rename(2)), so a reader
sees the old target or the new one, never a missing link or a half-written one.  The two
links cannot switch as one, so the index link is switched first and the artifacts link
second (the order ``deploy/scripts/bootstrap.sh`` uses); a reader that resolves in between
sees two versions whose manifests report different ``model_version`` values and must retry
(:func:`resolve_consistent` does).  Version directories are never modified once written.

History: every promotion, rollback, failed rebuild and pruned version appends one line to
``releases.jsonl`` (``{"event": "promote" | "rollback" | "failed" | "prune", "version":
..., "previous": ..., "at": ISO-8601 UTC, ...}``).  The file is rewritten whole with a
temporary file + ``os.replace`` under the lock, so it is never seen half-written.  The
version stack derived from it (:func:`promotion_stack`) gives the rollback target: the
version promoted before the current one, skipping versions that were rolled back from.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from contracts.manifest import MANIFEST_NAME, atomic_write_text
from release.errors import ReleaseError

ARTIFACTS_DIRNAME = "artifacts"
INDEXES_DIRNAME = "indexes"
CURRENT_LINK = "current"
HISTORY_FILE = "releases.jsonl"
LOCK_FILE = ".release.lock"
#: Held for the whole of a ``t2diff rebuild`` (two rebuilds never run at once).
REBUILD_LOCK_FILE = ".rebuild.lock"
#: Prefix of a failed version kept for inspection (``rebuild --keep-failed``); hidden, so
#: it is never listed as a version.
FAILED_PREFIX = ".failed-"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def artifacts_dir(root: Path, version: str) -> Path:
    return Path(root) / ARTIFACTS_DIRNAME / version


def index_dir(root: Path, version: str) -> Path:
    return Path(root) / INDEXES_DIRNAME / version


def current_links(root: Path) -> tuple[Path, Path]:
    """(``ROOT/artifacts/current``, ``ROOT/indexes/current``)."""
    root = Path(root)
    return root / ARTIFACTS_DIRNAME / CURRENT_LINK, root / INDEXES_DIRNAME / CURRENT_LINK


def check_version_name(version: str) -> str:
    """A version is one plain path component that is not ``current`` nor hidden."""
    if (
        not version
        or version in (CURRENT_LINK, ".", "..")
        or version.startswith(".")
        or "/" in version
        or "\\" in version
        or "\0" in version
    ):
        raise ReleaseError(f"invalid version name {version!r}")
    return version


# --------------------------------------------------------------------------- links


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def switch_link(link: Path, target: str) -> None:
    """Point ``link`` at ``target`` (a relative name) atomically: temp symlink + os.replace."""
    link = Path(link)
    tmp = link.parent / f".{link.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(link.parent)


def link_target(link: Path) -> str | None:
    """The version name a ``current`` link points at, or None if there is no link."""
    try:
        return Path(os.readlink(link)).name
    except (FileNotFoundError, OSError):
        return None


def resolve_current(artifacts_link: Path, index_link: Path) -> tuple[Path, Path]:
    """Real paths ``(artifacts_dir, index_dir)`` behind the two ``current`` links.

    Each link is resolved once (``os.path.realpath``), so the result names real version
    directories that stay valid even if the links are switched right after.  Raises
    :class:`ReleaseError` when a link is missing or dangling.  The pair may straddle a
    promotion (index switched, artifacts not yet): compare the manifests' ``model_version``
    or use :func:`resolve_consistent`.
    """
    resolved = []
    for link in (Path(artifacts_link), Path(index_link)):
        real = Path(os.path.realpath(link))
        if not real.is_dir():
            raise ReleaseError(f"{link} does not resolve to a directory ({real})")
        resolved.append(real)
    return resolved[0], resolved[1]


def manifest_model_version(directory: Path) -> str | None:
    """``model_version`` from ``directory/manifest.json`` without verifying checksums."""
    try:
        data = json.loads((Path(directory) / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = data.get("model_version") if isinstance(data, dict) else None
    return str(value) if value is not None else None


def resolve_consistent(
    artifacts_link: Path, index_link: Path, attempts: int = 20, delay_s: float = 0.05
) -> tuple[Path, Path]:
    """:func:`resolve_current`, retried until both manifests report the same model_version.

    Raises :class:`ReleaseError` if they still disagree after ``attempts`` tries.
    """
    last = ""
    for attempt in range(max(1, attempts)):
        artifacts, index = resolve_current(artifacts_link, index_link)
        a_version, i_version = manifest_model_version(artifacts), manifest_model_version(index)
        if a_version is not None and a_version == i_version:
            return artifacts, index
        last = f"artifacts {artifacts.name} ({a_version}) vs index {index.name} ({i_version})"
        if attempt + 1 < attempts:
            time.sleep(delay_s)
    raise ReleaseError(f"current links disagree: {last}")


# --------------------------------------------------------------------------- history


@contextlib.contextmanager
def release_lock(root: Path, wait: bool = True, name: str = LOCK_FILE) -> Iterator[None]:
    """Exclusive lock on ``ROOT/.release.lock``: one promotion/rollback/prune at a time.

    flock(2) locks belong to an open file, so a process must not take the same lock twice
    (it would wait for itself); ``name=REBUILD_LOCK_FILE`` is the rebuild's own lock.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    handle = open(root / name, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError as exc:
            raise ReleaseError(f"{root}: another process holds {name}") from exc
        yield
    finally:
        handle.close()  # releases the lock


def read_history(root: Path) -> list[dict[str, Any]]:
    """Entries of ``releases.jsonl`` (lines that don't parse are skipped)."""
    path = Path(root) / HISTORY_FILE
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    entries = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


def append_history(root: Path, entry: dict[str, Any]) -> dict[str, Any]:
    """Append one entry (``at`` added): the file is rewritten whole and renamed into place.

    Call it under :func:`release_lock` when other writers may run.
    """
    path = Path(root) / HISTORY_FILE
    entry = {"at": _now(), **entry}
    try:
        old = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        old = ""
    if old and not old.endswith("\n"):
        old += "\n"
    atomic_write_text(path, old + json.dumps(entry, sort_keys=True) + "\n")
    return entry


def promotion_stack(root: Path) -> list[str]:
    """Versions in promotion order, rolled-back ones removed; the last one is current.

    ``promote V`` pushes V; ``rollback`` to V pops the top (the version rolled back from).
    When the history is empty but ``current`` links exist (a bootstrap that did not record
    itself), the stack is just the current version.
    """
    stack: list[str] = []
    for entry in read_history(root):
        version = entry.get("version")
        if not isinstance(version, str):
            continue
        if entry.get("event") == "promote":
            if not stack or stack[-1] != version:
                stack.append(version)
        elif entry.get("event") == "rollback":
            if stack:
                stack.pop()
            if not stack or stack[-1] != version:
                stack.append(version)
    current = current_version(root)
    if current is not None and (not stack or stack[-1] != current):
        stack.append(current)  # links switched outside this module (e.g. bootstrap.sh)
    return stack


def current_version(root: Path) -> str | None:
    """The version both ``current`` links name, the index link's if they differ."""
    artifacts_link, index_link = current_links(root)
    return link_target(index_link) or link_target(artifacts_link)


def previous_version(root: Path) -> str | None:
    """The version a rollback would return to (still present on disk), or None."""
    stack = promotion_stack(root)
    for version in reversed(stack[:-1]):
        if version != stack[-1] and _version_present(root, version):
            return version
    return None


def _version_present(root: Path, version: str) -> bool:
    return artifacts_dir(root, version).is_dir() and index_dir(root, version).is_dir()


# --------------------------------------------------------------------------- operations


def _switch_both(root: Path, version: str) -> None:
    artifacts_link, index_link = current_links(root)
    # Index first, artifacts last (as bootstrap.sh): see the module docstring.
    switch_link(index_link, version)
    switch_link(artifacts_link, version)


def promote(root: Path, version: str, event: str = "promote", **details: Any) -> dict[str, Any]:
    """Point both ``current`` links at ``version`` and record it; returns the history entry.

    The version directories must exist (validation is the caller's job: ``t2diff
    promote`` / ``t2diff rebuild`` validate before calling this).
    """
    root = Path(root)
    check_version_name(version)
    if not _version_present(root, version):
        raise ReleaseError(
            f"{version}: needs both {artifacts_dir(root, version)} and {index_dir(root, version)}"
        )
    with release_lock(root):
        previous = current_version(root)
        # Record the version the links held before, if they were set outside this module.
        if previous is not None and previous not in promotion_stack_versions(root):
            append_history(root, {"event": "promote", "version": previous, "adopted": True})
        _switch_both(root, version)
        return append_history(
            root, {"event": event, "version": version, "previous": previous, **details}
        )


def promotion_stack_versions(root: Path) -> set[str]:
    return {
        e["version"]
        for e in read_history(root)
        if e.get("event") in ("promote", "rollback") and isinstance(e.get("version"), str)
    }


def rollback(root: Path, **details: Any) -> dict[str, Any]:
    """Return both links to :func:`previous_version`; raises :class:`ReleaseError` if none."""
    root = Path(root)
    with release_lock(root):
        current = current_version(root)
        target = previous_version(root)
        if target is None:
            raise ReleaseError(f"{root}: no previous version to roll back to")
        _switch_both(root, target)
        return append_history(
            root, {"event": "rollback", "version": target, "previous": current, **details}
        )


@dataclass(frozen=True)
class VersionInfo:
    name: str
    has_artifacts: bool
    has_index: bool
    current: bool
    previous: bool
    mtime: float


def list_versions(root: Path) -> list[VersionInfo]:
    """Every version directory under ``artifacts/`` or ``indexes/``, newest first (mtime)."""
    root = Path(root)
    names: set[str] = set()
    for folder in (ARTIFACTS_DIRNAME, INDEXES_DIRNAME):
        base = root / folder
        if base.is_dir():
            for path in base.iterdir():
                if (
                    path.name != CURRENT_LINK
                    and not path.name.startswith(".")
                    and (path.is_dir() and not path.is_symlink())
                ):
                    names.add(path.name)
    current, previous = current_version(root), previous_version(root)
    infos = []
    for name in names:
        a, i = artifacts_dir(root, name), index_dir(root, name)
        mtimes = [p.stat().st_mtime for p in (a, i) if p.is_dir()]
        infos.append(
            VersionInfo(
                name, a.is_dir(), i.is_dir(), name == current, name == previous, max(mtimes)
            )  # fmt: skip
        )
    infos.sort(key=lambda v: (v.mtime, v.name), reverse=True)
    return infos


def remove_version(root: Path, version: str) -> None:
    """Delete ``artifacts/VERSION`` and ``indexes/VERSION`` (never a current one)."""
    check_version_name(version)
    if version == current_version(root):
        raise ReleaseError(f"{version} is current: not removed")
    for path in (artifacts_dir(root, version), index_dir(root, version)):
        _remove_tree(path)


def _remove_tree(path: Path) -> None:
    """Rename to a hidden name first (one atomic step out of sight), then delete."""
    if not path.exists() and not path.is_symlink():
        return
    hidden = path.parent / f".deleting-{path.name}-{uuid.uuid4().hex[:8]}"
    os.replace(path, hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def mark_failed(root: Path, version: str, keep: bool = False) -> list[Path]:
    """Take a failed (never promoted) version out of the listing: delete it, or with
    ``keep`` rename it to ``.failed-VERSION`` for inspection.  Returns the kept paths."""
    check_version_name(version)
    if version == current_version(root):
        raise ReleaseError(f"{version} is current: not touched")
    kept = []
    for path in (artifacts_dir(root, version), index_dir(root, version)):
        if not path.exists():
            continue
        if keep:
            target = path.parent / f"{FAILED_PREFIX}{version}"
            if target.exists():
                _remove_tree(target)
            os.replace(path, target)
            kept.append(target)
        else:
            _remove_tree(path)
    return kept


def prune(root: Path, keep: int) -> list[str]:
    """Keep ``keep`` versions on disk: the current and previous ones, then the newest.

    Older versions are deleted (each recorded in the history as ``prune``); the current
    and the rollback target are never deleted, even if that keeps more than ``keep``.
    Returns the removed version names.
    """
    if keep < 1:
        raise ReleaseError("keep must be >= 1")
    root = Path(root)
    removed = []
    with release_lock(root):
        versions = list_versions(root)
        protected = {v.name for v in versions if v.current or v.previous}
        budget = keep - len(protected)
        for info in versions:  # newest first
            if info.name in protected:
                continue
            if budget > 0:
                budget -= 1
                continue
            remove_version(root, info.name)
            append_history(root, {"event": "prune", "version": info.name})
            removed.append(info.name)
    return removed
