"""index_builder: IVF-PQ defaults, build/verify/load round trip, exclusion, failure modes.

Real FAISS on small clustered corpora (3000 x 32); the whole file runs in a few seconds.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import threading
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest

from contracts.manifest import (
    INDEX_FILE,
    ITEM_EMBEDDINGS_FILE,
    ITEM_IDS_FILE,
    MANIFEST_NAME,
    ArtifactError,
    read_manifest,
    write_manifest,
)
from index_builder import (
    NORM_BANDS,
    QUERY_EMBEDDINGS_FILE,
    LoadedIndex,
    build_from_artifacts,
    build_index,
    default_factory,
    default_k_factor,
    default_nprobe,
    exact_topk,
    is_norm_banded,
    load_index,
    norm_banded_partition,
    recall_at_k,
    sample_queries,
    set_search_params,
    tune_search_params,
)

pytestmark = pytest.mark.usefixtures("one_omp_thread")

N_ITEMS, DIM = 3000, 32
FACTORY_RE = re.compile(r"^IVF(\d+)(?:_NB(\d+))?,(?:PQ(\d+)x4fs,Refine\(Flat\)|SQ8)$")


def clustered_embeddings(n: int, dim: int, seed: int = 0, n_clusters: int = 30) -> np.ndarray:
    """Item embeddings around ``n_clusters`` centres with varying norms, float32 [n, dim]."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, dim))
    labels = rng.integers(0, n_clusters, n)
    emb = centres[labels] + 0.6 * rng.standard_normal((n, dim))
    emb *= rng.uniform(0.5, 1.5, (n, 1))
    return emb.astype(np.float32)


def write_artifacts(
    directory: Path,
    n: int = N_ITEMS,
    dim: int = DIM,
    seed: int = 0,
    embeddings: np.ndarray | None = None,
    item_ids: list[str] | None = None,
    queries: np.ndarray | None = None,
    **fields: Any,
) -> Path:
    """A fake user-tower export: item_embeddings.npy, item_ids.json, manifest.json."""
    directory.mkdir(parents=True, exist_ok=True)
    if embeddings is None:
        embeddings = clustered_embeddings(n, dim, seed)
    if item_ids is None:
        item_ids = [f"item-{row:05d}" for row in range(len(embeddings))]
    np.save(directory / ITEM_EMBEDDINGS_FILE, embeddings)
    (directory / ITEM_IDS_FILE).write_text(json.dumps(item_ids), encoding="utf-8")
    if queries is not None:
        np.save(directory / QUERY_EMBEDDINGS_FILE, queries)
    manifest = {
        "kind": "user_tower",
        "model_name": "t2diff",
        "model_version": "v-test",
        "embedding_dim": int(embeddings.shape[-1]),
        "num_items": len(embeddings),
        **fields,
    }
    write_manifest(directory, manifest)
    return directory


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, Any]]:
    """(artifacts dir, index dir, manifest) of one default build, shared by the tests."""
    root = tmp_path_factory.mktemp("built")
    artifacts = write_artifacts(root / "artifacts")
    out = root / "indexes" / "idx-001"
    manifest = build_from_artifacts(artifacts, out, n_queries=300)
    return artifacts, out, manifest


@pytest.fixture(scope="module")
def loaded(built: tuple[Path, Path, dict[str, Any]]) -> LoadedIndex:
    return load_index(built[1])


@pytest.fixture(scope="module")
def embeddings(built: tuple[Path, Path, dict[str, Any]]) -> np.ndarray:
    return np.load(built[0] / ITEM_EMBEDDINGS_FILE)


def manifest_fields(directory: Path) -> dict[str, Any]:
    """The manifest's own fields (without the file table), to re-write it after a change."""
    manifest = read_manifest(directory, verify=False)
    return {k: v for k, v in manifest.items() if k not in ("files", "schema_version")}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- defaults


@pytest.mark.parametrize("n_items", [100, 1000, 3000, 50_000, 1_000_000])
@pytest.mark.parametrize("dim", [32, 33, 64])
def test_default_factory_is_ivf_pq(n_items: int, dim: int) -> None:
    factory = default_factory(n_items, dim)
    match = FACTORY_RE.match(factory)
    assert match, factory
    nlist = int(match.group(1))
    if match.group(3) is not None:  # PQ shortlist + exact refinement
        m = int(match.group(3))
        assert dim % m == 0 and 2 * m >= dim
        assert default_k_factor(factory) > 1
        assert match.group(2) is None
    else:  # 8-bit residual codes of norm-banded lists scanned directly: no shortlist
        assert n_items * dim * 4 > 128 << 20
        assert default_k_factor(factory) == 1
        assert int(match.group(2)) == NORM_BANDS and is_norm_banded(factory)
        factory = factory.replace(f"_NB{NORM_BANDS}", "")  # FAISS's factory: same shape
    assert 1 <= nlist and nlist * 39 <= max(n_items, 39)
    assert nlist <= 4 * n_items**0.5
    assert 1 <= default_nprobe(n_items, factory) <= min(nlist, 256)
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    assert faiss.extract_index_ivf(index).nlist == nlist
    assert index.metric_type == faiss.METRIC_INNER_PRODUCT


def test_default_factory_by_size() -> None:
    assert default_factory(100, 32) == "IVF2,PQ16x4fs,Refine(Flat)"
    assert default_factory(3000, 32) == "IVF76,PQ16x4fs,Refine(Flat)"
    assert default_factory(500_000, 64) == "IVF2828,PQ32x4fs,Refine(Flat)"
    # A large corpus scans 8-bit residual codes (73 B/item at 1M) instead of keeping floats,
    # in lists cut by direction and then by norm (500 directions x 8 bands at 1M).
    assert default_factory(1_000_000, 64) == "IVF4000_NB8,SQ8"
    assert default_factory(5_000_000, 64) == "IVF8944_NB8,SQ8"
    assert default_factory(600_000, 64) == "IVF3098_NB8,SQ8"  # 154 MB of floats: over 128 MiB
    # Search settings start cheap at 1M (16 lists: banded lists concentrate the top-100);
    # the build tunes them up to TARGET_RECALL on the real embeddings.
    assert default_nprobe(1_000_000, "IVF4000_NB8,SQ8") == 16
    assert default_nprobe(1_000_000, "IVF4000,SQ8") == 32
    assert default_k_factor("IVF4000_NB8,SQ8") == 1
    assert default_k_factor("IVF4000,PQ32x4fs,Refine(Flat)") == 4
    # Small corpora scan at least ~2048 codes.
    assert default_nprobe(3000, "IVF76,PQ16x4fs,Refine(Flat)") == 52


@pytest.mark.parametrize("n_items", [5, 100, 3000])
def test_build_index_small_corpora(n_items: int) -> None:
    emb = clustered_embeddings(n_items, DIM, seed=n_items)
    factory = default_factory(n_items, DIM)
    index = build_index(emb, factory)
    assert index.ntotal == n_items and index.is_trained
    queries = sample_queries(emb, 50, seed=1)
    nprobe = default_nprobe(n_items, factory)
    assert recall_at_k(index, emb, queries, 10, nprobe, default_k_factor(factory)) >= 0.95


def test_sq8_factory_builds_and_searches() -> None:
    """The large-corpus layout (``IVF...,SQ8``, no refine stage) on a small corpus."""
    emb = clustered_embeddings(N_ITEMS, DIM)
    index = build_index(emb, "IVF76,SQ8")
    queries = sample_queries(emb, 100, seed=2)
    # Per-call parameters work without a refine stage (k_factor is ignored).
    assert recall_at_k(index, emb, queries, 100, 76, 1) >= 0.95
    nprobe, k_factor, recall = tune_search_params(
        index, emb, queries, 100, 4, 1, target=0.95, latency_queries=10
    )
    assert k_factor == 1 and recall >= 0.95 and 4 <= nprobe <= 76


def lognormal_norm_corpus(
    n: int, dim: int, seed: int, n_clusters: int = 100
) -> tuple[np.ndarray, np.ndarray]:
    """(items, mixture queries) like ``bench/bench_index.py``'s, small: clustered unit
    directions times log-normal norms; 200 queries mixing 1-3 cluster centres."""
    rng = np.random.default_rng(seed)
    topics = rng.standard_normal((8, dim))
    centres = topics[rng.integers(0, 8, n_clusters)] + 0.8 * rng.standard_normal((n_clusters, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weights = 1.0 / np.arange(1, n_clusters + 1) ** 0.5
    labels = rng.choice(n_clusters, size=n, p=weights / weights.sum())
    emb = centres[labels] + rng.standard_normal((n, dim)) * (0.5 / dim**0.5)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    emb *= rng.lognormal(0.0, 0.2, (n, 1))
    queries = np.empty((200, dim))
    for row in range(200):
        picked = centres[rng.choice(n_clusters, size=int(rng.integers(1, 4)), replace=False)]
        mix = rng.dirichlet(np.ones(len(picked))) @ picked
        queries[row] = mix / np.linalg.norm(mix) + rng.standard_normal(dim) * (0.3 / dim**0.5)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return emb.astype(np.float32), queries.astype(np.float32)


def test_norm_banded_partition_bands_lists_by_norm() -> None:
    emb, _ = lognormal_norm_corpus(8000, DIM, seed=21)
    centroids, assign = norm_banded_partition(emb, 160, 8, seed=0)
    assert centroids.shape == (160, DIM) and assign.shape == (8000,)
    counts = np.bincount(assign, minlength=160)
    assert counts.min() >= 1 and counts.sum() == 8000
    # Each list's centroid is the mean of its rows, so <q, centroid> is its mean score.
    for lst in (0, 77, 159):
        np.testing.assert_allclose(centroids[lst], emb[assign == lst].mean(axis=0), atol=1e-5)
    # Within a direction cluster (lists 8c..8c+7) the bands are ordered by norm, disjointly.
    norms = np.linalg.norm(emb, axis=1)
    for cluster in (0, 5, 19):
        bands = [norms[assign == 8 * cluster + b] for b in range(8)]
        for lower, upper in zip(bands, bands[1:], strict=False):
            assert lower.max() <= upper.min()
    # Deterministic for a seed.
    again = norm_banded_partition(emb, 160, 8, seed=0)
    np.testing.assert_array_equal(again[1], assign)


def test_norm_banded_ivf_scans_fewer_codes_for_the_same_recall() -> None:
    """Banded lists reach a recall@100 with fewer probed lists than plain ones of the same
    count and size (the reason the large-corpus default uses them)."""
    emb, queries = lognormal_norm_corpus(20_000, DIM, seed=22, n_clusters=141)
    _, exact = exact_topk(emb, queries, 100)
    banded = build_index(emb, "IVF560_NB8,SQ8")
    plain = build_index(emb, "IVF560,SQ8")
    ivf = faiss.downcast_index(faiss.extract_index_ivf(banded))
    assert isinstance(ivf, faiss.IndexIVFScalarQuantizer) and ivf.by_residual
    assert banded.ntotal == 20_000 and ivf.nlist == 560
    assert banded.metric_type == faiss.METRIC_INNER_PRODUCT
    # (The gap grows with the corpus: at 1M, 0.98 needs ~5k codes against ~23k.)
    for nprobe in (8, 16):
        got = recall_at_k(banded, emb, queries, 100, nprobe, 1, exact)
        assert got > recall_at_k(plain, emb, queries, 100, nprobe, 1, exact) + 0.02
    # Scanning every list, the 8-bit codes (ranges from all rows: no clipped top items)
    # leave only quantisation error.
    assert recall_at_k(banded, emb, queries, 100, 560, 1, exact) >= 0.97
    # Rows are the index ids, and the saved index is a plain FAISS one.
    scores, rows = banded.search(emb[:5] / np.linalg.norm(emb[:5], axis=1, keepdims=True), 1)
    assert (rows[:, 0] >= 0).all()
    restored = faiss.deserialize_index(faiss.serialize_index(banded))
    np.testing.assert_array_equal(
        restored.search(queries[:10], 10)[1], banded.search(queries[:10], 10)[1]
    )


def test_norm_banded_factory_is_validated() -> None:
    emb, _ = lognormal_norm_corpus(2000, DIM, seed=24)
    with pytest.raises(ValueError, match="norm bands"):
        build_index(emb, "IVF40_NB8,PQ16x4fs")
    assert not is_norm_banded("IVF40,SQ8") and is_norm_banded("IVF40_NB4,SQ6")


def test_tuner_returns_a_pareto_optimal_setting() -> None:
    emb = clustered_embeddings(N_ITEMS, DIM, seed=11)
    index = build_index(emb, default_factory(N_ITEMS, DIM))
    queries = sample_queries(emb, 150, seed=12)
    _, exact = exact_topk(emb, queries, 100)
    target = 0.97
    nprobe, k_factor, recall = tune_search_params(
        index, emb, queries, 100, 2, 1, target, exact_rows=exact, latency_queries=0
    )
    assert recall >= target
    assert recall == recall_at_k(index, emb, queries, 100, nprobe, k_factor, exact)
    # Neither knob can be lowered one step and still reach the target.
    if nprobe > 2:
        smaller = max(2, round(nprobe / 2**0.5))
        assert recall_at_k(index, emb, queries, 100, smaller, k_factor, exact) < target
    if k_factor > 1:
        assert recall_at_k(index, emb, queries, 100, nprobe, k_factor // 2, exact) < target
    # Timing the candidates only chooses among settings that reach the target.
    timed = tune_search_params(index, emb, queries, 100, 2, 1, target, exact, latency_queries=20)
    assert timed[2] >= target


def test_tuner_reports_the_best_setting_when_the_target_is_unreachable() -> None:
    emb = clustered_embeddings(1000, DIM, seed=13)
    index = build_index(emb, "IVF25,PQ16x4fs")  # no refine stage: 4-bit PQ error stays
    queries = sample_queries(emb, 60, seed=14)
    nprobe, k_factor, recall = tune_search_params(index, emb, queries, 100, 1, 1, 1.01)
    assert k_factor == 1 and 0 < recall < 1.01 and 1 <= nprobe <= 25
    assert recall == recall_at_k(index, emb, queries, 100, nprobe, 1)
    assert recall > recall_at_k(index, emb, queries, 100, 1, 1)


def test_set_search_params_mutates_index() -> None:
    emb = clustered_embeddings(1000, DIM)
    index = build_index(emb, default_factory(1000, DIM))
    set_search_params(index, nprobe=7, k_factor=3)
    assert faiss.extract_index_ivf(index).nprobe == 7
    assert faiss.downcast_index(index).k_factor == 3


def test_sample_queries_are_user_like() -> None:
    emb = clustered_embeddings(N_ITEMS, DIM)
    queries = sample_queries(emb, 200, seed=3)
    assert queries.shape == (200, DIM) and queries.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(queries, axis=1), 1.0, rtol=1e-4)
    # Near items (unlike uniform noise): the best cosine to an item is high.
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    assert np.median((queries @ unit.T).max(axis=1)) > 0.7
    np.testing.assert_array_equal(queries, sample_queries(emb, 200, seed=3))


# --------------------------------------------------------------------------- build


def test_build_writes_verified_manifest(built: tuple[Path, Path, dict[str, Any]]) -> None:
    artifacts, out, manifest = built
    assert read_manifest(out, verify=True) == manifest
    assert set(manifest["files"]) == {INDEX_FILE, ITEM_IDS_FILE}
    assert manifest["kind"] == "ann_index"
    assert manifest["index_version"] == "idx-001"
    assert FACTORY_RE.match(manifest["factory"])
    assert manifest["metric"] == "inner_product"
    assert manifest["num_items"] == N_ITEMS and manifest["embedding_dim"] == DIM
    assert manifest["model_name"] == "t2diff"
    assert manifest["model_version"] == manifest["artifacts_version"] == "v-test"
    assert manifest["artifacts_dir"] == str(artifacts)
    assert manifest["recall_queries"] == {"count": 300, "source": "sampled"}
    assert manifest["recall_at_100"] >= 0.95
    assert manifest["recall_at_10"] >= 0.95
    assert manifest["faiss_version"] == faiss.__version__
    assert manifest["bytes_per_item"] > 0 and manifest["build_seconds"] >= 0
    assert manifest["created_at"].endswith("+00:00")
    assert (out / ITEM_IDS_FILE).read_bytes() == (artifacts / ITEM_IDS_FILE).read_bytes()
    # Nothing is left behind beside the version.
    assert [p.name for p in out.parent.iterdir()] == ["idx-001"]


def test_recall_at_default_nprobe_vs_exact(
    loaded: LoadedIndex, embeddings: np.ndarray, built: tuple[Path, Path, dict[str, Any]]
) -> None:
    """Independent of the build's own measurement: fresh queries, the manifest's nprobe."""
    queries = sample_queries(embeddings, 300, seed=1234)
    for k in (10, 100):
        _, exact = exact_topk(embeddings, queries, k)
        _, rows = loaded.search(queries, k)
        recall = np.mean([len(np.intersect1d(a, e)) / k for a, e in zip(rows, exact, strict=True)])
        assert recall >= 0.95, (k, recall)
    assert loaded.nprobe == built[2]["nprobe"]


def test_user_query_embeddings_are_used(tmp_path: Path) -> None:
    emb = clustered_embeddings(1000, DIM, seed=5)
    queries = sample_queries(emb, 120, seed=6)
    artifacts = write_artifacts(tmp_path / "a", embeddings=emb, queries=queries)
    manifest = build_from_artifacts(artifacts, tmp_path / "out")
    assert manifest["recall_queries"] == {"count": 60, "source": "user_embeddings"}
    assert manifest["recall_at_100"] >= 0.95


def test_explicit_nprobe_and_version(tmp_path: Path) -> None:
    artifacts = write_artifacts(tmp_path / "a", n=1000)
    manifest = build_from_artifacts(
        artifacts, tmp_path / "out" / "v7", nprobe=3, index_version="2024-01-01", n_queries=100
    )
    assert manifest["nprobe"] == 3 and manifest["index_version"] == "2024-01-01"
    assert load_index(tmp_path / "out" / "v7").version == "2024-01-01"


def _tamper_nan(d: Path) -> None:
    emb = np.load(d / ITEM_EMBEDDINGS_FILE)
    emb[17, 3] = np.nan
    write_artifacts(d, embeddings=emb)


def _tamper_inf(d: Path) -> None:
    emb = np.load(d / ITEM_EMBEDDINGS_FILE)
    emb[5, 0] = np.inf
    write_artifacts(d, embeddings=emb)


def _tamper_dim(d: Path) -> None:
    write_artifacts(d, embeddings=np.load(d / ITEM_EMBEDDINGS_FILE), embedding_dim=DIM + 1)


def _tamper_num_items(d: Path) -> None:
    write_artifacts(d, embeddings=np.load(d / ITEM_EMBEDDINGS_FILE), num_items=N_ITEMS - 1)


def _tamper_ids(d: Path) -> None:
    ids = [f"i{r}" for r in range(N_ITEMS - 1)]
    emb = np.load(d / ITEM_EMBEDDINGS_FILE)
    write_artifacts(d, embeddings=emb, item_ids=ids, num_items=N_ITEMS)


def _tamper_duplicate_ids(d: Path) -> None:
    ids = [f"i{r}" for r in range(N_ITEMS)]
    ids[1] = ids[0]
    write_artifacts(d, embeddings=np.load(d / ITEM_EMBEDDINGS_FILE), item_ids=ids)


def _tamper_dtype(d: Path) -> None:
    write_artifacts(d, embeddings=np.load(d / ITEM_EMBEDDINGS_FILE).astype(np.float64))


def _tamper_checksum(d: Path) -> None:
    emb = np.load(d / ITEM_EMBEDDINGS_FILE)
    emb[0, 0] += 1.0
    np.save(d / ITEM_EMBEDDINGS_FILE, emb)  # after the manifest: checksum mismatch


def _tamper_missing(d: Path) -> None:
    (d / ITEM_IDS_FILE).unlink()


def _tamper_kind(d: Path) -> None:
    write_artifacts(d, embeddings=np.load(d / ITEM_EMBEDDINGS_FILE), kind="ann_index")


def _tamper_no_manifest(d: Path) -> None:
    (d / MANIFEST_NAME).unlink()


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (_tamper_nan, "NaN or inf"),
        (_tamper_inf, "NaN or inf"),
        (_tamper_dim, "embedding_dim"),
        (_tamper_num_items, "num_items"),
        (_tamper_ids, "ids"),
        (_tamper_duplicate_ids, "duplicate"),
        (_tamper_dtype, "float32"),
        (_tamper_checksum, "checksum"),
        (_tamper_missing, "missing"),
        (_tamper_kind, "kind"),
        (_tamper_no_manifest, "manifest"),
    ],
)
def test_bad_artifacts_are_refused(tmp_path: Path, tamper: Any, reason: str) -> None:
    artifacts = write_artifacts(tmp_path / "artifacts")
    tamper(artifacts)
    out = tmp_path / "indexes" / "v1"
    with pytest.raises(ArtifactError, match=reason):
        build_from_artifacts(artifacts, out, n_queries=50)
    assert not out.exists()


def test_existing_out_dir_is_never_overwritten(
    built: tuple[Path, Path, dict[str, Any]],
) -> None:
    artifacts, out, _ = built
    before = {p.name: sha(p) for p in out.iterdir()}
    with pytest.raises(FileExistsError, match="never"):
        build_from_artifacts(artifacts, out, n_queries=50)
    assert {p.name: sha(p) for p in out.iterdir()} == before
    assert [p.name for p in out.parent.iterdir()] == ["idx-001"]


def test_empty_out_dir_is_filled(tmp_path: Path) -> None:
    artifacts = write_artifacts(tmp_path / "a", n=500)
    out = tmp_path / "idx"
    out.mkdir()
    build_from_artifacts(artifacts, out, n_queries=50)
    assert (out / INDEX_FILE).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "idx"]


# --------------------------------------------------------------------------- load


def test_load_round_trip_matches_exact(loaded: LoadedIndex, embeddings: np.ndarray) -> None:
    assert loaded.version == "idx-001"
    assert loaded.ntotal == N_ITEMS == len(loaded.item_ids)
    queries = sample_queries(embeddings, 200, seed=77)
    exact_scores, exact_rows = exact_topk(embeddings, queries, 10)
    scores, rows = loaded.search(queries, 10)
    assert scores.shape == rows.shape == (200, 10)
    same = [set(a) == set(e) for a, e in zip(rows, exact_rows, strict=True)]
    assert np.mean(same) >= 0.9
    # Refine(Flat) re-scores exactly: identical rows carry the exact scores, best first.
    for b in np.flatnonzero(same):
        np.testing.assert_allclose(scores[b], exact_scores[b], rtol=1e-4, atol=1e-4)
    assert (np.diff(scores, axis=1) <= 1e-6).all()
    ids = loaded.ids_for(rows[:2])
    assert ids[0] == [f"item-{r:05d}" for r in rows[0]]


def test_search_pads_when_k_exceeds_corpus(tmp_path: Path) -> None:
    artifacts = write_artifacts(tmp_path / "a", n=40)
    build_from_artifacts(artifacts, tmp_path / "i", n_queries=20)
    index = load_index(tmp_path / "i")
    emb = np.load(artifacts / ITEM_EMBEDDINGS_FILE)
    scores, rows = index.search(emb[:3], 50, nprobe=1000)
    assert (rows[:, :40] >= 0).all() and (rows[:, 40:] == -1).all()
    assert np.isneginf(scores[:, 40:]).all()
    assert [len(r) for r in index.ids_for(rows)] == [40, 40, 40]


def test_search_rejects_bad_queries(loaded: LoadedIndex) -> None:
    with pytest.raises(ValueError):
        loaded.search(np.zeros((2, DIM + 1), np.float32), 5)
    with pytest.raises(ValueError):
        loaded.search(np.full((1, DIM), np.nan, np.float32), 5)
    with pytest.raises(ValueError):
        loaded.search(np.zeros((1, DIM), np.float32), 0)


def test_nprobe_override_is_per_call(loaded: LoadedIndex, embeddings: np.ndarray) -> None:
    queries = sample_queries(embeddings, 100, seed=8)
    _, exact = exact_topk(embeddings, queries, 100)
    nlist = faiss.extract_index_ivf(loaded.index).nlist

    def recall(rows: np.ndarray) -> float:
        return float(np.mean([len(np.intersect1d(a, e)) for a, e in zip(rows, exact, strict=True)]))

    low = recall(loaded.search(queries, 100, nprobe=1)[1])
    full = recall(loaded.search(queries, 100, nprobe=nlist)[1])
    assert low < full and full >= 99
    # The shared index was not mutated by the per-call parameters.
    assert faiss.extract_index_ivf(loaded.index).nprobe == loaded.nprobe


def test_concurrent_searches_match_sequential(loaded: LoadedIndex, embeddings: np.ndarray) -> None:
    queries = sample_queries(embeddings, 64, seed=9)
    nlist = faiss.extract_index_ivf(loaded.index).nlist
    settings = [(1, 10), (nlist, 10), (4, 100), (None, 50)]
    expected = {s: loaded.search(queries, s[1], nprobe=s[0])[1] for s in settings}
    errors: list[str] = []

    def worker(setting: tuple[int | None, int]) -> None:
        for b in range(len(queries)):
            _, rows = loaded.search(queries[b : b + 1], setting[1], nprobe=setting[0])
            if not np.array_equal(rows[0], expected[setting][b]):
                errors.append(f"{setting} query {b}")

    threads = [threading.Thread(target=worker, args=(s,)) for s in settings * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_corrupted_index_is_refused(
    built: tuple[Path, Path, dict[str, Any]], tmp_path: Path
) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(built[1], copy)
    data = bytearray((copy / INDEX_FILE).read_bytes())
    for pos in (len(data) // 3, len(data) // 2):
        data[pos] ^= 0xFF
    (copy / INDEX_FILE).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum"):
        load_index(copy)


def test_unreadable_index_with_valid_checksum_is_refused(
    built: tuple[Path, Path, dict[str, Any]], tmp_path: Path
) -> None:
    """A manifest re-written over a truncated index passes the checksums; FAISS must not."""
    copy = tmp_path / "copy"
    shutil.copytree(built[1], copy)
    data = (copy / INDEX_FILE).read_bytes()
    (copy / INDEX_FILE).write_bytes(data[: len(data) // 2])
    fields = manifest_fields(copy)
    write_manifest(copy, fields)
    with pytest.raises(ArtifactError, match="unreadable"):
        load_index(copy)


def test_missing_index_and_inconsistent_ids_are_refused(
    built: tuple[Path, Path, dict[str, Any]], tmp_path: Path
) -> None:
    missing = tmp_path / "missing"
    shutil.copytree(built[1], missing)
    (missing / INDEX_FILE).unlink()
    with pytest.raises(ArtifactError, match="missing"):
        load_index(missing)

    short = tmp_path / "short"
    shutil.copytree(built[1], short)
    ids = json.loads((short / ITEM_IDS_FILE).read_text())
    (short / ITEM_IDS_FILE).write_text(json.dumps(ids[:-1]))
    fields = manifest_fields(short)
    write_manifest(short, fields)
    with pytest.raises(ArtifactError, match="ids"):
        load_index(short)

    wrong_dim = tmp_path / "dim"
    shutil.copytree(built[1], wrong_dim)
    write_manifest(wrong_dim, {**fields, "embedding_dim": DIM * 2})
    with pytest.raises(ArtifactError, match="embedding_dim"):
        load_index(wrong_dim)


# --------------------------------------------------------------------------- exclusion


@pytest.mark.parametrize("method", ["auto", "selector", "overfetch"])
def test_search_excluding_never_returns_excluded(
    loaded: LoadedIndex, embeddings: np.ndarray, method: str
) -> None:
    rng = np.random.default_rng(11)
    queries = sample_queries(embeddings, 40, seed=12)
    k = 20
    _, top = loaded.search(queries, 60)
    exclude: list[Any] = []
    for b in range(len(queries)):
        # The best results themselves, random rows and out-of-range rows.
        rows = set(top[b, : rng.integers(0, 40)].tolist()) | set(rng.integers(0, N_ITEMS, 30))
        rows |= {-1, N_ITEMS + 5}
        exclude.append(rows if b % 2 else np.fromiter(rows, np.int64))
    scores, rows = loaded.search_excluding(queries, k, exclude, method=method)  # type: ignore[arg-type]
    assert rows.shape == (len(queries), k)
    for b in range(len(queries)):
        assert not set(rows[b].tolist()) & set(np.asarray(list(exclude[b])).tolist())
        assert (rows[b] >= 0).all()
        # What is left is (nearly) the unfiltered ranking minus the excluded rows.
        expected = [r for r in top[b] if r not in set(np.asarray(list(exclude[b])).tolist())]
        assert len(set(rows[b]) & set(expected[:k])) >= k - 2
    # A single query with a large exclusion set takes the selector path.
    big = set(range(0, N_ITEMS, 2))
    _, rows1 = loaded.search_excluding(queries[:1], 50, [big])
    assert not set(rows1[0].tolist()) & big and (rows1[0] >= 0).all()
    # Empty exclusion sets: plain search.
    np.testing.assert_array_equal(
        loaded.search_excluding(queries, k, [set()] * len(queries))[1], loaded.search(queries, k)[1]
    )
    with pytest.raises(ValueError):
        loaded.search_excluding(queries, k, [set()])
