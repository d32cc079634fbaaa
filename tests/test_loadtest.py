"""The load-test tooling: traffic model, locustfile, run_load's pure functions, and
``run_load.py --start-local`` end to end (real redis-server, ``t2diff serve`` and locust, a
tiny torch-free export from ``service_fixtures``, a few seconds at a low rate).

Importing locust monkey-patches the whole process (gevent), so the locustfile is only
imported in a child process, and locust only ever runs in one.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import random
import re
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest
from script_modules import load_script

ROOT = Path(__file__).resolve().parents[1]
LOADTEST = ROOT / "loadtest"


traffic = load_script("traffic_model", LOADTEST / "traffic_model.py")
run_load = load_script("t2diff_run_load", LOADTEST / "run_load.py")
# run_load put ROOT on the path; its parts are the namespace package loadtest.
from loadtest import metrics as load_metrics  # noqa: E402
from loadtest import steps as load_steps  # noqa: E402

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
    assert set(event) == {"events"}  # the batch form: every event names its user
    assert 1 <= len(event["events"]) <= 3
    stamps = [e["timestamp"] for e in event["events"]]
    assert stamps == sorted(stamps) and all(s < 1000.0 for s in stamps)
    assert all(set(e) == {"user_id", "item_id", "timestamp", "event_id"} for e in event["events"])
    assert len({e["user_id"] for e in event["events"]}) == 1
    assert len({e["event_id"] for e in event["events"]}) == len(event["events"])

    assert (model.recall_weight, model.events_weight) == (900, 100)
    assert model.user_rps == 1.0
    with pytest.raises(ValueError):
        traffic.TrafficModel.from_env({"T2DIFF_LOADTEST_EVENTS_SHARE": "1.5"})
    off = traffic.TrafficModel.from_env({"T2DIFF_LOADTEST_EXCLUDE_SEEN": "0"})
    assert off.exclude_seen is False
    budget = traffic.TrafficModel.from_env({"T2DIFF_LOADTEST_BUDGET_MS": "50"})
    assert budget.recall_body(rng)["budget_ms"] == 50  # an int: the API is strict
    for bad in ({"T2DIFF_LOADTEST_BUDGET_MS": "0"}, {"T2DIFF_LOADTEST_ARRIVALS": "burst"}):
        with pytest.raises(ValueError):
            traffic.TrafficModel.from_env(bad)


def test_ranked_ids_keep_the_file_order(tmp_path: Path) -> None:
    ids = [f"u{i}" for i in range(100)]
    ranked = traffic.ZipfSampler(ids, ranked=True)
    assert ranked.ids == ids
    rng = random.Random(0)
    counts = Counter(ranked(rng) for _ in range(5000))
    assert counts.most_common(1)[0][0] == "u0"  # the first listed is the heaviest
    users = tmp_path / "users.txt"
    users.write_text("\n".join(ids))
    model = traffic.TrafficModel.from_env(
        {"T2DIFF_LOADTEST_USERS": str(users), "T2DIFF_LOADTEST_RANKED": "1"}
    )
    assert model.users.ids == ids


@pytest.mark.parametrize("poisson", [True, False])
def test_pacer_keeps_the_rate_from_a_random_phase(poisson: bool) -> None:
    rate = 4.0
    phases = set()
    for seed in range(20):
        pacer = traffic.Pacer(rate, poisson, random.Random(seed))
        first = pacer.wait(100.0)
        assert 0 <= first <= 1 / rate
        phases.add(round(first, 4))
    assert len(phases) > 10  # users spawned together do not send together

    pacer = traffic.Pacer(rate, poisson, random.Random(1))
    now = 0.0
    sends = []
    for _ in range(4000):
        now += pacer.wait(now)
        sends.append(now)
        now += 0.01  # the task's own latency does not lower the rate
    achieved = (len(sends) - 1) / (sends[-1] - sends[0])
    assert achieved == pytest.approx(rate, rel=0.06)
    gaps = [b - a for a, b in zip(sends, sends[1:], strict=False)]
    if poisson:
        assert min(gaps) < 0.02 and max(gaps) > 1.0  # exponential gaps
    else:
        assert all(g == pytest.approx(1 / rate) for g in gaps)

    # A stall of 10 s is followed by at most one catch-up send, not a burst of 40.
    pacer = traffic.Pacer(rate, False, random.Random(2))
    now = pacer.wait(0.0)
    assert pacer.wait(now + 10.0) == 0.0
    assert pacer.wait(now + 10.0) == pytest.approx(1 / rate)


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
        "user_rps": lf.MODEL.user_rps,
    }
    paced = lf.RecallUser.__new__(lf.RecallUser)
    paced.client = None
    paced.on_start()
    waits = [paced.wait_time() for _ in range(50)]
    out["paced"] = all(0 <= w <= 5 for w in waits) and len(set(waits)) > 10
    answer = {"items": [], "degraded": True, "degraded_reason": "redis_error",
              "latency_ms": 1.5, "stages_ms": {"redis": 0.5}}
    call, resp = run(lf.RecallUser.recall, {"/recall": (200, answer)})
    out["recall_call"] = [call[0], sorted(call[1]), call[2]]
    out["recall_ok"] = resp.outcome
    out["recall_503"] = run(lf.RecallUser.recall, {"/recall": (503, {})})[1].outcome
    _, resp = run(lf.RecallUser.events, {"/events": (404, {"detail": "Not Found"})})
    out["events_404"] = [resp.outcome, resp.request_meta["name"]]
    out["events_202"] = run(lf.RecallUser.events, {"/events": (202, {})})[1].outcome
    out["events_500"] = run(lf.RecallUser.events, {"/events": (500, {})})[1].outcome
    lf.RESPONSE_LOG.close()
    print("RESULT " + json.dumps(out))
    """
)


def test_locustfile_defines_user_and_handles_responses(tmp_path: Path) -> None:
    # find_spec, not importorskip: importing locust here would gevent-patch this process.
    if importlib.util.find_spec("locust") is None:
        pytest.skip("the loadtest extra (locust) is not installed")
    log = tmp_path / "responses.csv"
    env = {
        "LOADTEST_DIR": str(LOADTEST),
        "T2DIFF_LOADTEST_USER_RPS": "50",  # on_start waits up to one period
        "T2DIFF_LOADTEST_RESPONSE_LOG": str(log),
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
    assert out["paced"] is True
    assert out["user_rps"] == 50.0
    assert out["recall_call"] == ["/recall", ["exclude_seen", "k", "user_id"], "/recall"]
    assert out["recall_ok"] == "success"
    assert out["recall_503"].startswith("failure")
    assert out["events_404"] == ["success", "/events [404: not deployed]"]
    assert out["events_202"] == "success"
    assert out["events_500"].startswith("failure")
    # Every response was logged; the recall's degraded flag and stages came through.
    logged = run_load.read_response_log(log)
    assert [r.endpoint for r in logged] == ["/recall", "/recall", "/events", "/events", "/events"]
    first = logged[0]
    assert (first.status, first.degraded, first.reason) == (200, True, "redis_error")
    assert first.server_ms == 1.5 and first.stages_ms == {"redis": 0.5}
    assert logged[1].status == 503 and logged[1].degraded is None


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


# --------------------------------------------------------------------------- steps, logs, metrics


def test_rates_and_users() -> None:
    assert load_steps.parse_rates("10, 20,40") == [10.0, 20.0, 40.0]
    for bad in ("", "10,x", "10,-1", "0"):
        with pytest.raises(ValueError):
            load_steps.parse_rates(bad)
    assert load_steps.users_for_rate(100, 1.0) == (100, 1.0)
    assert load_steps.users_for_rate(2.5, 1.0) == (3, pytest.approx(2.5 / 3))
    assert load_steps.users_for_rate(100, 4.0) == (25, 4.0)
    users, user_rps = load_steps.users_for_rate(7, 2.0)
    assert users * user_rps == pytest.approx(7) and user_rps <= 2.0
    with pytest.raises(ValueError):
        load_steps.users_for_rate(0, 1.0)


def _response(t: float, latency: float, degraded: bool | None, status: int = 200, **kw):  # type: ignore[no-untyped-def]
    return run_load.Response(
        t_start=t,
        latency_ms=latency,
        endpoint=kw.get("endpoint", "/recall"),
        status=status,
        degraded=degraded,
        reason=kw.get("reason", "redis_error" if degraded else ""),
        server_ms=kw.get("server_ms", latency - 1),
        stages_ms=kw.get("stages", {"redis": 1.0, "tower": 20.0} if not degraded else {}),
    )


def test_response_log_round_trip_and_summary(tmp_path: Path) -> None:
    log = tmp_path / "responses.csv"
    rows = [
        traffic.log_row(100.0, 25.0, "/recall", 200, {"degraded": False, "latency_ms": 24,
                        "stages_ms": {"redis": 1.5, "queue": 0.1, "tower": 20.0, "ann": 1.0,
                                      "filter": 0.2}}),
        traffic.log_row(100.5, 3.0, "/recall", 200, {"degraded": True,
                        "degraded_reason": "redis_circuit_open", "latency_ms": 2.0}),
        traffic.log_row(101.0, 2.0, "/events", 503, None),
        traffic.log_row(101.5, 9.0, "/recall", 500, None),
    ]  # fmt: skip
    with log.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(traffic.LOG_COLUMNS)
        writer.writerows(rows)
    responses = run_load.read_response_log(log)
    assert [r.degraded for r in responses] == [False, True, None, None]
    assert responses[0].stages_ms["tower"] == 20.0 and responses[0].t_end == pytest.approx(100.025)
    summary = run_load.summarize_responses(responses)
    assert summary["recalls"] == 3 and summary["recalls_answered"] == 2
    assert summary["degraded"] == 1 and summary["degraded_share"] == 0.5
    assert summary["degraded_reasons"] == {"redis_circuit_open": 1}
    assert summary["errors_5xx"] == {"/events": 1, "/recall": 1}
    assert summary["stages_full_answers"]["tower"]["mean_ms"] == 20.0
    assert summary["stages_full_answers"]["server"]["n"] == 1
    assert run_load.read_response_log(tmp_path / "none.csv") == []


def test_outage_report_targets() -> None:
    down, up = 110.0, 120.0
    good = (
        [_response(100 + i * 0.5, 30, False) for i in range(20)]  # before: full
        + [_response(110 + i * 0.5, 3, True) for i in range(20)]  # during: degraded, fast
        + [_response(120.01, 4, True, reason="redis_circuit_open")]  # breaker still open
        + [_response(120.3 + i * 0.5, 30, False) for i in range(20)]  # after: full again
        + [_response(115, 2, None, status=503, endpoint="/events")]
    )
    report = run_load.outage_report(good, down, up, run_load.OutageTargets(budget_ms=50))
    assert report["ok"], report
    assert report["during"] == 20 and report["during_degraded"] == 20
    assert report["recall_5xx"] == 0 and report["events_5xx"] == 1
    assert report["recovery_s"] == pytest.approx(0.014)
    assert report["first_full_after_s"] == pytest.approx(0.33)
    assert report["bound_ms"] == 60

    slow = [*good, _response(112, 75, True)]  # over budget + 10 ms
    assert run_load.outage_report(slow, down, up, run_load.OutageTargets(50))["checks"] == {
        "no_5xx": True, "within_budget": False, "all_degraded_during": True, "recovered": True,
    }  # fmt: skip
    leaky = [*good, _response(113, 20, False)]  # a full answer while Redis was down?
    assert not run_load.outage_report(leaky, down, up)["checks"]["all_degraded_during"]
    late = [*good, _response(122.5, 3, True)]  # still degraded 2.5 s after Redis returned
    assert not run_load.outage_report(late, down, up)["checks"]["recovered"]
    loaded = [*good, _response(130, 60, True, reason="tower_timeout")]  # the load, not Redis
    report = run_load.outage_report(loaded, down, up)
    assert report["ok"] and report["other_degraded_after_up"] == {"tower_timeout": 1}
    error = [*good, _response(114, 5, None, status=500)]
    assert not run_load.outage_report(error, down, up)["checks"]["no_5xx"]

    # SIGCONT at 119.9 (PING answered at 120): a recall sent 50 ms before the resume may be
    # answered by the resumed Redis; with a 100 ms grace it is not counted as "during".
    resumed = [*good, _response(119.85, 20, False)]
    assert not run_load.outage_report(resumed, down, up, restart_at=119.9)["checks"][
        "all_degraded_during"
    ]
    graced = run_load.outage_report(resumed, down, up, restart_at=119.9, grace_s=0.1)
    assert graced["ok"] and graced["restart_at"] == 119.9 and graced["during"] == 20


METRICS = """# HELP t2diff_stage_latency_seconds Recall stage latency
# TYPE t2diff_stage_latency_seconds histogram
t2diff_stage_latency_seconds_bucket{le="0.01",stage="tower"} %d
t2diff_stage_latency_seconds_bucket{le="0.02",stage="tower"} %d
t2diff_stage_latency_seconds_bucket{le="+Inf",stage="tower"} %d
t2diff_stage_latency_seconds_sum{stage="tower"} %f
t2diff_stage_latency_seconds_count{stage="tower"} %d
t2diff_batch_size_bucket{le="1.0"} %d
t2diff_batch_size_bucket{le="2.0"} %d
t2diff_batch_size_bucket{le="+Inf"} %d
t2diff_batch_size_sum %f
t2diff_batch_size_count %d
"""


def test_prometheus_histograms_between_scrapes() -> None:
    before = run_load.parse_prometheus(METRICS % (10, 10, 10, 0.05, 10, 10, 10, 10, 10.0, 10))
    after = run_load.parse_prometheus(METRICS % (10, 110, 110, 1.55, 110, 60, 110, 110, 160.0, 110))
    assert before[("t2diff_batch_size_count", ())] == 10
    stages = load_metrics.histogram_summary(before, after, "t2diff_stage_latency_seconds", "stage")
    tower = stages["tower"]
    assert tower["count"] == 100 and tower["mean"] == pytest.approx(15.0)
    assert tower["p50"] == pytest.approx(15.0) and tower["p99"] == pytest.approx(19.9)
    batch = load_metrics.histogram_summary(before, after, "t2diff_batch_size", None, scale=1.0)
    assert batch["all"]["mean"] == pytest.approx(1.5) and batch["all"]["p50"] == 1.0


# --------------------------------------------------------------------------- --start-local


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def tiny_stack(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny export + index (torch-free, from service_fixtures) and a log of 60 users whose
    items are the export's, so their recalls are full answers."""
    if importlib.util.find_spec("locust") is None:
        pytest.skip("the loadtest extra (locust) is not installed")
    import shutil

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not on PATH")
    from service_fixtures import build_tiny_export, build_tiny_index, item_id

    root = tmp_path_factory.mktemp("loadstack")
    artifacts = build_tiny_export(root / "artifacts")
    index = build_tiny_index(artifacts, root / "index")
    rng = random.Random(0)
    lines = ["user_id,item_id,timestamp"]
    for user in range(60):
        for n in range(rng.randint(2, 15)):
            lines.append(f"user{user},{item_id(rng.randrange(500))},{1_700_000_000 + 60 * n}")
    data = root / "interactions.csv"
    data.write_text("\n".join(lines) + "\n")
    return {"root": root, "artifacts": artifacts, "index": index, "data": data}


def _start_local(
    stack: dict[str, Path], out: Path, *extra: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    command = [
        sys.executable, str(LOADTEST / "run_load.py"), "--start-local",
        "--data", str(stack["data"]), "--artifacts", str(stack["artifacts"]),
        "--index", str(stack["index"]), "--out-dir", str(out), "--warmup", "3",
        "--machine", "test-box", "--model", "tiny", *extra,
    ]  # fmt: skip
    return subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=180, check=False,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def _ports(out: Path) -> tuple[int, int]:
    summary = json.loads((out / "summary.json").read_text())
    env = summary["steps"][0]["service_env"]
    redis_port = int(env["T2DIFF_REDIS_URL"].rsplit(":", 1)[1].split("/")[0])
    return int(env["T2DIFF_PORT"]), redis_port


def test_start_local_runs_end_to_end(tiny_stack: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    results = tmp_path / "load.csv"
    proc = _start_local(
        tiny_stack, out, "--rates", "6", "--run-time", "4s", "--p99-ms", "5000",
        "--max-error-rate", "0", "--max-degraded-rate", "0", "--results-csv", str(results),
        # ~24 tasks at the default 10 % share send no event write at all ~8 % of the time;
        # at 40 % that is ~1e-5, and the event-write assertion below always has data.
        env={"T2DIFF_LOADTEST_EVENTS_SHARE": "0.4"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "SLO met" in proc.stdout
    with results.open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1
    row = rows[0]
    assert (row["machine"], row["model"], row["rate_rps"], row["duration_s"]) == (
        "test-box", "tiny", "6", "4",
    )  # fmt: skip
    assert int(row["requests"]) >= 10 and row["errors"] == "0"
    assert float(row["p50_ms"]) <= float(row["p99_ms"])
    assert (out / "report.html").stat().st_size > 1000
    assert (out / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    summary = json.loads((out / "summary.json").read_text())
    step = summary["steps"][0]
    # The simulated users called with the loaded users' ids: every recall a full answer.
    loaded = set((out / "users.txt").read_text().split())
    assert loaded == {f"user{u}" for u in range(60)}
    assert step["responses"]["degraded"] == 0 and step["responses"]["recalls"] > 0
    assert step["stats"]["POST /events"]["failures"] == 0  # the events body is accepted
    assert step["metrics"]["stage_ms"]["tower"]["count"] > 0
    assert step["service_env"]["T2DIFF_ORT_INTRA_THREADS"] == "1"
    assert "loadavg" in step["before"]
    # Everything it started is stopped.
    service_port, redis_port = _ports(out)
    assert not _listening(service_port) and not _listening(redis_port)


def test_start_local_missed_slo_exits_1(tiny_stack: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "missed"
    results = tmp_path / "load.csv"
    proc = _start_local(
        tiny_stack, out, "--rates", "4", "--run-time", "3s", "--p99-ms", "0.01",
        "--results-csv", str(results),
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "SLO MISSED" in proc.stderr and "p99" in proc.stderr
    assert len(results.read_text().splitlines()) == 2  # the row is written all the same
    assert (out / "latency.png").exists() and (out / "report.html").exists()
    service_port, redis_port = _ports(out)
    assert not _listening(service_port) and not _listening(redis_port)


def test_start_local_redis_outage(tiny_stack: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "outage"
    proc = _start_local(
        tiny_stack, out, "--rates", "20", "--run-time", "7s", "--endpoint", "/recall",
        "--redis-outage-at", "2", "--redis-outage-s", "2",
    )  # fmt: skip
    # 1 only if the shared box blew the latency bound; the outage itself must behave.
    assert proc.returncode in (0, 1), proc.stdout[-3000:] + proc.stderr[-3000:]
    outage = json.loads((out / "summary.json").read_text())["steps"][0]["outage"]
    assert outage["mode"] == "kill" and outage["outage_s"] == pytest.approx(2, abs=0.5)
    checks = outage["checks"]
    assert checks["no_5xx"] and checks["all_degraded_during"] and checks["recovered"], outage
    assert outage["during"] >= 10
    assert set(outage["during_reasons"]) <= {"redis_error", "redis_timeout", "redis_circuit_open"}
    assert (out / "outage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if proc.returncode == 1:
        assert not checks["within_budget"]


def test_start_local_refuses_bad_setups(tmp_path: Path) -> None:
    assert run_load.main(["--start-local", "--out-dir", str(tmp_path)]) == 2  # no --data
    assert run_load.main(["--host", "http://x", "--start-local"]) == 2  # both targets
    assert run_load.main(["--host", "http://x", "--redis-outage-at", "5"]) == 2  # not local
    data = tmp_path / "d.csv"
    data.write_text("user_id,item_id,timestamp\n")
    args = ["--start-local", "--data", str(data), "--run-time", "10s", "--out-dir", str(tmp_path)]
    assert run_load.main([*args, "--redis-outage-at", "5", "--redis-outage-s", "4"]) == 2
    assert run_load.main([*args, "--artifacts", str(tmp_path / "none")]) == 2


# The hand-written parser load_metrics.parse_prometheus replaced (prometheus_client's own
# parser now), kept as the reference that the replacement reads the service's text alike.
_LEGACY_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LEGACY_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def _legacy_parse(text: str) -> dict:
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _LEGACY_SAMPLE.match(line)
        if match is None:
            continue
        name, labels, value = match.groups()
        pairs = tuple(sorted(_LEGACY_LABEL.findall(labels or "")))
        samples[(name, pairs)] = float(value)
    return samples


def test_metrics_parse_prometheus_client_text_as_the_old_parser() -> None:
    prometheus_client = pytest.importorskip("prometheus_client")
    registry = prometheus_client.CollectorRegistry()
    stage = prometheus_client.Histogram(
        "t2diff_stage_latency_seconds", "Recall stage latency", ["stage"],
        buckets=(0.001, 0.01, 0.02, 0.05), registry=registry,
    )  # fmt: skip
    batch = prometheus_client.Histogram(
        "t2diff_batch_size", "Batch size", buckets=(1, 2, 4, 8), registry=registry
    )
    cache = prometheus_client.Counter(
        "t2diff_xhat_cache", "xhat cache", ["result"], registry=registry
    )
    warm = prometheus_client.Gauge("t2diff_xhat_warm_sessions", "warm", registry=registry)

    def scrape() -> dict:
        text = prometheus_client.generate_latest(registry).decode()
        parsed = load_metrics.parse_prometheus(text)
        assert parsed == _legacy_parse(text)  # every sample, histograms and _created too
        return parsed

    stage.labels(stage="tower").observe(0.005)
    batch.observe(1)
    before = scrape()
    for n in range(100):
        stage.labels(stage="tower").observe(0.01 + n * 0.0001)  # 0.010 .. 0.0199
        stage.labels(stage="ann").observe(0.0005)
        batch.observe(3)
    cache.labels(result="hit").inc(7)
    cache.labels(result="miss").inc(3)
    warm.set(42)
    after = scrape()

    assert (
        after[("t2diff_stage_latency_seconds_bucket", (("le", "+Inf"), ("stage", "tower")))] == 101
    )
    assert after[("t2diff_xhat_cache_total", (("result", "hit"),))] == 7
    figures = load_metrics.step_metrics(before, after)
    stages = figures["stage_ms"]
    assert stages["tower"]["count"] == 100 and stages["ann"]["count"] == 100
    assert stages["tower"]["mean"] == pytest.approx(14.95)
    assert 10 <= stages["tower"]["p50"] <= 20 and stages["ann"]["p99"] <= 1
    assert figures["batch_size"]["count"] == 100 and figures["batch_size"]["mean"] == 3
    assert figures["xhat_cache"] == {"hit": 7.0, "miss": 3.0}
    assert figures["xhat_warm"]["sessions"] == 42
    assert load_metrics.metrics_lines(figures)[1].startswith("run_load: xhat cache 7 hits")
    assert load_metrics.metrics_lines({"error": "refused"}) == []
