"""Recall logic in plain Python: sessions in, ranked item ids out.

No web framework here, so the same engine serves the HTTP app, the benchmarks and tests.
Blocking (ONNX Runtime, FAISS): callers on an event loop run it in a worker thread.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from contracts.manifest import check_pair
from contracts.sessions import Session

if TYPE_CHECKING:
    from index_builder.loaded import LoadedIndex
    from service.tower import UserTowerRunner


@dataclass(frozen=True)
class RecallRequest:
    user_id: str
    k: int
    exclude_seen: bool = True


@dataclass(frozen=True)
class RecallItem:
    item_id: str
    score: float


@dataclass
class RecallResult:
    user_id: str
    items: list[RecallItem] = field(default_factory=list)
    model_version: str = ""
    index_version: str = ""
    # True when the user had no known behaviour and got the popularity fallback.
    cold_start: bool = False


class RecallEngine:
    """A user tower and an item index built from the same model export."""

    def __init__(
        self, tower: UserTowerRunner, index: LoadedIndex, nprobe: int | None = None
    ) -> None:
        self.tower = tower
        self.index = index
        self.nprobe = nprobe
        # The pair check release validation also runs: an index of another model version
        # or dimension would answer plausible garbage, so refuse (ArtifactError).
        check_pair(
            tower.manifest,
            index.manifest,
            export_item_ids=tower.item_ids,
            index_item_ids=[str(i) for i in index.item_ids],
            index_dim=index.dim,
            index_vectors=index.ntotal,
        )
        self.model_version = tower.model_version
        self.index_version = index.version
        self._item_ids = tower.item_ids

    def recall_batch(
        self,
        requests: Sequence[RecallRequest],
        sessions: Sequence[Session],
        now: float,
        timings: dict[str, float] | None = None,
        counts: dict[str, int] | None = None,
    ) -> list[RecallResult]:
        """One result per request, in order; ``sessions[i]`` belongs to ``requests[i]``.

        Users with at least one known item are embedded as one batch and searched with one
        FAISS call; the others get the most popular items, flagged ``cold_start``.  When
        ``timings`` is given, the seconds spent in the stages ``tower`` (ONNX Runtime),
        ``ann`` (FAISS, seen items excluded there) and ``filter`` (rows to ids and results)
        are stored in it, for the whole batch; with a split tower also its parts,
        ``diffusion`` (only when some row missed the xhat cache) and ``attention``.
        ``counts`` gets the rows that hit and missed the xhat cache (``xhat_hit``,
        ``xhat_miss``), when the tower is split.
        """
        if len(requests) != len(sessions):
            raise ValueError("requests and sessions differ in length")
        results: list[RecallResult | None] = [None] * len(requests)
        warm: list[int] = []
        tokens: list[list[int]] = []
        stamps: list[list[float]] = []
        for i, (request, session) in enumerate(zip(requests, sessions, strict=True)):
            if request.k <= 0:
                raise ValueError(f"k must be positive, got {request.k}")
            user_tokens, user_stamps = self.tower.tokens_and_times(session)
            if user_tokens:
                warm.append(i)
                tokens.append(user_tokens)
                stamps.append(user_stamps)
            else:
                results[i] = self.cold_start(request)
        if warm:
            for i, result in zip(
                warm,
                self._search(requests, warm, tokens, stamps, now, timings, counts),
                strict=True,
            ):
                results[i] = result
        return [r for r in results if r is not None]

    def _search(
        self,
        requests: Sequence[RecallRequest],
        warm: list[int],
        tokens: list[list[int]],
        stamps: list[list[float]],
        now: float,
        timings: dict[str, float] | None = None,
        counts: dict[str, int] | None = None,
    ) -> list[RecallResult]:
        started = time.perf_counter()
        queries = self.tower.embed_tokens(tokens, stamps, now, timings, counts)
        embedded = time.perf_counter()
        k_max = max(requests[i].k for i in warm)
        if any(requests[i].exclude_seen for i in warm):
            # Seen rows cover the whole stored session, not only the model's window: the
            # user has interacted with them, whichever part the tower looked at.
            exclude = [
                {t - 1 for t in user_tokens} if requests[i].exclude_seen else set()
                for i, user_tokens in zip(warm, tokens, strict=True)
            ]
            scores, rows = self.index.search_excluding(queries, k_max, exclude, nprobe=self.nprobe)
        else:
            scores, rows = self.index.search(queries, k_max, nprobe=self.nprobe)
        searched = time.perf_counter()
        out: list[RecallResult] = []
        for position, i in enumerate(warm):
            request = requests[i]
            row_scores, row_ids = scores[position], rows[position]
            keep = row_ids >= 0  # -1: fewer than k candidates in the probed lists
            items = [
                RecallItem(self._item_ids[int(r)], float(s))
                for r, s in zip(
                    row_ids[keep][: request.k], row_scores[keep][: request.k], strict=True
                )
            ]
            out.append(self._result(request, items, cold_start=False))
        if timings is not None:
            timings["tower"] = embedded - started
            timings["ann"] = searched - embedded
            timings["filter"] = time.perf_counter() - searched
        return out

    def cache_groups(self, sessions: Sequence[Session]) -> list[list[int]]:
        """Positions of ``sessions`` in the order to compute them: those whose ``xhat`` is
        cached first, then the others (one group when all or none are cached, or without
        a cache).  A hit then never waits for another request's reverse process."""
        everyone = list(range(len(sessions)))
        flags = self.tower.xhat_cached([self.tower.tokens_for(s) for s in sessions])
        if flags is None or all(flags) or not any(flags):
            return [everyone]
        return [[i for i in everyone if flags[i]], [i for i in everyone if not flags[i]]]

    def popular_items(
        self, k: int, exclude: set[str] | frozenset[str] = frozenset()
    ) -> list[RecallItem]:
        """The ``k`` most popular items not in ``exclude`` (raw ids), scored by their share
        of interactions.  Cheap (no ONNX, no FAISS): the degraded answer when a request's
        budget or a dependency fails, computed on the event loop."""
        share = self.tower.popularity_share
        items: list[RecallItem] = []
        for r in self.tower.popular_rows:
            item = self._item_ids[int(r)]
            if item in exclude:
                continue
            items.append(RecallItem(item, float(share[r])))
            if len(items) >= k:
                break
        return items

    def warm_up(self) -> None:
        """One tiny recall, so ORT and FAISS allocate their buffers before real traffic."""
        if self._item_ids:
            first = Session([self._item_ids[0]], [0.0])
            self.recall_batch([RecallRequest("warm-up", 1, True)], [first], 1.0)
            # Serving starts with an empty xhat cache (its hit rate is then what traffic
            # gives, not what the warm-up put there).
            self.tower.clear_xhat_cache()

    def cold_start(self, request: RecallRequest) -> RecallResult:
        # Score = the item's share of interactions, so cold-start scores are comparable
        # across versions and obviously not inner products.
        rows = self.tower.popular_rows[: request.k]
        share = self.tower.popularity_share
        items = [RecallItem(self._item_ids[int(r)], float(share[r])) for r in rows]
        return self._result(request, items, cold_start=True)

    def _result(
        self, request: RecallRequest, items: list[RecallItem], cold_start: bool
    ) -> RecallResult:
        return RecallResult(
            user_id=request.user_id,
            items=items,
            model_version=self.model_version,
            index_version=self.index_version,
            cold_start=cold_start,
        )
