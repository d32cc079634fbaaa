"""Does a candidate version load and answer in the service?  The ``serving`` check of
release validation (``t2diff rebuild | promote | release validate``).

The offline checks (``release.validate``) read the export's tables and the single
graph's declared shape; the service loads more: the split tower's two parts and the
one-request diffusion part when the manifest names them, with their contracts checked.  A
version whose part is corrupt but consistently checksummed used to pass validation, be
promoted, and then be refused by the service (a restarted pod came up unready).  So this
check loads the candidate with the service's own loader (:func:`service.state.load_engine`,
the service's settings from ``T2DIFF_*`` with the ONNX Runtime backend), opens every graph
the manifest names (also the single graph, which a split export opens lazily), and answers
recalls through the service's recall core (:class:`service.core.RecallEngine`): a batch of
two synthetic sessions (the diffusion part at B > 1) and one alone (the one-request part).
Any failure raises :class:`contracts.manifest.ArtifactError` with the reason.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from contracts.manifest import ArtifactError
from contracts.sessions import Session
from contracts.tower import INPUT_ITEM_SEQ, INPUT_NOISE, INPUT_TIME_LAG, OUTPUT_USER_EMBEDDING
from service.core import RecallEngine, RecallRequest
from service.settings import Settings
from service.state import load_engine

#: Items per synthetic session: enough to fill a typical window, few enough to stay cheap.
SESSION_ITEMS = 50
RECALL_K = 10


def serving_settings(artifacts_dir: Path, index_dir: Path) -> Settings:
    """The service's settings (``T2DIFF_*``) aimed at the candidate, on ONNX Runtime (the
    graphs are what is checked; the tower worker loads its own checkpoint), without an
    xhat cache (so every recall runs the diffusion graphs)."""
    return Settings(
        artifacts_dir=artifacts_dir,
        index_dir=index_dir,
        tower_backend="onnx",
        xhat_cache_size=0,
    )


def synthetic_sessions(engine: RecallEngine, now: float) -> list[Session]:
    """Three sessions of the export's own items: the most popular, the least popular, and a
    seeded random draw; one behaviour a minute up to a minute ago."""
    tower = engine.tower
    # At most half the corpus: a session holding every item leaves nothing to recommend
    # once the seen items are excluded (a tiny corpus would fail the check for nothing).
    n = min(SESSION_ITEMS, max(1, tower.num_items // 2))
    rows = [
        tower.popular_rows[:n],
        tower.popular_rows[::-1][:n],
        np.random.default_rng(0).integers(0, tower.num_items, n),
    ]
    stamps = [now - 60.0 * (n - i) for i in range(n)]
    return [Session([tower.item_ids[int(r)] for r in row], stamps) for row in rows]


def _check_results(engine: RecallEngine, sessions: list[Session], now: float) -> None:
    requests = [RecallRequest(f"release-check-{i}", RECALL_K, True) for i in range(len(sessions))]
    results = engine.recall_batch(requests, sessions, now)
    if len(results) != len(requests):
        raise ArtifactError(f"recall answered {len(results)} of {len(requests)} requests")
    for result in results:
        if result.cold_start or not result.items:
            raise ArtifactError(f"recall of a warm session answered no items ({result})")
        scores = np.array([item.score for item in result.items])
        if not np.isfinite(scores).all():
            raise ArtifactError("recall answered NaN/inf scores")
        if (result.model_version, result.index_version) != (
            engine.model_version,
            engine.index_version,
        ):
            raise ArtifactError("recall answered another version")


def _run_single_graph(engine: RecallEngine, sessions: list[Session], now: float) -> None:
    """Open and run the single graph (``user_tower.onnx``), which a split export serves
    only on demand (parity tests, benchmarks, older readers)."""
    tower = engine.tower
    session = tower.session  # opens it, checking its contract
    if session is None:
        return
    from contracts.tower import pad_batch

    pairs = [tower.tokens_and_times(s) for s in sessions]
    item_seq, time_lag = pad_batch(
        [p[0] for p in pairs], [p[1] for p in pairs], now, tower.max_seq_len
    )
    (embedding,) = session.run(
        [OUTPUT_USER_EMBEDDING],
        {INPUT_ITEM_SEQ: item_seq, INPUT_TIME_LAG: time_lag, INPUT_NOISE: tower.noise},
    )
    if embedding.shape != (len(sessions), tower.embedding_dim) or not np.isfinite(embedding).all():
        raise ArtifactError(
            f"user_tower.onnx answered shape {embedding.shape} or non-finite values"
        )


def check_serving(artifacts_dir: Path, index_dir: Path) -> dict[str, Any]:
    """Load ``artifacts_dir`` + ``index_dir`` as the service does and answer recalls.

    Returns what was exercised (graphs, seconds); raises :class:`ArtifactError` with the
    reason when the service would refuse the version or cannot answer with it.
    """
    started = time.perf_counter()
    try:
        settings = serving_settings(Path(artifacts_dir), Path(index_dir))
    except ValueError as exc:  # pydantic's ValidationError: a bad T2DIFF_* variable
        raise ArtifactError(f"the service settings are invalid: {exc}") from exc
    engine, errors = load_engine(settings, artifacts_dir, index_dir)
    if engine is None:
        reasons = "; ".join(f"{key}: {why}" for key, why in errors.items())
        raise ArtifactError(f"the service would not load it ({reasons})")
    tower = engine.tower
    now = time.time()
    sessions = synthetic_sessions(engine, now)
    try:
        _check_results(engine, sessions, now)  # B > 1: the diffusion part (split tower)
        _check_results(engine, sessions[:1], now)  # B = 1: the one-request part, if any
        _run_single_graph(engine, sessions, now)
    except ArtifactError:
        raise
    except Exception as exc:  # ORT / FAISS raise their own types
        raise ArtifactError(f"recall failed: {type(exc).__name__}: {exc}") from exc
    graphs = ["single"]
    if tower.split:
        graphs += ["diffusion", "attention"]
    if tower.diffusion_one_session is not None:
        graphs.append("diffusion_one")
    return {"graphs": graphs, "seconds": round(time.perf_counter() - started, 3)}
