"""The load-test tooling: traffic model, locustfile and run_load's pure functions.

No locust run is started.  Importing locust monkey-patches the whole process (gevent), so
the locustfile is only imported in a child process; everything else is tested in-process.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import random
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOADTEST = ROOT / "loadtest"


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


traffic = _load("traffic_model", LOADTEST / "traffic_model.py")
run_load = _load("t2diff_run_load", LOADTEST / "run_load.py")

STATS_HEADER = (
    "Type,Name,Request Count,Failure Count,Median Response Time,Average Response Time,"
    "Min Response Time,Max Response Time,Average Content Size,Requests/s,Failures/s,"
    "50%,66%,75%,80%,90%,95%,98%,99%,99.9%,99.99%,100%"
)


def write_stats(path: Path, rows: list[tuple[str, str, int, int, float, list[float]]]) -> Path:
    """A locust-format ``_stats.csv``: (type, name, requests, failures, rps, 11 percentiles)."""
    lines = [STATS_HEADER]
    for kind, name, requests, failures, rps, pcts in rows:
        assert len(pcts) == 11
        cells = [kind, name, requests, failures, pcts[0], pcts[0], 1, pcts[-1], 100, rps, 0]
        lines.append(",".join(str(c) for c in [*cells, *pcts]))
    path.write_text("\n".join(lines) + "\n")
    return path


FAST = [5, 6, 7, 8, 10, 12, 15, 18, 30, 40, 50]
SLOW = [20, 30, 40, 50, 80, 120, 200, 400, 900, 1000, 1000]


# --------------------------------------------------------------------------- traffic model


def test_parse_ids_range_and_file(tmp_path: Path) -> None:
    assert traffic.parse_ids("u0..u3") == ["u0", "u1", "u2", "u3"]
    assert traffic.parse_ids("u5..9") == ["u5", "u6", "u7", "u8", "u9"]
    assert len(traffic.parse_ids(traffic.DEFAULT_USERS)) == 2000  # the synthetic generator's
    ids = tmp_path / "users.txt"
    ids.write_text("# heavy users first\nalice\n\nbob\n")
    assert traffic.parse_ids(str(ids)) == ["alice", "bob"]
    for bad in ("u9..u1", "u0..x5", str(tmp_path / "missing.txt")):
        with pytest.raises(ValueError):
            traffic.parse_ids(bad)


def test_k_weights() -> None:
    assert traffic.parse_k_weights(traffic.DEFAULT_K_WEIGHTS) == (
        [20, 50, 100, 200],
        [4.0, 3.0, 2.0, 1.0],
    )
    assert traffic.parse_k_weights("10") == ([10], [1.0])
    for bad in ("0:1", "20:-1", "20:0", "x:1"):
        with pytest.raises(ValueError):
            traffic.parse_k_weights(bad)


def test_zipf_sampler_is_skewed_and_seeded() -> None:
    ids = [f"u{i}" for i in range(1000)]
    sampler = traffic.ZipfSampler(ids, s=1.1, seed=0)
    rng = random.Random(1)
    counts = Counter(sampler(rng) for _ in range(20000))
    top = counts.most_common(10)
    # The head carries far more traffic than a uniform draw (20 per id) would give it.
    assert top[0][1] > 1000
    assert sum(c for _, c in top) > 0.3 * 20000
    # The heavy users are a seeded shuffle, not simply u0, u1, ...
    assert sampler.ids[0] == traffic.ZipfSampler(ids, seed=0).ids[0]
    assert sampler.ids[:10] != ids[:10]
    uniform = traffic.ZipfSampler(ids, s=0.0)
    assert max(Counter(uniform(rng) for _ in range(20000)).values()) < 60


def test_traffic_model_bodies_match_the_api_contract() -> None:
    model = traffic.TrafficModel.from_env({"T2DIFF_LOADTEST_USERS": "u0..u99"})
    rng = random.Random(0)
    bodies = [model.recall_body(rng) for _ in range(2000)]
    assert all(set(b) == {"user_id", "k", "exclude_seen"} for b in bodies)
    assert {b["k"] for b in bodies} == {20, 50, 100, 200}
    ks = Counter(b["k"] for b in bodies)
    assert ks[20] > ks[50] > ks[100] > ks[200]
    assert all(isinstance(b["user_id"], str) and b["exclude_seen"] is True for b in bodies)

    event = model.events_body(rng, now=1000.0)
    assert set(event) == {"user_id", "events"}
    assert 1 <= len(event["events"]) <= 3
    stamps = [e["timestamp"] for e in event["events"]]
    assert stamps == sorted(stamps) and all(s < 1000.0 for s in stamps)
    assert all(set(e) == {"item_id", "timestamp"} for e in event["events"])

    assert (model.recall_weight, model.events_weight) == (900, 100)
    assert model.user_rps == 1.0
    with pytest.raises(ValueError):
        traffic.TrafficModel.from_env({"T2DIFF_LOADTEST_EVENTS_SHARE": "1.5"})
    off = traffic.TrafficModel.from_env({"T2DIFF_LOADTEST_EXCLUDE_SEEN": "0"})
    assert off.exclude_seen is False


def test_outcomes() -> None:
    assert traffic.events_outcome(200) == "success"
    assert traffic.events_outcome(202) == "success"
    assert traffic.events_outcome(404) == "not_deployed"
    assert traffic.events_outcome(500) == "failure"
    assert traffic.events_outcome(422) == "failure"
    assert traffic.recall_problem(200, {"items": []}) is None
    assert traffic.recall_problem(503, None) == "HTTP 503"
    assert traffic.recall_problem(200, {"detail": "x"}) is not None


# --------------------------------------------------------------------------- locustfile

_LOCUST_PROBE = textwrap.dedent(
    """
    import json, os, sys
    sys.path.insert(0, os.environ["LOADTEST_DIR"])
    import locust
    import locustfile as lf

    class Resp:
        def __init__(self, status, body):
            self.status_code, self._body = status, body
            self.text = json.dumps(body)
            self.request_meta = {"name": None}
            self.outcome = None
        def json(self):
            return self._body
        def success(self):
            self.outcome = "success"
        def failure(self, why):
            self.outcome = "failure: " + why
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            return False

    class Client:
        def __init__(self, answers):
            self.answers, self.calls = answers, []
        def post(self, path, json=None, name=None, catch_response=False):
            assert catch_response, "must use catch_response"
            self.calls.append((path, json, name))
            resp = Resp(*self.answers[path])
            resp.request_meta["name"] = name
            self.last = resp
            return resp

    def run(task, answers):
        user = lf.RecallUser.__new__(lf.RecallUser)
        user.client = Client(answers)
        user.on_start()
        task(user)
        return user.client.calls[-1], user.client.last

    out = {
        "is_user": issubclass(lf.RecallUser, locust.FastHttpUser),
        "tasks": sorted(t.__name__ for t in lf.RecallUser.tasks),
        # Same inner function as constant_throughput() returns, whatever it is built on.
        "constant_rate": lf.RecallUser.wait_time.__code__
        is locust.constant_throughput(1.0).__code__,
        "user_rps": lf.MODEL.user_rps,
    }
    call, resp = run(lf.RecallUser.recall, {"/recall": (200, {"items": []})})
    out["recall_call"] = [call[0], sorted(call[1]), call[2]]
    out["recall_ok"] = resp.outcome
    out["recall_503"] = run(lf.RecallUser.recall, {"/recall": (503, {})})[1].outcome
    _, resp = run(lf.RecallUser.events, {"/events": (404, {"detail": "Not Found"})})
    out["events_404"] = [resp.outcome, resp.request_meta["name"]]
    out["events_202"] = run(lf.RecallUser.events, {"/events": (202, {})})[1].outcome
    out["events_500"] = run(lf.RecallUser.events, {"/events": (500, {})})[1].outcome
    print("RESULT " + json.dumps(out))
    """
)


def test_locustfile_defines_user_and_handles_responses() -> None:
    # find_spec, not importorskip: importing locust here would gevent-patch this process.
    if importlib.util.find_spec("locust") is None:
        pytest.skip("the loadtest extra (locust) is not installed")
    env = {
        "LOADTEST_DIR": str(LOADTEST),
        "T2DIFF_LOADTEST_USER_RPS": "3",
        "PATH": "/usr/bin:/bin",
    }
    proc = subprocess.run(
        [sys.executable, "-c", _LOCUST_PROBE],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    out = json.loads(line.removeprefix("RESULT "))
    assert out["is_user"] is True
    assert set(out["tasks"]) == {"recall", "events"}
    assert out["constant_rate"] is True
    assert out["user_rps"] == 3.0
    assert out["recall_call"] == ["/recall", ["exclude_seen", "k", "user_id"], "/recall"]
    assert out["recall_ok"] == "success"
    assert out["recall_503"].startswith("failure")
    assert out["events_404"] == ["success", "/events [404: not deployed]"]
    assert out["events_202"] == "success"
    assert out["events_500"].startswith("failure")


# --------------------------------------------------------------------------- run_load


def test_slo_fails_above_and_passes_below(tmp_path: Path) -> None:
    stats_csv = write_stats(
        tmp_path / "run_stats.csv",
        [
            ("POST", "/recall", 900, 0, 90.0, FAST),
            ("POST", "/events", 100, 0, 10.0, SLOW),
            ("", "Aggregated", 1000, 0, 100.0, FAST[:7] + [35, 900, 1000, 1000]),
        ],
    )
    total = run_load.read_stats(stats_csv)
    assert (total.requests, total.failures, total.p99_ms) == (1000, 0, 35.0)
    assert run_load.check_slo(total, p99_ms=50, max_error_rate=0.01).ok
    missed = run_load.check_slo(total, p99_ms=20, max_error_rate=0.01)
    assert not missed.ok and "p99 35 ms > 20 ms" in missed.messages[0]

    recall = run_load.read_stats(stats_csv, "/recall")
    assert recall.p50_ms == 5 and recall.p95_ms == 12 and recall.p99_ms == 18
    events = run_load.read_stats(stats_csv, "/events")
    assert not run_load.check_slo(events, p99_ms=100).ok
    assert run_load.check_slo(events).ok  # no bound asked: only "some traffic" is checked
    with pytest.raises(ValueError, match="no row"):
        run_load.read_stats(stats_csv, "/nope")


def test_slo_error_rate_and_empty_runs(tmp_path: Path) -> None:
    stats_csv = write_stats(
        tmp_path / "s_stats.csv",
        [
            ("POST", "/recall", 1000, 50, 100.0, FAST),
            ("", "Aggregated", 1000, 50, 100.0, FAST),
        ],
    )
    total = run_load.read_stats(stats_csv)
    assert total.error_rate == pytest.approx(0.05)
    result = run_load.check_slo(total, p99_ms=100, max_error_rate=0.01)
    assert not result.ok and "error rate 5.00%" in result.messages[0]
    assert run_load.check_slo(total, p99_ms=100, max_error_rate=0.1).ok

    empty = tmp_path / "e_stats.csv"
    empty.write_text(STATS_HEADER + "\n,Aggregated,0,0,0,0,0,0,0,0,0" + ",N/A" * 11 + "\n")
    nothing = run_load.read_stats(empty)
    assert nothing.requests == 0 and math.isnan(nothing.p99_ms)
    assert not run_load.check_slo(nothing).ok
    assert not run_load.check_slo(nothing, p99_ms=1000, max_error_rate=1.0).ok

    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a locust stats CSV"):
        run_load.read_stats(bad)


def test_summary_results_csv_and_duration(tmp_path: Path) -> None:
    stats_csv = write_stats(tmp_path / "x_stats.csv", [("", "Aggregated", 600, 3, 10.0, FAST)])
    stats = run_load.read_stats(stats_csv)
    line = run_load.format_summary(stats, offered_rps=10.0, duration_s=60.0)
    assert "\n" not in line
    for part in ("offered 10 rps", "requests 600", "errors 3", "p50 5 ms", "p95 12", "p99 18"):
        assert part in line

    results = tmp_path / "results" / "load.csv"
    row = run_load.result_row(stats, "h100", "t2diff", 10.0, 60.0)
    run_load.append_result(results, row)
    run_load.append_result(results, row)
    with results.open() as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == [
        "machine",
        "model",
        "rate_rps",
        "duration_s",
        "requests",
        "errors",
        "p50_ms",
        "p95_ms",
        "p99_ms",
    ]
    assert rows[1] == rows[2] == ["h100", "t2diff", "10", "60", "600", "3", "5", "12", "18"]
    other = tmp_path / "other.csv"
    other.write_text("x,y\n")
    with pytest.raises(ValueError, match="header"):
        run_load.append_result(other, row)

    assert run_load.parse_duration("90") == 90
    assert run_load.parse_duration("30s") == 30
    assert run_load.parse_duration("2m") == 120
    assert run_load.parse_duration("1h30m") == 5400
    for bad in ("", "abc", "2d", "1m x"):
        with pytest.raises(ValueError):
            run_load.parse_duration(bad)


def test_locust_command_and_cli_validation(tmp_path: Path) -> None:
    cmd = run_load.locust_command(
        "http://127.0.0.1:8000", 50, 10, "1m", tmp_path / "p", tmp_path / "r.html"
    )
    assert cmd[:3] == [sys.executable, "-m", "locust"]
    for flag, value in [
        ("-f", str(LOADTEST / "locustfile.py")),
        ("--users", "50"),
        ("--spawn-rate", "10"),
        ("--run-time", "1m"),
        ("--csv", str(tmp_path / "p")),
        ("--html", str(tmp_path / "r.html")),
        ("--host", "http://127.0.0.1:8000"),
    ]:
        assert cmd[cmd.index(flag) + 1] == value
    assert "--headless" in cmd
    # Bad arguments are refused before locust is started.
    assert run_load.main(["--host", "localhost:8000", "--out-dir", str(tmp_path)]) == 2
    assert (
        run_load.main(["--host", "http://x", "--run-time", "2d", "--out-dir", str(tmp_path)]) == 2
    )


def test_plot_writes_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    stats_csv = write_stats(
        tmp_path / "p_stats.csv",
        [("POST", "/recall", 10, 0, 1.0, FAST), ("", "Aggregated", 10, 0, 1.0, FAST)],
    )
    history = [
        {"Timestamp": 100.0 + t, "Requests/s": 10.0, "50%": 5.0, "95%": 9.0, "99%": 12.0}
        for t in range(5)
    ]
    png = run_load.plot_latency(
        run_load.read_stats_rows(stats_csv), history, tmp_path / "out" / "lat.png", "test"
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    empty = run_load.plot_latency([], [], tmp_path / "empty.png", "nothing")
    assert empty.stat().st_size > 0
