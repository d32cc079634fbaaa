"""The split T2Diff tower (``diffusion`` -> ``xhat`` -> ``attention``) and the service's
xhat cache.

* The two parts compose to the single graph's answer (torch and ONNX Runtime), for random
  left-padded sequences and several request times ``now``.
* Served with a real Redis: answers are the same with the cache on and off, a new
  behaviour changes the key (and so the answer), and a hot swap never serves the previous
  version's ``xhat``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import export_fixtures
import numpy as np
import pytest
import torch
from export_fixtures import deploy_versions, point_current
from fastapi.testclient import TestClient
from service_fixtures import build_tiny_index, point_link
from tolerances import RTOL_REORDER, assert_f32_close

from contracts import manifest as mf
from contracts.tower import make_noise, pad_batch
from model.export import can_split
from model.fast_tower import FastAttentionPart, FastDiffusionPart, FastTower
from model.t2diff import T2Diff, T2DiffConfig
from service.app import create_app
from service.core import RecallRequest
from service.settings import Settings
from service.tower import UserTowerRunner, XhatCache

TOL = RTOL_REORDER  # relative to the embeddings' magnitude (tests/tolerances.py)
N_ITEMS = 60
TINY = {"dim": 16, "unet_width": 8, "max_seq_len": 12, "session_len": 4, "diffusion_steps": 5}
NOISE_SEED = 7
TOKEN = "split-token"


def _model(seed: int = 0, **overrides: object) -> T2Diff:
    torch.manual_seed(seed)
    model = T2Diff(N_ITEMS, T2DiffConfig(**{**TINY, **overrides})).eval()  # type: ignore[arg-type]
    with torch.no_grad():  # weights away from their init values
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return model


def _sequences(rng: np.random.Generator, batch: int, length: int) -> tuple[list, list]:
    """Random token lists (1..length behaviours, oldest first) with increasing stamps."""
    tokens, stamps = [], []
    for _ in range(batch):
        n = int(rng.integers(1, length + 4))  # some longer than the window
        tokens.append(rng.integers(1, N_ITEMS + 1, n).tolist())
        gaps = rng.exponential(4000.0, n)  # some gaps longer than the session gap
        stamps.append((1_700_000_000.0 + np.cumsum(gaps)).tolist())
    return tokens, stamps


def item_name(row: int) -> str:
    return f"movie-{row}"


def export_tiny_t2diff(out_dir: Path, model: T2Diff, version: str, split: bool = True) -> Path:
    """This module's tiny export (its noise seed and item names), split by default."""
    return export_fixtures.export_tiny_t2diff(
        out_dir, model, version, noise_seed=NOISE_SEED, item_name=item_name, split=split
    )


# --------------------------------------------------------------------------- the parts


@pytest.mark.parametrize("overrides", [{}, {"session_gap_s": 3600.0}, {"drift": False}])
def test_torch_parts_compose_to_the_fast_tower(overrides: dict) -> None:
    model = _model(**overrides)
    diffusion, attention, whole = (
        FastDiffusionPart(model),
        FastAttentionPart(model),
        FastTower(model),
    )
    rng = np.random.default_rng(0)
    noise = torch.from_numpy(make_noise(model.noise_shape, NOISE_SEED))
    tokens, stamps = _sequences(rng, 5, model.config.max_seq_len)
    for now in (1_700_100_000.0, 1_700_500_000.0, 1_800_000_000.0):
        seq, lag = (torch.from_numpy(a) for a in pad_batch(tokens, stamps, now, 12))
        with torch.no_grad():
            split = attention(seq, lag, diffusion(seq, noise))
            assert_f32_close(split, whole(seq, lag, noise), TOL)


def test_no_parts_without_diffusion() -> None:
    assert can_split(_model())
    assert not can_split(_model(use_diffusion=False))
    with pytest.raises(ValueError, match="no diffusion"):
        FastDiffusionPart(_model(use_diffusion=False))


@pytest.fixture(scope="module")
def split_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = _model(seed=1, session_gap_s=3600.0)
    return export_tiny_t2diff(tmp_path_factory.mktemp("split") / "v1", model, "split-v1")


def test_onnx_split_equals_the_single_graph(split_export: Path) -> None:
    """The service's own runners: split (cache off and on) against the single graph."""
    manifest = mf.read_manifest(split_export)
    assert manifest[mf.TOWER_PARTS_FIELD] == {
        "diffusion": mf.TOWER_DIFFUSION_FILE,
        "attention": mf.TOWER_ATTENTION_FILE,
    }
    assert {mf.TOWER_DIFFUSION_FILE, mf.TOWER_ATTENTION_FILE} <= set(manifest["files"])
    split = UserTowerRunner(split_export)
    cached = UserTowerRunner(split_export, xhat_cache_size=1000)
    assert split.split and split.xhat_cache is None and cached.xhat_cache is not None
    assert split.diffusion_one_session is not None  # B = 1 below runs the one-request part
    # the single graph serves nothing here: opened only when asked for (below)
    assert split._session is None and cached._session is None
    rng = np.random.default_rng(3)
    for batch in (1, 3, 8):
        tokens, stamps = _sequences(rng, batch, 12)
        for now in (1_700_100_000.0, 1_700_100_060.0, 1_750_000_000.0, 1_900_000_000.0):
            item_seq, time_lag = pad_batch(tokens, stamps, now, 12)
            (combined,) = split.session.run(
                ["user_embedding"],
                {"item_seq": item_seq, "time_lag": time_lag, "noise": split.noise},
            )
            timings: dict[str, float] = {}
            counts: dict[str, int] = {}
            assert_f32_close(
                split.embed_tokens(tokens, stamps, now, timings, counts), combined, TOL
            )
            assert counts == {"xhat_hit": 0, "xhat_miss": batch}
            assert set(timings) == {"diffusion", "attention"}
            assert_f32_close(cached.embed_tokens(tokens, stamps, now), combined, TOL)
    # Every sequence went through the cached runner at four times: one miss, then hits.
    counts = {}
    tokens, stamps = _sequences(np.random.default_rng(3), 1, 12)
    cached.embed_tokens(tokens, stamps, 1_900_000_001.0, None, counts)
    assert counts == {"xhat_hit": 1, "xhat_miss": 0}


def test_a_lone_miss_runs_the_one_request_part(split_export: Path) -> None:
    """The one-request diffusion part (batch fixed at 1, 2-D activations) gives the batched
    part's xhat, and the runner sends exactly the lone misses to it."""
    runner = UserTowerRunner(split_export)
    one, batched = runner.diffusion_one_session, runner.diffusion_session
    assert one is not None and batched is not None
    tokens, stamps = _sequences(np.random.default_rng(5), 3, 12)
    item_seq, _ = pad_batch(tokens, stamps, 1_700_100_000.0, 12)
    feeds = {"item_seq": item_seq, "noise": runner.noise}
    (want,) = batched.run(["xhat"], feeds)
    for row in range(3):
        (got,) = one.run(["xhat"], {"item_seq": item_seq[row : row + 1], "noise": runner.noise})
        assert_f32_close(got[0], want[row], RTOL_REORDER)
    calls: list[int] = []
    for name in ("diffusion_one_session", "diffusion_session"):
        session = getattr(runner, name)
        spy = SessionSpy(session, calls, 1 if name == "diffusion_one_session" else 0)
        setattr(runner, name, spy)
    runner.embed_tokens(tokens[:1], stamps[:1], 1_700_100_000.0)
    runner.embed_tokens(tokens, stamps, 1_700_100_000.0)
    assert calls == [1, 0]  # the lone request, then the batch of 3


class SessionSpy:
    """An ONNX Runtime session that records which one ran (1: one-request, 0: batched)."""

    def __init__(self, session: object, calls: list[int], tag: int) -> None:
        self.session, self.calls, self.tag = session, calls, tag

    def run(self, *args: object) -> object:
        self.calls.append(self.tag)
        return self.session.run(*args)  # type: ignore[attr-defined]


def test_a_bad_one_request_part_is_refused(tmp_path: Path) -> None:
    """The one-request part must be a listed file with the diffusion part's contract at
    batch 1; a manifest that names the batched part there is refused at load."""
    export = export_tiny_t2diff(tmp_path / "v", _model(seed=4), "bad-one")
    fields = mf.read_manifest(export)
    fields[mf.TOWER_DIFFUSION_ONE_FIELD] = mf.TOWER_DIFFUSION_FILE  # batch axis, not 1
    mf.write_manifest(export, {k: v for k, v in fields.items() if k != "files"})
    with pytest.raises(mf.ArtifactError, match="one-request diffusion part"):
        UserTowerRunner(export)
    fields[mf.TOWER_DIFFUSION_ONE_FIELD] = "missing.onnx"
    mf.write_manifest(export, {k: v for k, v in fields.items() if k != "files"})
    with pytest.raises(mf.ArtifactError, match="not a listed file"):
        UserTowerRunner(export)


def test_an_export_without_parts_still_serves(tmp_path: Path) -> None:
    export = export_tiny_t2diff(tmp_path / "old", _model(seed=2), "old-v1", split=False)
    runner = UserTowerRunner(export, xhat_cache_size=1000)
    assert not runner.split and runner.xhat_cache is None
    counts: dict[str, int] = {}
    out = runner.embed_tokens([[1, 2, 3]], [[1.0, 2.0, 3.0]], 10.0, {}, counts)
    assert out.shape == (1, 16) and counts == {}


def test_xhat_cache_is_a_bounded_lru() -> None:
    cache = XhatCache(2)
    rows = np.arange(6, dtype=np.float32).reshape(3, 2)
    cache.put_many([b"a", b"b"], rows[:2])
    assert cache.get_many([b"a"])[0] is not None  # a is now the most recent
    cache.put_many([b"c"], rows[2:])
    assert [r is None for r in cache.get_many([b"a", b"b", b"c"])] == [False, True, False]
    assert len(cache) == 2
    with pytest.raises(ValueError):
        XhatCache(0)


# --------------------------------------------------------------------------- the service


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two split versions of different weights, each with its index, and ``current``."""
    seeds = {"t2d-a": 11, "t2d-b": 12}
    return deploy_versions(
        tmp_path_factory.mktemp("split-deploy"),
        lambda out, v: export_tiny_t2diff(out, _model(seeds[v], session_gap_s=3600.0), v),
        tuple(seeds),
    )


@pytest.fixture
def links(deployment: Path) -> Iterator[Path]:
    point_current(deployment, "t2d-a")
    yield deployment


def _settings(root: Path, redis_url: str, cache_size: int) -> Settings:
    return Settings(
        artifacts_dir=root / "artifacts" / "current",
        index_dir=root / "indexes" / "current",
        redis_url=redis_url,
        budget_ms=5_000,
        watch_interval_s=0,
        admin_token=TOKEN,
        xhat_cache_size=cache_size,
        inference_concurrency=2,
        # These tests count the cache's own hits and misses: no warm, no recompute on write
        # (tests/test_xhat_warm.py covers those).
        xhat_warm_users=0,
        xhat_recompute_queue=0,
    )


def _write_history(client: TestClient, user: str, rows: list[int], start: float) -> None:
    events = [
        {"user_id": user, "item_id": item_name(r), "timestamp": start + 600.0 * i}
        for i, r in enumerate(rows)
    ]
    assert client.post("/events", json={"events": events}).status_code == 200


def _recall(client: TestClient, user: str) -> dict:
    response = client.post("/recall", json={"user_id": user, "k": 20})
    assert response.status_code == 200
    body = response.json()
    assert not body["degraded"] and not body["cold_start"]
    return body


def _xhat_counts(client: TestClient) -> dict[str, float]:
    counts = {"hit": 0.0, "miss": 0.0}
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("t2diff_xhat_cache_total{"):
            label = line.split('result="')[1].split('"')[0]
            counts[label] = float(line.rsplit(" ", 1)[1])
    return counts


def _same_answer(a: dict, b: dict) -> None:
    assert [i["item_id"] for i in a["items"]] == [i["item_id"] for i in b["items"]]
    scores_a = np.array([i["score"] for i in a["items"]])
    scores_b = np.array([i["score"] for i in b["items"]])
    assert np.abs(scores_a - scores_b).max() < 1e-4
    assert a["model_version"] == b["model_version"]


def test_answers_are_the_same_with_the_cache_on_and_off(links: Path, redis_url: str) -> None:
    users = [f"split-user-{n}" for n in range(6)]
    rng = np.random.default_rng(5)
    on = TestClient(create_app(_settings(links, redis_url, 1000)))
    off = TestClient(create_app(_settings(links, redis_url, 0)))
    with on, off:
        for user in users:
            _write_history(on, user, rng.integers(0, N_ITEMS, 9).tolist(), 1_700_000_000.0)
        first = {u: _recall(on, u) for u in users}
        assert _xhat_counts(on) == {"hit": 0.0, "miss": 6.0}  # cold at start: no pre-warm
        again = {u: _recall(on, u) for u in users}
        assert _xhat_counts(on) == {"hit": 6.0, "miss": 6.0}
        for user in users:
            reference = _recall(off, user)
            _same_answer(first[user], reference)
            _same_answer(again[user], reference)
            assert "diffusion" not in again[user]["stages_ms"]  # a hit runs no diffusion
            assert {"diffusion", "attention"} <= set(first[user]["stages_ms"])
        assert _xhat_counts(off) == {"hit": 0.0, "miss": 6.0}


def test_a_new_event_is_a_new_key(links: Path, redis_url: str) -> None:
    user = "split-event-user"
    on = TestClient(create_app(_settings(links, redis_url, 1000)))
    off = TestClient(create_app(_settings(links, redis_url, 0)))
    with on, off:
        _write_history(on, user, [3, 14, 15, 9, 26], 1_700_000_000.0)
        before = _recall(on, user)
        _recall(on, user)
        assert _xhat_counts(on) == {"hit": 1.0, "miss": 1.0}
        _write_history(on, user, [53], 1_700_010_000.0)
        after = _recall(on, user)
        assert _xhat_counts(on) == {"hit": 1.0, "miss": 2.0}  # the changed session missed
        _same_answer(after, _recall(off, user))
        assert [i["score"] for i in after["items"]] != [i["score"] for i in before["items"]]


def test_a_hot_swap_never_serves_the_old_versions_xhat(links: Path, redis_url: str) -> None:
    user = "split-swap-user"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with TestClient(create_app(_settings(links, redis_url, 1000))) as client:
        _write_history(client, user, [1, 2, 3, 4, 5, 6, 7], 1_700_000_000.0)
        on_a = _recall(client, user)
        _recall(client, user)  # now cached under version a
        assert on_a["model_version"] == "t2d-a"
        for kind in ("indexes", "artifacts"):
            point_link(links / kind / "current", "t2d-b")
        assert client.post("/admin/reload", headers=auth).json()["status"] == "reloaded"
        on_b = _recall(client, user)
        assert on_b["model_version"] == "t2d-b"
        assert {"diffusion", "attention"} <= set(on_b["stages_ms"])  # b computed its own
        with TestClient(create_app(_settings(links, redis_url, 0))) as fresh_b:
            _same_answer(on_b, _recall(fresh_b, user))
        assert [i["score"] for i in on_b["items"]] != [i["score"] for i in on_a["items"]]


def test_cached_rows_are_computed_first(split_export: Path, tmp_path: Path) -> None:
    """``RecallEngine.cache_groups``: a batch's hits form their own engine call, ahead of
    its misses, so a hit never waits for another request's reverse process."""
    from contracts.sessions import Session
    from service.core import RecallEngine

    index_build = build_tiny_index(split_export, tmp_path / "index")
    from index_builder.loaded import load_index

    engine = RecallEngine(
        UserTowerRunner(split_export, xhat_cache_size=100), load_index(index_build)
    )
    known = Session([item_name(1), item_name(2)], [1.0, 2.0])
    new = Session([item_name(3)], [1.0])
    assert engine.cache_groups([known, new]) == [[0, 1]]  # nothing cached: one call
    engine.recall_batch([RecallRequest("u", 5)], [known], 10.0)
    assert engine.cache_groups([new, known, new]) == [[1], [0, 2]]
    assert engine.cache_groups([known]) == [[0]]
    plain = RecallEngine(UserTowerRunner(split_export), load_index(index_build))
    assert plain.cache_groups([known, new]) == [[0, 1]]  # no cache: one call
