"""Versioned artifact directories described by a ``manifest.json``.

Every artifact directory (a model export, an index build) holds its files plus a
``manifest.json`` listing each file with its SHA-256 and size.  A directory is only valid
when every listed file is present with the recorded checksum, so a half-copied or
corrupted version is refused before anything is loaded from it.

Every listed file lies inside its directory: a name that is absolute, holds a ``..``
component, or resolves (through a symlink) outside the directory is refused by
:func:`read_manifest`, which every loader (the export, the index, the service's tower)
reads first; loaders open listed files through :func:`member_path`.

Readers do not pick fields out of the raw JSON: each artifact kind has one typed, frozen
manifest (:class:`TowerExportManifest`, :class:`IndexManifest`) whose ``from_dict``
validates the fields every reader relies on, and :func:`pair_mismatches` is the one check
that an export and an index belong together (release validation, the service's loader and
its hot swap all call it).  The JSON on disk is unchanged: fields added later are optional,
and what a reader does not type stays in ``raw``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Self, TypeVar

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
# The trained user tower as a torch checkpoint (``worker.tower`` loads it to run the
# fused GPU kernel); the manifest names it under ``TORCH_TOWER_FIELD``.  Optional: the
# service's ONNX path never reads it, and exports made before it existed lack it.
TORCH_TOWER_FILE = "user_tower.pt"
TORCH_TOWER_FIELD = "torch_tower"
# Names of the files in an index build (``t2diff build-index``).
INDEX_FILE = "index.faiss"
#: ``kind`` of the manifest of a user-tower export / of an index build.
TOWER_EXPORT_KIND = "user_tower"
INDEX_KIND = "ann_index"


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


# --------------------------------------------------------------------------- typed manifests

_T = TypeVar("_T")


def _field(
    raw: Mapping[str, Any],
    directory: Path,
    name: str,
    kind: type[_T] | tuple[type, ...],
    required: bool = True,
) -> Any:
    """``raw[name]`` checked to be a ``kind``; None when absent and not ``required``.

    Strict (no casts): manifests are written by this project's code, so a dimension of
    ``"16"`` or ``true`` means a broken writer, not a format to accept."""
    value = raw.get(name)
    if value is None and not required:
        return None
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is an int subclass, but `true` is never a valid dimension, count or seed.
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = "/".join(k.__name__ for k in kinds)
        raise ArtifactError(
            f"{directory}: manifest field {name!r} is missing or not {names}: {value!r}"
        )
    return value


def _positive(value: int | None, directory: Path, name: str) -> None:
    if value is not None and value <= 0:
        raise ArtifactError(f"{directory}: manifest field {name!r} must be positive: {value}")


def _check_kind(raw: Mapping[str, Any], directory: Path, kind: str) -> None:
    if raw.get("kind") != kind:
        raise ArtifactError(f"{directory}: manifest kind {raw.get('kind')!r}, expected {kind!r}")


def _check_listed(files: Mapping[str, Any], directory: Path, names: Sequence[str]) -> None:
    for name in names:
        if name not in files:
            raise ArtifactError(f"{directory}: {name} is not listed in the manifest")


def _item_table_fields(
    raw: Mapping[str, Any], directory: Path, kind: str, listed: Sequence[str]
) -> tuple[Mapping[str, Any], int, int]:
    """What every artifact's manifest holds: (the files table, checked to list ``listed``;
    ``embedding_dim``; ``num_items``), after checking its ``kind``."""
    _check_kind(raw, directory, kind)
    files = raw.get("files")
    if not isinstance(files, Mapping):
        raise ArtifactError(f"{directory}: manifest has no 'files' table")
    _check_listed(files, directory, listed)
    embedding_dim = _field(raw, directory, "embedding_dim", int)
    num_items = _field(raw, directory, "num_items", int)
    _positive(embedding_dim, directory, "embedding_dim")
    _positive(num_items, directory, "num_items")
    return files, embedding_dim, num_items


class _Loadable:
    """``load``: :func:`read_manifest` (checksums with ``verify``) then ``from_dict``."""

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], directory: Path) -> Self:
        raise NotImplementedError

    @classmethod
    def load(cls, directory: Path, verify: bool = True) -> Self:
        return cls.from_dict(read_manifest(directory, verify=verify), directory)


@dataclass(frozen=True)
class TowerExportManifest(_Loadable):
    """The manifest of a user-tower export (``t2diff export``, kind ``user_tower``).

    Required by every reader: ``model_version``, ``embedding_dim``, ``num_items``, and the
    item table (``item_embeddings.npy``, ``item_ids.json``) among the files.  What only the
    service's tower needs (``max_seq_len``, ``noise_shape``, ``noise_seed``, the graph) is
    typed but optional here: the index builder reads exports without it, and the tower
    loader refuses its absence (:meth:`require_tower`).
    """

    directory: Path
    files: Mapping[str, Mapping[str, Any]]
    model_name: str
    model_version: str
    embedding_dim: int
    num_items: int
    max_seq_len: int | None = None
    noise_shape: tuple[int, ...] | None = None
    noise_seed: int | None = None
    # The split tower (part name -> file), the one-request diffusion part, the torch
    # checkpoint: optional, exports made before them lack them.
    tower_parts: Mapping[str, Any] | None = None
    tower_diffusion_one: object | None = None
    torch_tower: str | None = None
    # The whole JSON: fields no reader types (training metrics, diffusion steps, ...).
    raw: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], directory: Path) -> Self:
        """Validate ``raw`` (a manifest read by :func:`read_manifest`) as an export's."""
        directory = Path(directory)
        files, embedding_dim, num_items = _item_table_fields(
            raw, directory, TOWER_EXPORT_KIND, (ITEM_EMBEDDINGS_FILE, ITEM_IDS_FILE)
        )
        max_seq_len = _field(raw, directory, "max_seq_len", int, required=False)
        _positive(max_seq_len, directory, "max_seq_len")
        noise_shape = _field(raw, directory, "noise_shape", list, required=False)
        if noise_shape is not None and not all(
            isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in noise_shape
        ):
            raise ArtifactError(
                f"{directory}: manifest noise_shape is not a list of positive ints: {noise_shape}"
            )
        tower_parts = _field(raw, directory, TOWER_PARTS_FIELD, dict, required=False)
        return cls(
            directory=directory,
            files=files,
            model_name=str(_field(raw, directory, "model_name", str, required=False) or "unknown"),
            model_version=str(_field(raw, directory, "model_version", (str, int))),
            embedding_dim=embedding_dim,
            num_items=num_items,
            max_seq_len=max_seq_len,
            noise_shape=tuple(noise_shape) if noise_shape is not None else None,
            noise_seed=_field(raw, directory, "noise_seed", int, required=False),
            tower_parts=tower_parts,
            tower_diffusion_one=raw.get(TOWER_DIFFUSION_ONE_FIELD),
            torch_tower=_field(raw, directory, TORCH_TOWER_FIELD, str, required=False),
            raw=raw,
        )

    def lists(self, name: str) -> bool:
        return name in self.files

    def require_tower(self) -> tuple[int, tuple[int, ...], int]:
        """What serving the tower needs beyond the item table, refused when absent: the
        graph among the files, and (``max_seq_len``, ``noise_shape``, ``noise_seed``)."""
        _check_listed(self.files, self.directory, (USER_TOWER_FILE,))
        if self.max_seq_len is None or self.noise_shape is None or self.noise_seed is None:
            missing = [
                name
                for name, value in (
                    ("max_seq_len", self.max_seq_len),
                    ("noise_shape", self.noise_shape),
                    ("noise_seed", self.noise_seed),
                )
                if value is None
            ]
            raise ArtifactError(f"{self.directory}: manifest lacks {', '.join(missing)}")
        return self.max_seq_len, self.noise_shape, self.noise_seed


@dataclass(frozen=True)
class IndexManifest(_Loadable):
    """The manifest of an index build (``t2diff build-index``, kind ``ann_index``)."""

    directory: Path
    files: Mapping[str, Mapping[str, Any]]
    index_version: str
    model_name: str
    # The export the index was built from: an index is only served with that export.
    model_version: str
    embedding_dim: int
    num_items: int
    metric: str
    nprobe: int
    k_factor: float
    # Absent from indexes built before it existed: the loader's default applies.
    shortlist_min_k: int | None = None
    # The whole JSON: fields no reader types (recall figures, build parameters, ...).
    raw: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], directory: Path) -> Self:
        """Validate ``raw`` (a manifest read by :func:`read_manifest`) as an index's."""
        directory = Path(directory)
        files, embedding_dim, num_items = _item_table_fields(
            raw, directory, INDEX_KIND, (INDEX_FILE, ITEM_IDS_FILE)
        )
        nprobe = _field(raw, directory, "nprobe", int)
        _positive(nprobe, directory, "nprobe")
        index_version = _field(raw, directory, "index_version", (str, int), required=False)
        return cls(
            directory=directory,
            files=files,
            index_version=str(index_version or directory.name),
            model_name=str(_field(raw, directory, "model_name", str, required=False) or "unknown"),
            model_version=str(_field(raw, directory, "model_version", (str, int))),
            embedding_dim=embedding_dim,
            num_items=num_items,
            metric=_field(raw, directory, "metric", str),
            nprobe=nprobe,
            k_factor=float(_field(raw, directory, "k_factor", (int, float))),
            shortlist_min_k=_field(raw, directory, "shortlist_min_k", int, required=False),
            raw=raw,
        )


# --------------------------------------------------------------------------- consistency


@dataclass(frozen=True)
class Mismatch:
    """One way an export and an index disagree: the field and the reason."""

    field: str  # "model_version", "embedding_dim", "num_items" or "item_ids"
    reason: str


def pair_mismatches(
    export: TowerExportManifest,
    index: IndexManifest,
    *,
    export_item_ids: Sequence[str] | None = None,
    index_item_ids: Sequence[str] | None = None,
    index_dim: int | None = None,
    index_vectors: int | None = None,
) -> list[Mismatch]:
    """The one check that an export and an index belong together; empty when they do.

    An index of another model version, or of another dimension, scores user vectors against
    item vectors of a different embedding space: results would look plausible and be
    garbage.  The manifests are always compared; what was loaded (the id lists, the FAISS
    index's ``d`` and ``ntotal``) is compared too when given.  Callers: release validation
    (``release.validate``), the service's engine (``service.core.RecallEngine``) and
    its hot swap, which waits while only the model versions differ (a promotion half done).
    """
    mismatches: list[Mismatch] = []
    if index.model_version != export.model_version:
        mismatches.append(
            Mismatch(
                "model_version",
                f"index {index.index_version} was built from model_version "
                f"{index.model_version!r}, the export is model_version {export.model_version!r}",
            )
        )
    if index.embedding_dim != export.embedding_dim or (
        index_dim is not None and index_dim != export.embedding_dim
    ):
        loaded = f" (d={index_dim})" if index_dim is not None else ""
        mismatches.append(
            Mismatch(
                "embedding_dim",
                f"index embedding_dim {index.embedding_dim}{loaded} != export embedding_dim "
                f"{export.embedding_dim}",
            )
        )
    if index.num_items != export.num_items or (
        index_vectors is not None and index_vectors != export.num_items
    ):
        held = f" ({index_vectors} vectors)" if index_vectors is not None else ""
        mismatches.append(
            Mismatch(
                "num_items",
                f"index num_items {index.num_items}{held} != export num_items {export.num_items}",
            )
        )
    if (
        export_item_ids is not None
        and index_item_ids is not None
        and list(export_item_ids) != list(index_item_ids)
    ):
        mismatches.append(
            Mismatch("item_ids", f"index {ITEM_IDS_FILE} differs from the export's item ids")
        )
    return mismatches


def check_pair(
    export: TowerExportManifest,
    index: IndexManifest,
    *,
    export_item_ids: Sequence[str] | None = None,
    index_item_ids: Sequence[str] | None = None,
    index_dim: int | None = None,
    index_vectors: int | None = None,
) -> None:
    """:func:`pair_mismatches`, raising :class:`ArtifactError` with every reason."""
    mismatches = pair_mismatches(
        export,
        index,
        export_item_ids=export_item_ids,
        index_item_ids=index_item_ids,
        index_dim=index_dim,
        index_vectors=index_vectors,
    )
    if mismatches:
        raise ArtifactError("; ".join(m.reason for m in mismatches))
