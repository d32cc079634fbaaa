"""Typed manifests (contracts/manifest.py): what each artifact kind's ``from_dict`` refuses,
that older manifests (without the optional fields added later) still load, that the JSON
on disk is what it always was, and the one export/index pair check."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from service_fixtures import TINY_MODEL_VERSION, build_version

from contracts.manifest import (
    INDEX_FILE,
    INDEX_KIND,
    ITEM_EMBEDDINGS_FILE,
    ITEM_IDS_FILE,
    MANIFEST_NAME,
    TOWER_EXPORT_KIND,
    USER_TOWER_FILE,
    ArtifactError,
    IndexManifest,
    TowerExportManifest,
    check_pair,
    pair_mismatches,
    read_manifest,
    write_manifest,
)
from index_builder.loaded import load_index
from service.tower import UserTowerRunner

FILES = {
    name: {"sha256": "0" * 64, "bytes": 1}
    for name in (USER_TOWER_FILE, ITEM_EMBEDDINGS_FILE, ITEM_IDS_FILE, INDEX_FILE)
}


def export_fields(**changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "schema_version": 1,
        "kind": TOWER_EXPORT_KIND,
        "model_name": "t2diff",
        "model_version": "v1",
        "embedding_dim": 16,
        "num_items": 100,
        "max_seq_len": 20,
        "noise_shape": [5, 20, 16],
        "noise_seed": 0,
        "files": FILES,
    }
    fields.update(changes)
    return {k: v for k, v in fields.items() if v is not None}


def index_fields(**changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "schema_version": 1,
        "kind": INDEX_KIND,
        "index_version": "idx-1",
        "model_name": "t2diff",
        "model_version": "v1",
        "embedding_dim": 16,
        "num_items": 100,
        "metric": "inner_product",
        "nprobe": 4,
        "k_factor": 2,
        "shortlist_min_k": 64,
        "files": FILES,
    }
    fields.update(changes)
    return {k: v for k, v in fields.items() if v is not None}


def test_export_manifest_types_its_fields() -> None:
    manifest = TowerExportManifest.from_dict(export_fields(), Path("a/v1"))
    assert manifest.model_version == "v1" and manifest.embedding_dim == 16
    assert manifest.noise_shape == (5, 20, 16) and manifest.tower_parts is None
    assert manifest.require_tower() == (20, (5, 20, 16), 0)
    assert manifest.lists(USER_TOWER_FILE) and not manifest.lists("other.onnx")
    # A numeric model_version (an old export named by a counter) reads as text.
    assert (
        TowerExportManifest.from_dict(export_fields(model_version=7), Path(".")).model_version
        == "7"
    )


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"kind": "ann_index"}, "kind"),
        ({"embedding_dim": None}, "embedding_dim"),
        ({"embedding_dim": "16"}, "embedding_dim"),
        ({"embedding_dim": True}, "embedding_dim"),
        ({"num_items": 0}, "num_items"),
        ({"model_version": None}, "model_version"),
        ({"noise_shape": [5, -1]}, "noise_shape"),
        ({"files": {USER_TOWER_FILE: {}}}, ITEM_EMBEDDINGS_FILE),
    ],
)
def test_export_manifest_refuses(changes: dict[str, Any], reason: str) -> None:
    with pytest.raises(ArtifactError, match=reason):
        TowerExportManifest.from_dict(export_fields(**changes), Path("a/v1"))


def test_export_without_serving_fields_reads_but_cannot_serve() -> None:
    # The index builder reads such an export (item table only); the tower loader refuses it.
    manifest = TowerExportManifest.from_dict(
        export_fields(max_seq_len=None, noise_shape=None, noise_seed=None), Path("a/v1")
    )
    with pytest.raises(ArtifactError, match="max_seq_len, noise_shape, noise_seed"):
        manifest.require_tower()


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"kind": "user_tower"}, "kind"),
        ({"nprobe": None}, "nprobe"),
        ({"k_factor": "2"}, "k_factor"),
        ({"metric": None}, "metric"),
        ({"files": {INDEX_FILE: {}}}, ITEM_IDS_FILE),
    ],
)
def test_index_manifest_refuses(changes: dict[str, Any], reason: str) -> None:
    with pytest.raises(ArtifactError, match=reason):
        IndexManifest.from_dict(index_fields(**changes), Path("i/idx-1"))


def test_index_manifest_defaults_of_older_builds() -> None:
    manifest = IndexManifest.from_dict(
        index_fields(shortlist_min_k=None, index_version=None), Path("indexes/v3")
    )
    assert manifest.shortlist_min_k is None  # the loader's default applies
    assert manifest.index_version == "v3"  # the directory names the version
    assert manifest.k_factor == 2.0 and isinstance(manifest.k_factor, float)


def test_pair_check_names_every_mismatch() -> None:
    export = TowerExportManifest.from_dict(export_fields(), Path("a/v1"))
    index = IndexManifest.from_dict(
        index_fields(model_version="v2", embedding_dim=32, num_items=90), Path("i/v2")
    )
    fields = [m.field for m in pair_mismatches(export, index)]
    assert fields == ["model_version", "embedding_dim", "num_items"]
    same = IndexManifest.from_dict(index_fields(), Path("i/v1"))
    assert pair_mismatches(export, same) == []
    # What was loaded counts too: the FAISS index's d and ntotal, the id lists.
    loaded = pair_mismatches(
        export,
        same,
        export_item_ids=["a", "b"],
        index_item_ids=["b", "a"],
        index_dim=8,
        index_vectors=100,
    )
    assert [m.field for m in loaded] == ["embedding_dim", "item_ids"]
    with pytest.raises(ArtifactError, match="model_version 'v2'.*embedding_dim 32"):
        check_pair(export, index)


def test_disk_format_unchanged_and_old_manifests_load(tmp_path: Path) -> None:
    artifacts, index_dir = build_version(tmp_path, TINY_MODEL_VERSION)
    on_disk = json.loads((index_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
    typed = IndexManifest.load(index_dir)
    assert dict(typed.raw) == on_disk == read_manifest(index_dir)
    assert typed.model_version == on_disk["model_version"] == TINY_MODEL_VERSION

    # An index built before shortlist_min_k existed loads with the default.
    fields = {k: v for k, v in on_disk.items() if k not in ("files", "shortlist_min_k")}
    write_manifest(index_dir, fields)
    loaded = load_index(index_dir)
    assert loaded.manifest.shortlist_min_k is None and loaded.shortlist_min_k > 0

    # The tower loader reads the same typed manifest and the pair check passes.
    tower = UserTowerRunner(artifacts)
    assert tower.manifest.model_version == loaded.manifest.model_version
    assert pair_mismatches(tower.manifest, loaded.manifest) == []
