"""Build a FAISS IVF-PQ index over the item embeddings of a user-tower export.

The recall stage scores a user embedding against every item by inner product.  Exact search
costs ``N * d`` multiply-adds per request, so the service searches an approximate index
instead: an inverted file (IVF) narrows the search to the ``nprobe`` closest of ``nlist``
clusters, 4-bit fast-scan product-quantisation (PQ) codes rank the candidates in those lists
with SIMD look-up tables, and a refinement stage re-scores the best ``k * k_factor``
candidates with (near-)exact vectors.  Each build is measured against exact search before it
is written, and the measured recall goes into the index manifest, so a bad build is visible
before the service loads it.

An index version is a directory ``index.faiss`` + ``item_ids.json`` + ``manifest.json``;
it is written to a hidden sibling directory and renamed into place, so a reader never sees
half a version and a version is never written over an older one.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from faiss.contrib.ivf_tools import add_preassigned

from contracts.manifest import (
    INDEX_FILE,
    INDEX_KIND,
    ITEM_EMBEDDINGS_FILE,
    ITEM_IDS_FILE,
    ArtifactError,
    TowerExportManifest,
    write_manifest,
)

#: Optional file of real user embeddings (float32 ``[Q, d]``) in an artifacts directory;
#: when present, recall is measured on them instead of on sampled queries.
QUERY_EMBEDDINGS_FILE = "query_embeddings.npy"
METRIC_NAME = "inner_product"

#: Minimum training points per inverted list: below ~39 FAISS's k-means warns and the
#: centroids are poorly estimated.
MIN_POINTS_PER_LIST = 39
#: 4-bit PQ has 16 centroids per sub-quantiser; k-means needs at least that many points.
MIN_PQ_TRAIN_POINTS = 16
#: Keep the raw float vectors (``Refine(Flat)``, 4*d bytes/item, exact re-scoring) while
#: they fit in this many bytes; above it scan 8-bit residual codes (``IVF...,SQ8``).
FLAT_REFINE_MAX_BYTES = 128 << 20
#: Training points per inverted list used when subsampling a large corpus (FAISS's own
#: k-means caps at 256 per centroid; 64 is plenty for centroid quality and 4x faster).
TRAIN_POINTS_PER_LIST = 64
MIN_TRAIN_POINTS = 100_000
#: :func:`default_nprobe` probes 1/128 of the lists (0.8% of the corpus at
#: ``nlist = 4 sqrt(N)``), but enough to scan about this many codes ...
DEFAULT_NPROBE_FRACTION = 1 / 128
MIN_SCANNED_ITEMS = 2048
#: ... but never more than this many lists by default.
MAX_DEFAULT_NPROBE = 256
#: The refine shortlist is sized for at least a top-``SHORTLIST_MIN_K`` search.
SHORTLIST_MIN_K = 100
#: Largest refine ``k_factor`` that tuning goes to.
MAX_K_FACTOR = 64
#: Refine shortlist multiplier to start from (``k_factor * max(k, 100)`` re-scored).
DEFAULT_K_FACTOR = 4
#: Recall@100 that :func:`build_from_artifacts` tunes ``nprobe`` / ``k_factor`` for.
TARGET_RECALL = 0.98
#: Single-query searches timed per candidate setting when tuning picks the fastest one.
TUNING_LATENCY_QUERIES = 200
#: Tuning stops widening ``nprobe`` at a ``k_factor`` once a step gains less recall than this.
PLATEAU_GAIN = 5e-4

#: Norm bands per direction cluster in the large-corpus layout (``IVF{nlist}_NB8,SQ8``,
#: :func:`build_norm_banded_ivf`): 8 bands of 4 sqrt(N) lists cut the codes scanned at
#: recall@100 0.98 from ~23k to ~5k at 1M items (``docs/results/index.md``).
NORM_BANDS = 8
#: Norm-banded layouts start tuning at 1/256 of the lists: their top-100 sits in fewer,
#: higher-scoring lists, so 1/128 would already overshoot the target at 1M.
NB_NPROBE_FRACTION = 1 / 256
#: Spherical k-means iterations for the direction clusters of a norm-banded layout.
NB_KMEANS_ITERATIONS = 20

_IVF_RE = re.compile(r"IVF(\d+)")
#: ``IVF{nlist}_NB{bands},SQ{bits}``: this project's norm-banded IVF, built by
#: :func:`build_norm_banded_ivf` (FAISS's factory has no such quantiser; the saved index is
#: a plain ``IndexIVFScalarQuantizer``, searched like any other).
_NB_RE = re.compile(r"^IVF(\d+)_NB(\d+),(SQ(?:4|6|8|fp16))$")


def _pq_subquantizers(dim: int) -> int:
    """The smallest divisor of ``dim`` that is >= ``dim / 2`` (``dim / 2`` for an even dim).

    ``M = dim / 2`` gives 2 dimensions per 4-bit sub-quantiser (``dim / 4`` bytes per
    vector), enough for the PQ stage to shortlist candidates for the refine stage.  ``M``
    must divide ``dim``; rounding up for an odd ``dim`` never degenerates (a prime ``dim``
    gets ``M = dim``, one dimension per sub-quantiser, rather than a single 16-centroid
    codebook for the whole vector).
    """
    return min(m for m in range(1, dim + 1) if dim % m == 0 and 2 * m >= dim)


def default_nlist(n_items: int) -> int:
    """Number of inverted lists: ``~4 * sqrt(N)``, with at least 39 training points per list.

    ``4 * sqrt(N)`` balances the coarse-quantiser cost (``nlist`` dot products per query)
    against the list scan (``nprobe * N / nlist`` codes).  The cap ``N // 39`` keeps k-means
    well posed, which makes tiny corpora use a handful of lists (2 lists at N=100, 25 at
    N=1000); a list count that small costs nothing because the whole corpus is tiny.
    """
    if n_items < 1:
        raise ValueError("n_items must be >= 1")
    return max(1, min(int(4 * math.sqrt(n_items)), n_items // MIN_POINTS_PER_LIST))


def default_factory(n_items: int, dim: int) -> str:
    """A FAISS factory string for ``n_items`` vectors of ``dim`` dimensions (inner product).

    While the raw float32 vectors take <= 128 MiB (e.g. up to 524k items at d=64):
    ``IVF{nlist},PQ{M}x4fs,Refine(Flat)``:

    * ``IVF{nlist}``: ``nlist = min(4 * sqrt(N), N // 39)``, see :func:`default_nlist`
      (e.g. 2 at N=100, 76 at N=3000, 4000 at N=1e6).
    * ``PQ{M}x4fs``: 4-bit fast-scan PQ with ``M = dim/2`` (rounded up to a divisor of dim)
      (``dim/4`` bytes/item).  Fast-scan keeps the 16-entry look-up tables in SIMD registers,
      several times faster than 8-bit PQ per code; its coarser codes are only used to build a
      shortlist, so their error is corrected by the refine stage.
    * ``Refine(Flat)``: exact re-scoring of the shortlist with the raw vectors.

    Above that: ``IVF{nlist},SQ8``, the lists hold 8-bit scalar-quantised residuals (``dim``
    bytes + 8 B of id per item, 73 bytes/item at N=1e6, d=64) that are scanned directly, with
    no shortlist.  At 1M items on user-like queries that mix several clusters this reaches
    recall@100 0.98 at about half the single-query latency of the former
    ``IVF4000,PQ32x4fs,Refine(SQ8)`` (88 B/item), whose 16-byte PQ codes rank the true
    neighbours so roughly that 0.98 needed a 3200-candidate shortlist (``k_factor`` 32); a
    32-byte ``PQ64x4fs`` shortlist fixes that but with SQ8 refinement costs 107 B/item, over
    the 100 B budget, and a 6-bit refinement caps recall@100 at 0.97
    (``docs/results/index.md`` has the measurements).  OPQ is not used: it left recall
    unchanged in the benchmark while multiplying the build time.  The search settings start
    at :func:`default_nprobe` and :func:`default_k_factor` and the build picks the fastest
    setting that reaches :data:`TARGET_RECALL` on held-out queries
    (:func:`tune_search_params`).
    """
    if dim < 1:
        raise ValueError("dim must be >= 1")
    nlist = default_nlist(n_items)
    if n_items * dim * 4 > FLAT_REFINE_MAX_BYTES:
        return f"IVF{nlist}_NB{NORM_BANDS},SQ8"
    m = _pq_subquantizers(dim)
    return f"IVF{nlist},PQ{m}x4fs,Refine(Flat)"


def factory_nlist(factory: str) -> int | None:
    """The ``nlist`` of an ``IVF{nlist},...`` factory string, or None if it is not IVF."""
    match = _IVF_RE.search(factory)
    return int(match.group(1)) if match else None


def is_norm_banded(factory: str) -> bool:
    """Whether ``factory`` is this project's norm-banded ``IVF{nlist}_NB{bands},SQ...``."""
    return _NB_RE.match(factory) is not None


def default_nprobe(n_items: int, factory: str) -> int:
    """Lists probed per query: 1/128 of them, at least ~2048 items' worth, at most 256.

    The starting point of the build's tuning, chosen cheap: at N=1e6 (``IVF4000``) it is
    32 lists, 0.8% of the corpus, enough for recall@100 >= 0.98 on well-separated clustered
    embeddings (the issue's yardstick, and queries near one cluster centre in the
    benchmark).  Small corpora probe enough lists to scan ~:data:`MIN_SCANNED_ITEMS` codes
    (up to all of them): that costs microseconds and buys the recall a few dozen lists
    can't give.  Embeddings whose neighbours spread over more lists need more (about 91
    lists at 1M for queries mixing 1-3 clusters): :func:`build_from_artifacts` measures
    recall on held-out queries and :func:`tune_search_params` picks the fastest setting
    that reaches :data:`TARGET_RECALL`, so that is the one recorded
    (``docs/results/index.md`` has the measured trade-off).
    """
    nlist = factory_nlist(factory)
    if nlist is None:
        return 1
    start = NB_NPROBE_FRACTION if is_norm_banded(factory) else DEFAULT_NPROBE_FRACTION
    fraction = max(start, min(1.0, MIN_SCANNED_ITEMS / max(n_items, 1)))
    return int(min(nlist, max(1, min(MAX_DEFAULT_NPROBE, math.ceil(nlist * fraction)))))


def default_k_factor(factory: str) -> int:
    """Shortlist multiplier of the refine stage: ``k * k_factor`` candidates are re-scored.

    4 (400 candidates for a top-100): enough on well-separated clusters; each doubling
    costs ~0.1-0.4 ms per query at N=1e6 (random reads of the re-scored vectors plus a
    larger result heap in the fast-scan stage).  Dense clusters, where 4-bit PQ orders near
    neighbours only roughly, need 16-32x, which :func:`tune_search_params` finds.  Searches re-score ``k_factor * max(k, 100)`` candidates
    (:func:`shortlist_k_factor`).  1 for a factory without a refine stage.
    """
    return DEFAULT_K_FACTOR if "Refine" in factory else 1


def _as_index(index: Any) -> Any:
    return faiss.downcast_index(index)


def set_search_params(index: faiss.Index, nprobe: int, k_factor: float) -> None:
    """Set ``nprobe`` on the IVF part and ``k_factor`` on the refine part of ``index``.

    This mutates the index, so it is for offline use (building, benchmarking) or to bake
    defaults into a saved index.  A server answering concurrent queries should pass
    per-call parameters instead (:meth:`index_builder.loaded.LoadedIndex.search` does).
    """
    index = _as_index(index)
    if isinstance(index, faiss.IndexRefine):
        index.k_factor = float(k_factor)
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:  # not an IVF index
        return
    ivf.nprobe = int(min(nprobe, ivf.nlist))


def shortlist_k_factor(k: int, k_factor: float, min_k: int = SHORTLIST_MIN_K) -> float:
    """The refine ``k_factor`` for a top-``k`` search: ``k_factor * max(k, min_k) / k``.

    The refine stage re-scores ``k_factor * max(k, min_k)`` candidates: 4-bit PQ orders close
    neighbours only roughly, so a top-10 search with a shortlist of 10 * k_factor misses
    true neighbours that the top-100 shortlist (which the build tunes and measures)
    catches.  Re-scoring a few hundred extra vectors costs ~0.1 ms.  FAISS takes a float
    ``k_factor``, so no rounding is needed.
    """
    return float(k_factor) * max(k, min_k) / max(k, 1)


def make_search_params(
    index: faiss.Index,
    nprobe: int,
    k_factor: float,
    sel: faiss.IDSelector | None = None,
) -> faiss.SearchParameters:
    """Per-call search parameters for ``index`` (nprobe, k_factor, optional ID selector).

    Passing these to ``index.search(..., params=...)`` leaves the shared index untouched,
    so concurrent searches with different settings don't race.  Handles Refine, PreTransform
    and IVF indexes (recursively).  The selector goes to the IVF/base level where the
    candidates are generated: the refine stage only re-scores candidates.  FAISS's Python
    wrapper keeps the sub-objects (base parameters, selector) alive with the parameters.
    """

    def build(idx: Any) -> faiss.SearchParameters:
        idx = _as_index(idx)
        if isinstance(idx, faiss.IndexRefine):
            return faiss.IndexRefineSearchParameters(
                k_factor=float(k_factor), base_index_params=build(idx.base_index)
            )
        if isinstance(idx, faiss.IndexPreTransform):
            return faiss.SearchParametersPreTransform(index_params=build(idx.index))
        if isinstance(idx, faiss.IndexIVF):
            params = faiss.SearchParametersIVF(nprobe=int(min(max(nprobe, 1), idx.nlist)))
        else:
            params = faiss.SearchParameters()
        if sel is not None:
            params.sel = sel
        return params

    return build(index)


def _training_set(embeddings: np.ndarray, nlist: int | None, seed: int) -> np.ndarray:
    """Rows to train on: a random subsample of a huge corpus, a tiled copy of a tiny one.

    k-means on ``64 * nlist`` points estimates the centroids as well as on all of them, at
    a fraction of the time.  A corpus smaller than the 16 centroids of a 4-bit PQ codebook
    is tiled with a little jitter so that training is still well defined (the refine stage
    makes such an index exact anyway).
    """
    n = embeddings.shape[0]
    rng = np.random.default_rng(seed)
    cap = max(MIN_TRAIN_POINTS, TRAIN_POINTS_PER_LIST * (nlist or 1))
    if n > cap:
        rows = np.sort(rng.choice(n, size=cap, replace=False))
        return np.ascontiguousarray(embeddings[rows])
    if n < MIN_PQ_TRAIN_POINTS:
        reps = math.ceil(MIN_PQ_TRAIN_POINTS / n)
        tiled = np.tile(embeddings, (reps, 1))
        scale = float(np.abs(embeddings).mean()) * 1e-3 + 1e-6
        jitter = rng.standard_normal(tiled.shape).astype(np.float32) * scale
        return np.ascontiguousarray(tiled + jitter, dtype=np.float32)
    return np.ascontiguousarray(embeddings)


def build_index(embeddings: np.ndarray, factory: str, seed: int = 0) -> faiss.Index:
    """Train an inner-product index described by ``factory`` and add every row.

    The ids of the index are the row numbers of ``embeddings`` (FAISS's sequential ids), so
    row ``r`` is item token ``r + 1`` and ``item_ids[r]``.  Training runs on the CPU (it is
    an offline job; a GPU FAISS build works the same since nothing GPU-specific is called).
    ``seed`` makes k-means deterministic for a given FAISS version and thread count.
    """
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2 or embeddings.shape[0] < 1:
        raise ValueError(f"embeddings must be a non-empty [N, d] array, got {embeddings.shape}")
    n, dim = embeddings.shape
    nlist = factory_nlist(factory)
    if nlist is not None and nlist > n:
        raise ValueError(f"factory {factory!r} has more lists ({nlist}) than vectors ({n})")
    banded = _NB_RE.match(factory)
    if banded is not None:
        lists, bands, codec = int(banded.group(1)), int(banded.group(2)), banded.group(3)
        return build_norm_banded_ivf(embeddings, lists, bands, codec, seed)
    if "_NB" in factory:
        raise ValueError(f"factory {factory!r}: norm bands need IVF{{nlist}}_NB{{bands}},SQ...")
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    _seed_clustering(index, seed)
    index.train(_training_set(embeddings, nlist, seed))
    index.add(embeddings)
    return index


def _seed_clustering(index: faiss.Index, seed: int) -> None:
    """Fix the k-means seeds of the IVF coarse quantiser and the PQ codebooks."""
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        return
    ivf.cp.seed = seed
    pq = getattr(_as_index(ivf), "pq", None)
    if pq is not None:
        pq.cp.seed = seed
        # Small corpora train the 16-centroid codebooks on < 39*16 points on purpose (the
        # refine stage corrects the codes); don't let k-means print a warning per codebook.
        pq.cp.min_points_per_centroid = 1


def norm_banded_partition(
    embeddings: np.ndarray, nlist: int, bands: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Inverted lists by direction, then by norm: (centroids float32 ``[L, d]``, list per row).

    Inner product is ``|x| |q| cos``, so the top-100 of a query is made of items that point
    its way *and* have large norms (popular items do, in a two-tower model).  A plain IVF
    groups items by direction only: each list mixes all norms and a query has to scan every
    small-norm item of the ~90 lists its top-100 spreads over.  Here ``nlist // bands``
    direction clusters (spherical k-means, inner-product assignment) are each cut into
    ``bands`` lists of equal size by item norm, and each list's centroid is the mean of
    its items, so the IVF's own list ranking (``<q, centroid>`` = the list's mean score)
    probes the large-norm bands of many directions before the small-norm ones.  At 1M
    items (benchmark mixture queries) recall@100 0.98 then needs ~5k scanned codes
    instead of ~23k.  Lists left empty (direction clusters with fewer rows than bands) are
    dropped, so ``L <= nlist``.
    """
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    n, dim = embeddings.shape
    bands = max(1, min(bands, nlist))
    n_dirs = max(1, min(nlist // bands, n))
    kmeans = faiss.Kmeans(
        dim,
        n_dirs,
        niter=NB_KMEANS_ITERATIONS,
        seed=seed,
        # Unit centroids: nearest by L2 (the training's assignment) = largest inner product.
        spherical=True,
        max_points_per_centroid=max(TRAIN_POINTS_PER_LIST * bands, 256),
        min_points_per_centroid=1,  # tiny test corpora; big ones have plenty per cluster
    )
    kmeans.train(_training_set(embeddings, n_dirs * bands, seed))
    directions = faiss.IndexFlatIP(dim)
    directions.add(kmeans.centroids)
    _, nearest = directions.search(embeddings, 1)
    cluster = nearest[:, 0].astype(np.int64)
    # Rank of each row by norm within its direction cluster -> band of equal-size slices.
    norms = np.linalg.norm(embeddings, axis=1)
    order = np.lexsort((norms, cluster))
    sizes = np.bincount(cluster, minlength=n_dirs)
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - np.repeat(starts, sizes)
    assign = cluster * bands + (rank * bands) // sizes[cluster]
    counts = np.bincount(assign, minlength=n_dirs * bands)
    used = counts > 0
    assign = (np.cumsum(used) - 1)[assign]
    counts = counts[used].astype(np.float64)
    # Means per list, one dimension at a time (bincount in float64; no copy of the corpus).
    centroids = np.empty((len(counts), dim), dtype=np.float32)
    for column in range(dim):
        sums = np.bincount(assign, weights=embeddings[:, column], minlength=len(counts))
        centroids[:, column] = sums / counts
    return centroids, assign


def build_norm_banded_ivf(
    embeddings: np.ndarray, nlist: int, bands: int, codec: str = "SQ8", seed: int = 0
) -> faiss.Index:
    """``IVF{nlist}_NB{bands},{codec}``: a FAISS IVF scalar-quantiser index over the lists of
    :func:`norm_banded_partition`, inner product, residual codes.

    The result is an ordinary ``IndexIVFScalarQuantizer`` (flat inner-product coarse
    quantiser holding the list means), so saving, loading, ``nprobe`` and ID selectors work
    as for any FAISS IVF.  The scalar quantiser's per-dimension ranges are the min/max of
    the residuals of *all* rows: a range trained on a sample would clip the extreme
    residuals, and those belong to exactly the items that top a query.
    """
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    n, dim = embeddings.shape
    centroids, assign = norm_banded_partition(embeddings, nlist, bands, seed)
    index = faiss.index_factory(dim, f"IVF{len(centroids)},{codec}", faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    ivf.quantizer.add(centroids)
    # Min-max training only needs each dimension's extremes: train on those two rows
    # instead of materialising an N x d residual matrix (1.3 GB at 5M items).
    low = np.full(dim, np.inf, dtype=np.float32)
    high = np.full(dim, -np.inf, dtype=np.float32)
    for start in range(0, n, 1 << 18):
        rows = slice(start, start + (1 << 18))
        residuals = embeddings[rows] - centroids[assign[rows]]
        np.minimum(low, residuals.min(axis=0), out=low)
        np.maximum(high, residuals.max(axis=0), out=high)
    ivf.sq.train(np.stack([low, high]))
    ivf.is_trained = True
    add_preassigned(ivf, embeddings, np.ascontiguousarray(assign, dtype=np.int64))
    return index


def sample_queries(embeddings: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` user-like query vectors drawn from the corpus, float32 ``[n, d]``.

    A user embedding sits near the items the user interacts with, so each query is the
    unit-normalised mean of 1-5 random items plus Gaussian noise of 0.3 of its norm.  Uniform
    noise would be far from every item and flatter in score than real traffic, making the
    measured recall meaningless; queries mixing items from several clusters are the hard
    case for IVF (neighbours spread over several lists), so they are included on purpose.
    """
    embeddings = np.asarray(embeddings, dtype=np.float32)
    rng = np.random.default_rng(seed)
    n_items, dim = embeddings.shape
    counts = rng.integers(1, 6, size=n)
    queries = np.empty((n, dim), dtype=np.float32)
    for row, count in enumerate(counts):
        rows = rng.choice(n_items, size=min(int(count), n_items), replace=False)
        mean = embeddings[rows].mean(axis=0)
        mean /= np.linalg.norm(mean) + 1e-12
        noise = rng.standard_normal(dim) * (0.3 / math.sqrt(dim))
        query = mean + noise
        queries[row] = query / (np.linalg.norm(query) + 1e-12)
    return queries


def exact_topk(
    embeddings: np.ndarray, queries: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-``k`` (scores, rows) by brute force (``IndexFlatIP``)."""
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    flat = faiss.IndexFlatIP(embeddings.shape[1])
    flat.add(embeddings)
    return flat.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def recall_at_k(
    index: faiss.Index,
    embeddings: np.ndarray,
    queries: np.ndarray,
    k: int,
    nprobe: int,
    k_factor: float,
    exact_rows: np.ndarray | None = None,
) -> float:
    """Mean ``|ANN top-k ∩ exact top-k| / k`` over ``queries`` (``k`` capped at N).

    ``exact_rows`` (``[Q, >=k]`` from :func:`exact_topk`) can be passed to avoid recomputing
    the ground truth for several ``k`` or settings.
    """
    k = min(k, embeddings.shape[0])
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if exact_rows is None:
        _, exact_rows = exact_topk(embeddings, queries, k)
    params = make_search_params(index, nprobe, shortlist_k_factor(k, k_factor))
    _, ann_rows = index.search(queries, k, params=params)
    hits = 0
    for ann, exact in zip(ann_rows, exact_rows[:, :k], strict=True):
        hits += len(np.intersect1d(ann[ann >= 0], exact))
    return hits / (k * len(queries))


def _ladder(start: int, stop: int, step: float) -> list[int]:
    """``round(start * step**i)``, strictly increasing, capped at (and ending on) ``stop``.

    With ``step = sqrt(2)`` from 32: 32, 45, 64, 91, 128, 181, 256, ...
    """
    start = max(1, min(start, stop))
    values = [start]
    power = 1
    while values[-1] < stop:
        values.append(min(stop, max(values[-1] + 1, round(start * step**power))))
        power += 1
    return values


def search_latency_ms(
    index: faiss.Index,
    queries: np.ndarray,
    k: int,
    nprobe: int,
    k_factor: float,
    warmup: int = 20,
) -> float:
    """Median single-query top-``k`` latency (ms) on one OpenMP thread, as the service searches.

    Used by :func:`tune_search_params` only to rank settings that all reach the target
    recall, so a noisy machine can at worst pick a slightly slower one of them.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    params = make_search_params(index, nprobe, shortlist_k_factor(k, k_factor))
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        for row in range(min(warmup, len(queries))):
            index.search(queries[row : row + 1], k, params=params)
        times = np.empty(len(queries))
        for row in range(len(queries)):
            started = time.perf_counter()
            index.search(queries[row : row + 1], k, params=params)
            times[row] = time.perf_counter() - started
    finally:
        faiss.omp_set_num_threads(previous)
    return float(np.median(times) * 1e3)


def tune_search_params(
    index: faiss.Index,
    embeddings: np.ndarray,
    queries: np.ndarray,
    k: int,
    nprobe: int,
    k_factor: int,
    target: float,
    exact_rows: np.ndarray | None = None,
    fixed_nprobe: bool = False,
    latency_queries: int = TUNING_LATENCY_QUERIES,
) -> tuple[int, int, float]:
    """The fastest ``(nprobe, k_factor)`` whose recall@``k`` on ``queries`` reaches ``target``.

    What a model's embeddings need depends on the model: neighbours spread over more lists
    (needs ``nprobe``) or many items with nearly equal scores (needs a longer refine
    shortlist, ``k_factor``).  For each ``k_factor`` of ``k_factor, 2 k_factor, ...`` up to
    :data:`MAX_K_FACTOR` (only the given one without a refine stage) this finds the smallest
    ``nprobe`` of the ladder ``nprobe * sqrt(2)^i`` (up to all lists; only the given one if
    ``fixed_nprobe``) that reaches ``target``, giving up on that ``k_factor`` once a step
    gains less than :data:`PLATEAU_GAIN`; a longer shortlist only stays a candidate if it
    needs fewer lists.  These Pareto-optimal settings are then timed on up to
    ``latency_queries`` single-query searches on one thread (:func:`search_latency_ms`) and
    the fastest wins (the first, cheapest ``k_factor``, if ``latency_queries`` is 0).  If
    none reaches ``target``, the setting with the highest recall is returned.  Returns
    ``(nprobe, k_factor, recall)``.
    """
    nlist = _ivf_nlist(index)
    has_refine = isinstance(_as_index(index), faiss.IndexRefine)
    k = min(k, embeddings.shape[0])
    if exact_rows is None:
        _, exact_rows = exact_topk(embeddings, queries, k)
    recalls: dict[tuple[int, int], float] = {}

    def measure(setting: tuple[int, int]) -> float:
        if setting not in recalls:
            recalls[setting] = recall_at_k(
                index, embeddings, queries, k, setting[0], setting[1], exact_rows
            )
        return recalls[setting]

    start = max(1, min(nprobe, nlist))
    nprobes = [start] if fixed_nprobe else _ladder(start, nlist, math.sqrt(2))
    k_factors = _ladder(int(k_factor), MAX_K_FACTOR, 2) if has_refine else [int(k_factor)]
    frontier: list[tuple[int, int]] = []
    limit = len(nprobes)  # a longer shortlist must need fewer lists to be worth it
    for factor in k_factors:
        previous = -1.0
        for position in range(limit):
            recall = measure((nprobes[position], factor))
            if recall >= target:
                frontier.append((nprobes[position], factor))
                limit = position
                break
            if recall < previous + PLATEAU_GAIN:
                break  # more lists no longer help at this shortlist length
            previous = recall
        if limit == 0:
            break
    if not frontier:
        best = max(recalls, key=lambda s: (recalls[s], -s[0], -s[1]))
        return best[0], best[1], recalls[best]
    if len(frontier) > 1 and latency_queries > 0:
        timed = queries[:latency_queries]
        frontier.sort(key=lambda s: search_latency_ms(index, timed, k, s[0], s[1]))
    best = frontier[0]
    return best[0], best[1], recalls[best]


def _ivf_nlist(index: faiss.Index) -> int:
    try:
        return int(faiss.extract_index_ivf(index).nlist)
    except RuntimeError:  # not an IVF index: nprobe is meaningless
        return 1


def _load_npy(path: Path, name: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path}: unreadable {name} ({exc})") from exc


def _check_matrix(array: np.ndarray, path: Path, dim: int | None) -> None:
    if array.dtype != np.float32:
        raise ArtifactError(f"{path}: dtype {array.dtype}, expected float32")
    if array.ndim != 2 or array.shape[0] < 1:
        raise ArtifactError(f"{path}: shape {array.shape}, expected a non-empty [N, d] matrix")
    if dim is not None and array.shape[1] != dim:
        raise ArtifactError(f"{path}: {array.shape[1]} columns, manifest embedding_dim {dim}")
    if not np.isfinite(array).all():
        bad = int(np.count_nonzero(~np.isfinite(array).all(axis=1)))
        raise ArtifactError(f"{path}: {bad} rows contain NaN or inf")


def load_artifacts(
    artifacts_dir: Path,
) -> tuple[TowerExportManifest, np.ndarray, list[str], np.ndarray | None]:
    """Read and verify a user-tower export: (manifest, embeddings, item_ids, user queries).

    Raises :class:`ArtifactError` on a missing/corrupt file (checksums from the manifest), a
    wrong ``kind``, or any disagreement between ``item_embeddings.npy``, ``item_ids.json``
    and the manifest's ``num_items`` / ``embedding_dim``, or NaN/inf embeddings: an index
    built from such an export would silently serve wrong items.
    """
    artifacts_dir = Path(artifacts_dir)
    # Kind, model version, dimension, item count and the listed item table: the typed
    # manifest refuses an export without them.
    manifest = TowerExportManifest.load(artifacts_dir, verify=True)
    dim, num_items = manifest.embedding_dim, manifest.num_items

    emb_path = artifacts_dir / ITEM_EMBEDDINGS_FILE
    embeddings = _load_npy(emb_path, "item embeddings")
    _check_matrix(embeddings, emb_path, dim)
    if embeddings.shape[0] != num_items:
        raise ArtifactError(
            f"{emb_path}: {embeddings.shape[0]} rows, manifest num_items {num_items}"
        )

    ids_path = artifacts_dir / ITEM_IDS_FILE
    try:
        item_ids = json.loads(ids_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{ids_path}: unreadable ({exc})") from exc
    if not isinstance(item_ids, list) or not all(isinstance(i, str) for i in item_ids):
        raise ArtifactError(f"{ids_path}: expected a JSON list of strings")
    if len(item_ids) != num_items:
        raise ArtifactError(f"{ids_path}: {len(item_ids)} ids, manifest num_items {num_items}")
    if len(set(item_ids)) != len(item_ids):
        raise ArtifactError(f"{ids_path}: duplicate item ids")

    queries = None
    query_path = artifacts_dir / QUERY_EMBEDDINGS_FILE
    if query_path.is_file():
        queries = _load_npy(query_path, "query embeddings")
        _check_matrix(queries, query_path, dim)
    return manifest, embeddings, item_ids, queries


def _fsync(path: Path) -> None:
    """Flush a file or directory to disk so a renamed version survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _refuse_existing(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(
            f"{out_dir} already exists and is not empty: an index version is never "
            "overwritten, choose a new version directory"
        )


def build_from_artifacts(
    artifacts_dir: Path,
    out_dir: Path,
    factory: str | None = None,
    nprobe: int | None = None,
    n_queries: int = 1000,
    seed: int = 0,
    index_version: str | None = None,
    target_recall: float | None = TARGET_RECALL,
) -> dict[str, Any]:
    """Build, evaluate and atomically write an index version from a user-tower export.

    Steps: verify the export (:func:`load_artifacts`, raises :class:`ArtifactError`), build
    the index (``factory`` defaults to :func:`default_factory`), measure recall@10/@100
    against exact inner-product search on ``n_queries`` queries (the export's
    ``query_embeddings.npy`` when present, else :func:`sample_queries`), then write
    ``index.faiss``, ``item_ids.json`` and ``manifest.json`` (kind ``ann_index``) into
    ``.{out_dir.name}.tmp-*`` beside ``out_dir`` and rename it to ``out_dir``.

    Raises :class:`FileExistsError` if ``out_dir`` exists and is not empty (checked before
    and at the rename), so an old version is never modified.  Returns the manifest.

    When ``nprobe`` is None it starts at :func:`default_nprobe` (and ``k_factor`` at
    :func:`default_k_factor`) and, unless ``target_recall`` is None, both are raised
    (:func:`tune_search_params`) until recall@100 on a separate set of tuning queries
    reaches ``target_recall``; an explicit ``nprobe`` is kept as given, only ``k_factor``
    is tuned then.  The reported recalls are measured on other queries, so they are not
    flattered by the tuning.
    """
    artifacts_dir = Path(artifacts_dir)
    out_dir = Path(out_dir)
    _refuse_existing(out_dir)
    manifest_in, embeddings, _, user_queries = load_artifacts(artifacts_dir)
    n_items, dim = embeddings.shape
    factory = factory or default_factory(n_items, dim)
    k_factor = default_k_factor(factory)

    started = time.perf_counter()
    index = build_index(embeddings, factory, seed=seed)
    build_seconds = time.perf_counter() - started

    rng = np.random.default_rng(seed + 1)
    if user_queries is not None:
        source = "user_embeddings"
        # Disjoint halves for tuning and for reporting (the same rows if there is only one).
        perm = rng.permutation(len(user_queries))
        half = len(perm) // 2 if len(perm) > 1 else 1
        tune_queries = user_queries[np.sort(perm[:half][:n_queries])]
        queries = user_queries[np.sort(perm[-half:][:n_queries])]
    else:
        source = "sampled"
        tune_queries = sample_queries(embeddings, n_queries, seed + 2)
        queries = sample_queries(embeddings, n_queries, seed + 1)
    k10, k100 = min(10, n_items), min(100, n_items)

    nprobe_default = default_nprobe(n_items, factory)
    fixed_nprobe = nprobe is not None
    nprobe = int(nprobe) if nprobe is not None else nprobe_default
    if target_recall is not None:
        nprobe, k_factor, _ = tune_search_params(
            index,
            embeddings,
            tune_queries,
            k100,
            nprobe,
            k_factor,
            target_recall,
            fixed_nprobe=fixed_nprobe,
        )

    _, exact_rows = exact_topk(embeddings, queries, k100)
    recall10 = recall_at_k(index, embeddings, queries, k10, nprobe, k_factor, exact_rows)
    recall100 = recall_at_k(index, embeddings, queries, k100, nprobe, k_factor, exact_rows)

    # Bake the chosen settings into the saved index too, for readers that don't pass
    # per-call parameters (LoadedIndex does, from the manifest).
    set_search_params(index, nprobe, k_factor)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        index_path = tmp_dir / INDEX_FILE
        faiss.write_index(index, str(index_path))
        shutil.copyfile(artifacts_dir / ITEM_IDS_FILE, tmp_dir / ITEM_IDS_FILE)
        for name in (INDEX_FILE, ITEM_IDS_FILE):
            _fsync(tmp_dir / name)
        fields: dict[str, Any] = {
            "kind": INDEX_KIND,
            "index_version": index_version or out_dir.name,
            "factory": factory,
            "metric": METRIC_NAME,
            "nprobe": nprobe,
            "nprobe_default": nprobe_default,
            "target_recall": target_recall,
            "k_factor": k_factor,
            "shortlist_min_k": SHORTLIST_MIN_K,
            "num_items": int(n_items),
            "embedding_dim": int(dim),
            "model_name": manifest_in.model_name,
            "model_version": manifest_in.model_version,
            "artifacts_version": manifest_in.model_version,
            "artifacts_dir": str(artifacts_dir),
            "recall_at_10": round(recall10, 6),
            "recall_at_100": round(recall100, 6),
            "recall_k": [k10, k100],
            "recall_queries": {"count": int(len(queries)), "source": source},
            "build_seconds": round(build_seconds, 3),
            "bytes_per_item": round(index_path.stat().st_size / n_items, 2),
            "seed": seed,
            "faiss_version": faiss.__version__,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        manifest = write_manifest(tmp_dir, fields)
        _fsync(tmp_dir)
        _refuse_existing(out_dir)
        # rename(2) replaces an empty directory and fails on a non-empty one, so a version
        # that appeared meanwhile is never clobbered.
        try:
            os.rename(tmp_dir, out_dir)
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
                raise FileExistsError(
                    f"{out_dir} appeared while building and is not empty: not overwritten"
                ) from exc
            raise
        _fsync(out_dir.parent)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return manifest
