"""Release validation loads what is served, and no loader reads outside a version dir.

* ``t2diff rebuild`` refuses a version whose split part or one-request diffusion part is
  corrupt, missing or breaks its contract although every checksum is consistent (the
  manifest rewritten over the broken file): the ``serving`` check loads the candidate with
  the service's own loader and answers a recall.  ``current`` stays; exit 1 with the reason.
* A manifest listing ``../outside/x.onnx`` (right size and SHA-256), an absolute path, or a
  file that is a symlink out of the directory is refused by the export loader
  (``load_artifacts``), the index loader (``load_index``) and the service's tower loader.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from export_fixtures import export_tiny_t2diff
from service_fixtures import build_tiny_export, build_tiny_index
from typer.testing import CliRunner

from contracts import manifest as mf
from index_builder.build import load_artifacts
from index_builder.loaded import load_index
from release.links import current_version
from service.tower import UserTowerRunner
from t2diff_cli.main import app

pytestmark = pytest.mark.usefixtures("one_omp_thread")

runner = CliRunner()
TINY = {"dim": 16, "unet_width": 8, "max_seq_len": 12, "session_len": 4, "diffusion_steps": 5}


@pytest.fixture(scope="module")
def split_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real T2Diff export with the two parts and the one-request diffusion part."""
    import torch

    from model.t2diff import T2Diff, T2DiffConfig

    torch.manual_seed(0)
    model = T2Diff(60, T2DiffConfig(**TINY)).eval()  # type: ignore[arg-type]
    out = tmp_path_factory.mktemp("split") / "export"
    return export_tiny_t2diff(
        out, model, "split-0", noise_seed=3, item_name=lambda r: f"m{r}", split=True
    )


def remanifest(directory: Path) -> None:
    """Checksum the directory's files again: the manifest is consistent with what is there."""
    manifest = mf.read_manifest(directory, verify=False)
    fields = {k: v for k, v in manifest.items() if k not in ("files", "schema_version")}
    mf.write_manifest(directory, fields)


def rebuild(root: Path, export: Path, version: str) -> object:
    return runner.invoke(
        app,
        ["rebuild", "--root", str(root), "--artifacts", str(export), "--version", version],
    )


@pytest.fixture
def served(split_export: Path, tmp_path: Path) -> Path:
    """A root serving v1 (the good split export, promoted by a rebuild)."""
    root = tmp_path / "root"
    result = rebuild(root, split_export, "v1")
    assert result.exit_code == 0, result.output
    assert "serving" in result.output and current_version(root) == "v1"
    return root


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x08\x07 not an onnx graph " * 64)


def _diffusion_as_one(path: Path) -> None:
    # The batched diffusion part in place of the one-request part: loads, wrong contract.
    shutil.copyfile(path.with_name(mf.TOWER_DIFFUSION_FILE), path)


BREAKAGES = {
    "corrupt one-request part": (mf.TOWER_DIFFUSION_ONE_FILE, _garbage),
    "missing one-request part": (mf.TOWER_DIFFUSION_ONE_FILE, Path.unlink),
    "one-request part with a batch axis": (mf.TOWER_DIFFUSION_ONE_FILE, _diffusion_as_one),
    "corrupt attention part": (mf.TOWER_ATTENTION_FILE, _garbage),
    "corrupt diffusion part": (mf.TOWER_DIFFUSION_FILE, _garbage),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_rebuild_refuses_a_graph_the_service_cannot_load(
    served: Path, split_export: Path, tmp_path: Path, breakage: str
) -> None:
    file_name, damage = BREAKAGES[breakage]
    bad = tmp_path / "bad"
    shutil.copytree(split_export, bad)
    damage(bad / file_name)
    remanifest(bad)
    mf.read_manifest(bad, verify=True)  # every checksum is consistent
    result = rebuild(served, bad, "v2")
    assert result.exit_code == 1, result.output
    assert "serving" in result.output and "still serving v1" in result.output
    assert current_version(served) == "v1"
    assert not (served / "artifacts" / "v2").exists()


def test_release_validate_reports_the_serving_check(served: Path) -> None:
    result = runner.invoke(app, ["release", "validate", "v1", "--root", str(served)])
    assert result.exit_code == 0, result.output
    assert "loaded by the service" in result.output
    for graph in ("single", "diffusion", "attention", "diffusion_one"):
        assert graph in result.output


# --------------------------------------------------------------------------- confinement


def add_listed(directory: Path, name: str, target: Path) -> None:
    """List ``name`` in the manifest with the size and SHA-256 of ``target`` (a file that
    really is at ``directory / name``)."""
    manifest = json.loads((directory / mf.MANIFEST_NAME).read_text())
    manifest["files"][name] = {"sha256": mf.sha256_file(target), "bytes": target.stat().st_size}
    (directory / mf.MANIFEST_NAME).write_text(json.dumps(manifest))


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(export, index, outside): a tiny version under tmp/v, and tmp/outside beside it."""
    export = build_tiny_export(tmp_path / "v" / "artifacts")
    index = build_tiny_index(export, tmp_path / "v" / "index")
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copyfile(export / mf.USER_TOWER_FILE, outside / "x.onnx")
    return export, index, outside


LOADERS = {
    "artifacts": lambda export, index: load_artifacts(export),
    "index": lambda export, index: load_index(index),
    "service tower": lambda export, index: UserTowerRunner(export),
}


@pytest.mark.parametrize("loader", sorted(LOADERS))
@pytest.mark.parametrize("how", ["dotdot", "absolute"])
def test_a_listed_file_outside_the_directory_is_refused(
    pair: tuple[Path, Path, Path], loader: str, how: str
) -> None:
    export, index, outside = pair
    LOADERS[loader](export, index)  # loads while the manifests are clean
    target_dir = index if loader == "index" else export
    name = "../../outside/x.onnx" if how == "dotdot" else str(outside / "x.onnx")
    assert (target_dir / name).resolve() == (outside / "x.onnx").resolve()
    add_listed(target_dir, name, outside / "x.onnx")
    with pytest.raises(mf.ArtifactError, match="not inside its directory"):
        LOADERS[loader](export, index)


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_a_symlink_out_of_the_directory_is_refused(
    pair: tuple[Path, Path, Path], loader: str
) -> None:
    export, index, outside = pair
    name = mf.INDEX_FILE if loader == "index" else mf.ITEM_IDS_FILE
    directory = index if loader == "index" else export
    shutil.move(directory / name, outside / name)  # same bytes: the checksum matches
    (directory / name).symlink_to(outside / name)
    with pytest.raises(mf.ArtifactError, match="resolves outside its directory"):
        LOADERS[loader](export, index)


def test_a_version_reached_through_a_symlinked_directory_loads(
    pair: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    export, index, _ = pair
    (tmp_path / "current").symlink_to(export)
    assert UserTowerRunner(tmp_path / "current").num_items > 0


def test_a_tower_part_named_outside_the_export_is_not_loaded(
    split_export: Path, tmp_path: Path
) -> None:
    """Before the fix the service loaded ``../outside/b1.onnx`` (listed, checksummed)."""
    export = tmp_path / "export"
    shutil.copytree(split_export, export)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.move(export / mf.TOWER_DIFFUSION_ONE_FILE, outside / "b1.onnx")
    remanifest(export)
    name = "../outside/b1.onnx"
    manifest = json.loads((export / mf.MANIFEST_NAME).read_text())
    manifest[mf.TOWER_DIFFUSION_ONE_FIELD] = name
    (export / mf.MANIFEST_NAME).write_text(json.dumps(manifest))
    add_listed(export, name, outside / "b1.onnx")
    with pytest.raises(mf.ArtifactError, match="not inside its directory"):
        UserTowerRunner(export)
