"""FAISS IVF-PQ item index: build a version from a user-tower export, load and search it.

``build_from_artifacts`` turns a model export (``item_embeddings.npy``, ``item_ids.json``,
``manifest.json``) into a verified, versioned index directory; ``load_index`` loads one for
the service, whose :class:`LoadedIndex` answers concurrent inner-product searches.
"""

from index_builder.build import (
    INDEX_KIND,
    NORM_BANDS,
    QUERY_EMBEDDINGS_FILE,
    SHORTLIST_MIN_K,
    TARGET_RECALL,
    build_from_artifacts,
    build_index,
    default_factory,
    default_k_factor,
    default_nlist,
    default_nprobe,
    exact_topk,
    is_norm_banded,
    load_artifacts,
    make_search_params,
    norm_banded_partition,
    recall_at_k,
    sample_queries,
    set_search_params,
    shortlist_k_factor,
    tune_search_params,
)
from index_builder.loaded import LoadedIndex, configure_threads, load_index

__all__ = [
    "INDEX_KIND",
    "NORM_BANDS",
    "SHORTLIST_MIN_K",
    "QUERY_EMBEDDINGS_FILE",
    "TARGET_RECALL",
    "LoadedIndex",
    "build_from_artifacts",
    "build_index",
    "configure_threads",
    "default_factory",
    "default_k_factor",
    "default_nlist",
    "default_nprobe",
    "exact_topk",
    "is_norm_banded",
    "load_artifacts",
    "load_index",
    "make_search_params",
    "norm_banded_partition",
    "recall_at_k",
    "sample_queries",
    "set_search_params",
    "shortlist_k_factor",
    "tune_search_params",
]
