"""Versioned artifact directories described by a ``manifest.json``.

Every artifact directory (a model export, an index build) holds its files plus a
``manifest.json`` listing each file with its SHA-256 and size.  A directory is only valid
when every listed file is present with the recorded checksum, so a half-copied or
corrupted version is refused before anything is loaded from it.

Every listed file lies inside its directory: a name that is absolute, holds a ``..``
component, or resolves (through a symlink) outside the directory is refused by
:func:`read_manifest`, which every loader (the export, the index, the service's tower)
reads first; loaders open listed files through :func:`member_path`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

MANIFEST_NAME = "manifest.json"
MANIFEST_SCHEMA_VERSION = 1

# Names of the files in a user-tower export (``t2diff export``).
USER_TOWER_FILE = "user_tower.onnx"
ITEM_EMBEDDINGS_FILE = "item_embeddings.npy"
ITEM_IDS_FILE = "item_ids.json"
POPULARITY_FILE = "item_popularity.npy"
# Optional split of a diffusion tower (``contracts.tower``): the reverse process alone, and
# the attention half that takes its output.  The manifest names them under
# ``TOWER_PARTS_FIELD`` (part name -> file; the files are checksummed like every other);
# an export without the field is served through ``USER_TOWER_FILE`` alone.
TOWER_DIFFUSION_FILE = "user_tower_diffusion.onnx"
TOWER_ATTENTION_FILE = "user_tower_attention.onnx"
TOWER_PARTS_FIELD = "tower_parts"
# Optional beside the parts: the diffusion part for exactly one request (batch fixed at 1,
# the reverse process on 2-D activations, where ONNX Runtime fuses each product and its bias
# into one Gemm: bench/b1_graph_probe.py).  Same inputs and output as the diffusion part;
# the service runs it for a lone xhat miss.  Named under TOWER_DIFFUSION_ONE_FIELD.
TOWER_DIFFUSION_ONE_FILE = "user_tower_diffusion_b1.onnx"
TOWER_DIFFUSION_ONE_FIELD = "tower_diffusion_one"
# The trained user tower as a torch checkpoint (``model.tower_worker`` loads it to run the
# fused GPU kernel); the manifest names it under ``TORCH_TOWER_FIELD``.  Optional: the
# service's ONNX path never reads it, and exports made before it existed lack it.
TORCH_TOWER_FILE = "user_tower.pt"
TORCH_TOWER_FIELD = "torch_tower"
# Names of the files in an index build (``t2diff build-index``).
INDEX_FILE = "index.faiss"


class ArtifactError(RuntimeError):
    """An artifact directory is missing, incomplete, corrupt or inconsistent."""


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader sees the old or the new file, never half."""
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def write_manifest(directory: Path, fields: dict[str, Any]) -> dict[str, Any]:
    """Checksum every regular file in ``directory`` and write ``manifest.json`` beside them."""
    directory = Path(directory)
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(directory.iterdir()):
        if path.name == MANIFEST_NAME or path.name.startswith(".") or not path.is_file():
            continue
        files[path.name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    manifest = {"schema_version": MANIFEST_SCHEMA_VERSION, **fields, "files": files}
    atomic_write_text(directory / MANIFEST_NAME, json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def read_manifest(directory: Path, verify: bool = True) -> dict[str, Any]:
    """Read ``manifest.json``; with ``verify`` check that every listed file matches it."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST_NAME
    if not manifest_path.is_file():
        raise ArtifactError(f"{directory}: no {MANIFEST_NAME}")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{manifest_path}: unreadable manifest ({exc})") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ArtifactError(f"{manifest_path}: manifest has no 'files' table")
    for name in manifest["files"]:
        member_path(directory, name)
    if verify:
        verify_files(directory, manifest)
    return manifest


def member_path(directory: Path, name: object) -> Path:
    """``directory / name`` for a file name a manifest lists, refused (:class:`ArtifactError`)
    unless it stays inside ``directory``: a relative path without ``..`` (or empty)
    components, not resolving outside ``directory`` through a symlink (the directory itself
    may be one, e.g. ``artifacts/current``)."""
    directory = Path(directory)
    if not isinstance(name, str) or not name or "\x00" in name:
        raise ArtifactError(f"{directory}: manifest names an invalid file {name!r}")
    pure = PurePosixPath(name)
    if pure.is_absolute() or name.startswith("/") or any(p in ("..", "") for p in name.split("/")):
        raise ArtifactError(f"{directory}: manifest file {name!r} is not inside its directory")
    base = os.path.realpath(directory)
    target = os.path.realpath(os.path.join(base, name))
    if os.path.commonpath([base, target]) != base or target == base:
        raise ArtifactError(
            f"{directory}: manifest file {name!r} resolves outside its directory ({target})"
        )
    return directory / name


def verify_files(directory: Path, manifest: dict[str, Any]) -> None:
    for name, entry in manifest["files"].items():
        path = member_path(directory, name)
        if not path.is_file():
            raise ArtifactError(f"{directory}: listed file {name} is missing")
        if path.stat().st_size != entry.get("bytes"):
            raise ArtifactError(f"{directory}: {name} has the wrong size")
        if sha256_file(path) != entry.get("sha256"):
            raise ArtifactError(f"{directory}: {name} fails its checksum")
