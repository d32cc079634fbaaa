"""Nightly rebuild: validation, atomic promotion, rollback, pruning, failed rebuilds.

Real FAISS on tiny crafted exports (2000 items x 16 dims, a one-node ONNX "tower" that
declares its output shape, run by the real ONNX Runtime in the serving check); the whole
file runs in seconds.  Through the CLI (``t2diff rebuild | promote | rollback``) and, at the
end, the pipeline called directly (``release.pipeline.rebuild``, no typer).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from service_fixtures import mean_pool_tower
from typer.testing import CliRunner

from contracts.manifest import (
    INDEX_FILE,
    ITEM_EMBEDDINGS_FILE,
    ITEM_IDS_FILE,
    USER_TOWER_FILE,
    read_manifest,
    write_manifest,
)
from index_builder import build_from_artifacts
from release.errors import (
    RebuildError,
    RebuildFailed,
    ReleaseError,
    ReleaseUsageError,
    ValidationFailed,
)
from release.links import (
    REBUILD_LOCK_FILE,
    current_links,
    current_version,
    list_versions,
    previous_version,
    promote,
    prune,
    read_history,
    release_lock,
    resolve_consistent,
    resolve_current,
    rollback,
    switch_link,
)
from release.pipeline import newest_run, rebuild
from release.settings import RebuildSettings, ValidationThresholds
from release.validate import serving_check, validate_release
from t2diff_cli.main import app

pytestmark = pytest.mark.usefixtures("one_omp_thread")

N, DIM = 2000, 16
runner = CliRunner()


def tower_onnx(path: Path, dim: int) -> None:
    """A stand-in user tower: Identity from x [B, dim] to user_embedding [B, dim]."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["user_embedding"])],
        "tower",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", dim])],
        [helper.make_tensor_value_info("user_embedding", TensorProto.FLOAT, ["B", dim])],
    )
    onnx.save(helper.make_model(graph), str(path))


def make_export(
    directory: Path,
    version: str,
    n: int = N,
    dim: int = DIM,
    seed: int = 0,
    tower_dim: int | None = None,
    embeddings: np.ndarray | None = None,
) -> Path:
    """A user-tower export as ``t2diff export`` writes it (tiny, clustered embeddings)."""
    directory.mkdir(parents=True, exist_ok=True)
    if embeddings is None:
        rng = np.random.default_rng(seed)
        centres = rng.standard_normal((20, dim))
        embeddings = centres[rng.integers(0, 20, n)] + 0.5 * rng.standard_normal((n, dim))
        embeddings = embeddings.astype(np.float32)
    np.save(directory / ITEM_EMBEDDINGS_FILE, embeddings)
    ids = [f"i{row}" for row in range(len(embeddings))]
    (directory / ITEM_IDS_FILE).write_text(json.dumps(ids))
    dim = int(embeddings.shape[1])
    noise_shape = [3, dim]
    if tower_dim is None or tower_dim == dim:
        # A tower the service loads and runs (validation loads it as the service does).
        finite = np.nan_to_num(embeddings, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)
        onnx.save(mean_pool_tower(finite, noise_shape), str(directory / USER_TOWER_FILE))
    else:
        tower_onnx(directory / USER_TOWER_FILE, tower_dim)
    write_manifest(
        directory,
        {
            "kind": "user_tower",
            "model_name": "t2diff",
            "model_version": version,
            "embedding_dim": dim,
            "num_items": len(embeddings),
            "max_seq_len": 20,
            "noise_shape": noise_shape,
            "noise_seed": 0,
        },
    )
    return directory


def make_version(root: Path, version: str, **kwargs: Any) -> None:
    """artifacts/VERSION + indexes/VERSION under ``root`` (a real, small FAISS build)."""
    export = make_export(root / "artifacts" / version, version, **kwargs)
    build_from_artifacts(export, root / "indexes" / version, n_queries=100)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root holding good versions v1 and v2, built once and copied by the tests."""
    root = tmp_path_factory.mktemp("template")
    make_version(root, "v1", seed=1)
    make_version(root, "v2", seed=2)
    return root


@pytest.fixture
def root(template: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "root"
    shutil.copytree(template, dest, symlinks=True)
    return dest


def cli(*args: str) -> Any:
    return runner.invoke(app, list(args))


def rewrite_manifest(directory: Path, **changes: Any) -> None:
    manifest = read_manifest(directory, verify=False)
    fields = {k: v for k, v in manifest.items() if k not in ("files", "schema_version")}
    write_manifest(directory, {**fields, **changes})


# --------------------------------------------------------------------------- validation


def test_good_version_validates(root: Path) -> None:
    report = validate_release(root / "artifacts" / "v1", root / "indexes" / "v1")
    assert report.ok, report.failures
    assert set(report.checks) == {
        "checksums", "artifacts", "index", "consistency", "tower_dim", "item_count", "recall"
    }  # fmt: skip
    served = validate_release(
        root / "artifacts" / "v1", root / "indexes" / "v1", serving_check=serving_check
    )
    assert served.checks["serving"].startswith("loaded by the service"), served.failures
    assert report.metrics["recall_at_100"] >= 0.9 and report.metrics["tower_dim"] == DIM


def test_validation_rejects_a_corrupted_file(root: Path) -> None:
    path = root / "indexes" / "v1" / INDEX_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    report = validate_release(root / "artifacts" / "v1", root / "indexes" / "v1")
    assert not report.ok and "checksum" in report.failures["checksums"]


def test_validation_rejects_a_tower_dims_mismatch(root: Path) -> None:
    artifacts = root / "artifacts" / "v1"
    tower_onnx(artifacts / USER_TOWER_FILE, DIM + 8)
    rewrite_manifest(artifacts)  # checksums fine: the content is what is wrong
    report = validate_release(artifacts, root / "indexes" / "v1")
    assert not report.ok and list(report.failures) == ["tower_dim"]
    assert f"d={DIM + 8}" in report.failures["tower_dim"]


def test_validation_rejects_index_of_another_model(root: Path) -> None:
    # v2's index next to v1's artifacts: other model_version (and other embeddings).
    report = validate_release(root / "artifacts" / "v1", root / "indexes" / "v2")
    assert not report.ok and "model_version" in report.failures["consistency"]


def test_validation_rejects_embedding_dim_mismatch(root: Path, tmp_path: Path) -> None:
    make_version(tmp_path, "w", dim=DIM * 2)
    report = validate_release(root / "artifacts" / "v1", tmp_path / "indexes" / "w")
    assert not report.ok and "embedding_dim" in report.failures["consistency"]


def test_validation_rejects_recall_below_threshold(tmp_path: Path) -> None:
    export = make_export(tmp_path / "artifacts" / "low", "low")
    build_from_artifacts(
        export, tmp_path / "indexes" / "low", nprobe=1, target_recall=None, n_queries=50
    )
    report = validate_release(export, tmp_path / "indexes" / "low", min_recall=0.9)
    assert not report.ok and "recall@100" in report.failures["recall"]
    assert report.metrics["recall_at_100"] < 0.9
    assert validate_release(export, tmp_path / "indexes" / "low", min_recall=0.01).ok


def test_validation_rejects_nan_embeddings(root: Path) -> None:
    artifacts = root / "artifacts" / "v1"
    emb = np.load(artifacts / ITEM_EMBEDDINGS_FILE)
    emb[3, 1] = np.nan
    np.save(artifacts / ITEM_EMBEDDINGS_FILE, emb)
    rewrite_manifest(artifacts)
    report = validate_release(artifacts, root / "indexes" / "v1")
    assert not report.ok and "NaN" in report.failures["artifacts"]


def test_validation_rejects_item_count_jump(root: Path, tmp_path: Path) -> None:
    make_version(tmp_path, "small", n=600)
    small = (tmp_path / "artifacts" / "small", tmp_path / "indexes" / "small")
    report = validate_release(*small, previous_index_dir=root / "indexes" / "v1")
    assert not report.ok and "0.30x" in report.failures["item_count"]
    loose = validate_release(*small, previous_index_dir=root / "indexes" / "v1", min_ratio=0.2)
    assert loose.ok, loose.failures


# --------------------------------------------------------------------------- promote


def test_promote_switches_both_links_relative(root: Path) -> None:
    result = cli("promote", "v1", "--root", str(root))
    assert result.exit_code == 0, result.output
    artifacts_link, index_link = current_links(root)
    assert os.readlink(artifacts_link) == "v1" and os.readlink(index_link) == "v1"
    assert resolve_current(artifacts_link, index_link) == (
        (root / "artifacts" / "v1").resolve(),
        (root / "indexes" / "v1").resolve(),
    )
    result = cli("promote", "v2", "--root", str(root))
    assert result.exit_code == 0, result.output
    assert current_version(root) == "v2" and previous_version(root) == "v1"
    entries = read_history(root)
    assert [(e["event"], e["version"], e["previous"]) for e in entries] == [
        ("promote", "v1", None),
        ("promote", "v2", "v1"),
    ]
    assert entries[1]["validation"]["ok"] is True
    assert not [p for p in (root / "indexes").iterdir() if p.name.startswith(".")]
    status = cli("release", "status", "--root", str(root), "--json")
    body = json.loads(status.output)
    assert body["current"] == "v2" and body["previous"] == "v1"
    assert {v["name"] for v in body["versions"]} == {"v1", "v2"}


def test_promote_refuses_an_invalid_version(root: Path) -> None:
    promote(root, "v1")
    tower_onnx(root / "artifacts" / "v2" / USER_TOWER_FILE, DIM + 1)
    rewrite_manifest(root / "artifacts" / "v2")
    result = cli("promote", "v2", "--root", str(root))
    assert result.exit_code == 1 and "tower_dim" in result.output
    assert current_version(root) == "v1"
    assert cli("promote", "nope", "--root", str(root)).exit_code == 1
    assert cli("promote", "../v1", "--root", str(root)).exit_code == 1


def test_promotion_is_atomic_for_readers(root: Path) -> None:
    """A reader resolving `current` during 200 promotions never sees a missing link,
    a half-written version, or (through resolve_consistent) a mixed pair."""
    promote(root, "v1")
    artifacts_link, index_link = current_links(root)
    stop = threading.Event()
    errors: list[str] = []
    seen: set[str] = set()

    def reader() -> None:
        while not stop.is_set():
            try:
                a, i = resolve_current(artifacts_link, index_link)
                for directory in (a, i):
                    read_manifest(directory, verify=False)
                a, i = resolve_consistent(artifacts_link, index_link, attempts=50, delay_s=0.001)
                seen.add(a.name)
                if a.name != i.name:
                    errors.append(f"mixed pair {a.name}/{i.name}")
            except Exception as exc:  # noqa: BLE001
                errors.append(repr(exc))

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for n in range(200):
            promote(root, "v2" if n % 2 == 0 else "v1")
            # Promotions are rare in service; back to back with no pause, a reader on a
            # loaded 2-core box can lose every one of its 50 retries to the next one.
            time.sleep(0.002)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[:5]
    assert seen == {"v1", "v2"}
    assert [p.name for p in (root / "artifacts").iterdir() if p.name.startswith(".")] == []


def test_switch_link_replaces_atomically(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    link = tmp_path / "current"
    switch_link(link, "a")
    switch_link(link, "b")
    assert os.readlink(link) == "b" and sorted(p.name for p in tmp_path.iterdir()) == [
        "a", "b", "current"
    ]  # fmt: skip


# --------------------------------------------------------------------------- rollback, prune


def test_rollback_returns_to_previous_versions(root: Path, tmp_path: Path) -> None:
    make_version(root, "v3", seed=3)
    for version in ("v1", "v2", "v3"):
        promote(root, version)
    result = cli("rollback", "--root", str(root))
    assert result.exit_code == 0, result.output
    assert current_version(root) == "v2"
    assert os.readlink(root / "artifacts" / "current") == "v2"
    assert cli("rollback", "--root", str(root)).exit_code == 0
    assert current_version(root) == "v1"
    result = cli("rollback", "--root", str(root))
    assert result.exit_code == 1 and "no previous version" in result.output
    assert current_version(root) == "v1"
    # A new promotion after rollbacks: its previous is the version it replaced.
    promote(root, "v3")
    assert previous_version(root) == "v1"


def test_rollback_adopts_a_bootstrap_version(root: Path) -> None:
    """Links set by bootstrap.sh (no history) are recorded on the next promotion."""
    for link in current_links(root):
        switch_link(link, "v1")
    promote(root, "v2")
    assert rollback(root)["version"] == "v1" and current_version(root) == "v1"


def test_prune_keeps_n_and_never_current_or_previous(tmp_path: Path) -> None:
    root = tmp_path / "root"
    for n in range(6):
        for folder in ("artifacts", "indexes"):
            (root / folder / f"v{n}").mkdir(parents=True)
            os.utime(root / folder / f"v{n}", (1000 + n, 1000 + n))
    promote(root, "v0")
    promote(root, "v1")  # current v1, previous v0: both old
    removed = prune(root, keep=3)
    assert sorted(removed) == ["v2", "v3", "v4"]
    assert {v.name for v in list_versions(root)} == {"v0", "v1", "v5"}
    assert {e["version"] for e in read_history(root) if e["event"] == "prune"} == set(removed)
    assert prune(root, keep=3) == []
    assert prune(root, keep=1) == ["v5"]  # current and previous stay even beyond keep
    with pytest.raises(ReleaseError):
        prune(root, keep=0)


# --------------------------------------------------------------------------- rebuild


def test_rebuild_from_export_validates_promotes_and_prunes(root: Path, tmp_path: Path) -> None:
    promote(root, "v1")
    export = make_export(tmp_path / "elsewhere", "whatever", seed=9)
    result = cli(
        "rebuild", "--root", str(root), "--artifacts", str(export), "--version", "v9",
        "--keep", "2",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert current_version(root) == "v9" and previous_version(root) == "v1"
    assert read_manifest(root / "indexes" / "v9")["model_version"] == "v9"
    assert read_manifest(root / "artifacts" / "v9")["model_version"] == "v9"
    # keep 2 = current + previous: v2 was pruned.
    assert {v.name for v in list_versions(root)} == {"v1", "v9"}
    assert "promoted v9" in result.output and "pruned v2" in result.output


@pytest.mark.parametrize("keep_failed", [False, True])
def test_failed_rebuild_leaves_current_untouched(
    root: Path, tmp_path: Path, keep_failed: bool
) -> None:
    promote(root, "v1")
    before = {link: os.readlink(link) for link in current_links(root)}
    emb = np.load(root / "artifacts" / "v1" / ITEM_EMBEDDINGS_FILE)
    emb[10] = np.nan
    bad = make_export(tmp_path / "bad", "bad", embeddings=emb)
    args = ["rebuild", "--root", str(root), "--artifacts", str(bad), "--version", "v9"]
    result = cli(*args, *(["--keep-failed"] if keep_failed else []))
    assert result.exit_code == 1
    assert "still serving v1" in result.output and "NaN" in result.output
    assert {link: os.readlink(link) for link in current_links(root)} == before
    assert not (root / "artifacts" / "v9").exists() and not (root / "indexes" / "v9").exists()
    assert (root / "artifacts" / ".failed-v9").is_dir() == keep_failed
    assert read_history(root)[-1]["event"] == "failed"
    assert "v9" not in {v.name for v in list_versions(root)}


def test_rebuild_fails_validation_on_item_count_jump(root: Path, tmp_path: Path) -> None:
    promote(root, "v1")
    small = make_export(tmp_path / "small", "small", n=500)
    result = cli("rebuild", "--root", str(root), "--artifacts", str(small), "--version", "v9")
    assert result.exit_code == 1 and "item_count" in result.output
    assert current_version(root) == "v1" and not (root / "indexes" / "v9").exists()
    ok = cli(
        "rebuild", "--root", str(root), "--artifacts", str(small), "--version", "v10",
        "--min-ratio", "0.1",
    )  # fmt: skip
    assert ok.exit_code == 0, ok.output and current_version(root) == "v10"


def test_rebuild_without_any_run_fails_cleanly(root: Path) -> None:
    promote(root, "v1")
    result = cli("rebuild", "--root", str(root), "--version", "v9")
    assert result.exit_code == 1 and "no run with a trained model" in result.output
    assert current_version(root) == "v1"
    assert cli("rebuild", "--root", str(root), "--retrain").exit_code == 2
    # --set (model options for --retrain, e.g. the served unet_width) is checked up front.
    bad = cli("rebuild", "--root", str(root), "--retrain", "--data", str(root), "--set", "16")
    assert bad.exit_code == 2 and "--set expects key=value" in bad.output
    assert current_version(root) == "v1"


def test_newest_run_picks_the_latest_trained_model(tmp_path: Path) -> None:
    with pytest.raises(RebuildError):
        newest_run(tmp_path / "runs")
    for n, name in enumerate(["b", "a", "c"]):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "model.pt").write_bytes(b"x")
        os.utime(tmp_path / "runs" / name / "model.pt", (time.time() + n, time.time() + n))
    (tmp_path / "runs" / "untrained").mkdir()
    assert newest_run(tmp_path / "runs").name == "c"


# --------------------------------------------------------------------------- the pipeline


def test_pipeline_rejects_a_version_failing_validation_and_promotes_nothing(
    root: Path, tmp_path: Path
) -> None:
    """``release.pipeline.rebuild`` called directly: a nightly export that lost most of its
    items (200 vs the served 2000) fails the ``item_count`` check; the error says so and
    nothing is promoted, left on disk or locked."""
    promote(root, "v1")
    links_before = [os.readlink(link) for link in current_links(root)]
    history_before = read_history(root)
    truncated = make_export(tmp_path / "truncated", "x", n=200, seed=3)
    lines: list[str] = []
    settings = RebuildSettings(root=root, version="v9", artifacts=truncated)

    with pytest.raises(RebuildFailed) as caught:
        rebuild(settings, echo=lines.append)

    error = caught.value
    assert error.exit_code == 1 and error.step == "validate" and error.served == "v1"
    assert isinstance(error.__cause__, ValidationFailed)
    assert error.report is not None and error.report is error.__cause__.report
    assert set(error.report.failures) == {"item_count"}
    assert error.report.checks["serving"] == "skipped: an earlier check failed"
    assert str(error).startswith("rebuild v9 failed, still serving v1: validation failed")
    assert "item_count" in error.reason and error.kept == []
    # Nothing promoted: the links, the versions on disk, the history gains one `failed` line.
    assert [os.readlink(link) for link in current_links(root)] == links_before
    assert current_version(root) == "v1"
    assert not (root / "artifacts" / "v9").exists() and not (root / "indexes" / "v9").exists()
    assert sorted(v.name for v in list_versions(root)) == ["v1", "v2"]
    history = read_history(root)
    assert history[: len(history_before)] == history_before
    assert [(e["event"], e["version"]) for e in history[len(history_before) :]] == [
        ("failed", "v9")
    ]
    assert any(line.split() == ["item_count", "FAILED"] for line in lines)
    assert not any(line.startswith("promoted") for line in lines)

    # The lock was released: the next night's good version goes through, the serving check
    # (the service's own loader, real ONNX Runtime) included.
    entry = rebuild(
        RebuildSettings(root=root, version="v10", artifacts=root / "artifacts" / "v2"),
        echo=lines.append,
    )
    assert entry["version"] == "v10" and entry["previous"] == "v1"
    assert entry["validation"]["ok"] and current_version(root) == "v10"
    assert entry["validation"]["checks"]["serving"].startswith("loaded by the service")
    assert "promoted v10 (previous v1)" in lines


def test_pipeline_keeps_a_failed_version_hidden_when_asked(root: Path) -> None:
    promote(root, "v1")
    settings = RebuildSettings(
        root=root,
        version="v9",
        artifacts=root / "artifacts" / "v2",
        thresholds=ValidationThresholds(min_recall=1.01),  # unreachable: recall <= 1
        keep_failed=True,
    )
    with pytest.raises(RebuildFailed) as caught:
        rebuild(settings, echo=lambda line: None)
    assert set(caught.value.report.failures) == {"recall"}  # type: ignore[union-attr]
    assert caught.value.kept == [root / "artifacts" / ".failed-v9", root / "indexes" / ".failed-v9"]
    assert all(path.is_dir() for path in caught.value.kept)
    assert current_version(root) == "v1" and "v9" not in {v.name for v in list_versions(root)}


def test_pipeline_refuses_before_writing(root: Path) -> None:
    """Bad settings, an existing version and a rebuild already running fail up front."""
    promote(root, "v1")
    history = read_history(root)
    usage = [
        RebuildSettings(root=root, retrain=True),  # no data
        RebuildSettings(root=root, run=root, artifacts=root),
        RebuildSettings(root=root, version="v2", artifacts=root / "artifacts" / "v2"),
    ]
    for settings in usage:
        with pytest.raises(ReleaseUsageError) as caught:
            rebuild(settings, echo=lambda line: None)
        assert caught.value.exit_code == 2
    with pytest.raises(ReleaseError, match="invalid version name"):
        rebuild(RebuildSettings(root=root, version="../v1"), echo=lambda line: None)
    with release_lock(root, wait=False, name=REBUILD_LOCK_FILE):
        with pytest.raises(ReleaseError, match="another process holds") as busy:
            rebuild(
                RebuildSettings(root=root, version="v9", artifacts=root / "artifacts" / "v2"),
                echo=lambda line: None,
            )
    assert not isinstance(busy.value, RebuildFailed)
    assert read_history(root) == history and current_version(root) == "v1"
    assert not (root / "artifacts" / "v9").exists()
