"""Run a headless locust load test against a recall service, plot it and check an SLO.

Against a running service::

    python loadtest/run_load.py --host http://127.0.0.1:8000 --users 50 --run-time 1m \\
        --user-rps 2 --p99-ms 50 --max-error-rate 0.01 \\
        --results-csv docs/results/load.csv --machine "$(hostname)" --model t2diff

Or the whole stack here, without Docker (``--start-local``)::

    python loadtest/run_load.py --start-local --data ../shared/data/ml-1m/sequences.tsv \\
        --artifacts artifacts/ml1m-t2diff-s2 --index indexes/ml1m-t2diff-s2 \\
        --rates 10,20,40 --run-time 45s --p99-ms 50 --max-error-rate 0 --max-degraded-rate 0

``--start-local`` starts a private ``redis-server`` on a free port (persistence off; one
``SAVE`` snapshot into its own directory after loading, so that a killed Redis comes back
with the sessions), loads the sessions of ``--data`` with ``t2diff sessions load``, starts
``t2diff serve`` on a free port with ``T2DIFF_ARTIFACTS_DIR``/``T2DIFF_INDEX_DIR`` from
``--artifacts``/``--index`` (default ``artifacts/current``/``indexes/current``; they must
exist: ``t2diff demo`` or ``t2diff export`` + ``build-index`` make them) and the small-box
settings of :data:`SERVICE_DEFAULTS` (``--service-env KEY=VALUE`` overrides), waits for
``/readyz``, sends ``--warmup`` unmeasured recalls, runs locust, and stops the service and
Redis on the way out, also on failure, Ctrl-C or SIGTERM.  The simulated users call with the
user ids that were loaded (the most active users the most often) and the model's item ids.

``--rates 10,20,40`` runs one locust step per offered rate (``--run-time`` each) against
the same stack; each step gets its own directory (``rate-R/``) with locust's CSVs, its HTML
report, ``latency.png``, ``responses.csv`` (one row per response, from the locustfile:
``degraded`` and ``stages_ms`` included), a ``/metrics`` scrape, and a results-CSV row.
``--redis-outage-at S --redis-outage-s D`` stops Redis S seconds into each step for D
seconds (``--redis-outage-mode kill``: SIGKILL and a restart on the same port; ``stop``:
SIGSTOP/SIGCONT) and checks issue #6's targets: no 5xx from ``/recall``, every recall
within budget + 10 ms, every recall sent during the outage degraded, full answers again
within 2 s of Redis answering; ``outage.png`` shows every recall.  ``summary.json`` in the
output directory has every step's figures (stats, degraded reasons, per-stage cost from
``stages_ms`` and from the ``/metrics`` histograms, batch sizes, load average and the CPU
used by other processes during the step).

Exit status:

* 0 when every step met the SLO (or none was asked for) and the outage targets,
* 1 when one was missed (the reason is printed),
* 2 when locust or the local stack failed, or locust left no statistics,
* 130 when interrupted.

The offered rate is ``users x user-rps`` (each user paced by ``traffic_model.Pacer``);
``rate_rps`` in the results CSV is that offered rate, and the summary line also shows the
achieved one.  Only the standard library is needed to import this module (matplotlib,
redis-py are imported where used), so its pure functions are testable without locust.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # matplotlib is imported where a plot is drawn
    from matplotlib.figure import Figure

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:  # run as a script without the project installed
    sys.path.append(str(ROOT))

from t2diff_cli.local_stack import (  # noqa: E402 - needs ROOT on the path
    RedisServer,
    ServiceNotReady,
    file_tail,
    free_port,
    stop_process,
    wait_until_ready,
)

LOCUSTFILE = HERE / "locustfile.py"
AGGREGATED = "Aggregated"
RESULTS_HEADER = [
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
# Locust's percentile columns, as (fraction, column name).
PERCENTILES = [
    (0.50, "50%"),
    (0.66, "66%"),
    (0.75, "75%"),
    (0.80, "80%"),
    (0.90, "90%"),
    (0.95, "95%"),
    (0.98, "98%"),
    (0.99, "99%"),
    (0.999, "99.9%"),
    (0.9999, "99.99%"),
    (1.0, "100%"),
]


# --------------------------------------------------------------------------- statistics


def _float(value: str | None) -> float:
    """Locust writes ``N/A`` (or nothing) where it has no sample."""
    try:
        return float(value) if value not in (None, "", "N/A") else math.nan
    except ValueError:
        return math.nan


def _int(value: str | None) -> int:
    number = _float(value)
    return 0 if math.isnan(number) else int(number)


@dataclass(frozen=True)
class Stats:
    """One row of locust's ``_stats.csv``: an endpoint, or the ``Aggregated`` total."""

    name: str
    method: str
    requests: int
    failures: int
    rps: float
    percentiles_ms: dict[float, float] = field(default_factory=dict)

    @property
    def error_rate(self) -> float:
        return self.failures / self.requests if self.requests else 0.0

    def percentile(self, fraction: float) -> float:
        return self.percentiles_ms.get(fraction, math.nan)

    @property
    def p50_ms(self) -> float:
        return self.percentile(0.50)

    @property
    def p95_ms(self) -> float:
        return self.percentile(0.95)

    @property
    def p99_ms(self) -> float:
        return self.percentile(0.99)

    @property
    def label(self) -> str:
        return f"{self.method} {self.name}".strip()


def read_stats_rows(path: Path) -> list[Stats]:
    """Every row of a locust ``_stats.csv``."""
    with Path(path).open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = {"Name", "Request Count", "Failure Count", "99%"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path} is not a locust stats CSV (missing {sorted(missing)})")
        return [
            Stats(
                name=row["Name"],
                method=row.get("Type") or "",
                requests=_int(row["Request Count"]),
                failures=_int(row["Failure Count"]),
                rps=_float(row.get("Requests/s")),
                percentiles_ms={q: _float(row.get(col)) for q, col in PERCENTILES},
            )
            for row in reader
        ]


def read_stats(path: Path, name: str = AGGREGATED) -> Stats:
    """The row called ``name`` (default: the ``Aggregated`` total) of a ``_stats.csv``."""
    rows = read_stats_rows(path)
    for row in rows:
        if row.name == name:
            return row
    raise ValueError(f"no row {name!r} in {path} (rows: {[r.name for r in rows]})")


# --------------------------------------------------------------------------- SLO


@dataclass(frozen=True)
class SloResult:
    ok: bool
    messages: list[str]


def check_slo(
    stats: Stats, p99_ms: float | None = None, max_error_rate: float | None = None
) -> SloResult:
    """Does ``stats`` meet the SLO?  ``None`` skips a bound; no request is always a miss."""
    messages: list[str] = []
    if stats.requests <= 0:
        messages.append(f"no requests completed for {stats.name!r}: the SLO cannot be met")
    if p99_ms is not None and stats.requests > 0:
        if math.isnan(stats.p99_ms):
            messages.append(f"p99 of {stats.name!r} is unknown")
        elif stats.p99_ms > p99_ms:
            messages.append(f"p99 {stats.p99_ms:g} ms > {p99_ms:g} ms ({stats.name})")
    if max_error_rate is not None and stats.requests > 0 and stats.error_rate > max_error_rate:
        messages.append(
            f"error rate {stats.error_rate:.2%} ({stats.failures}/{stats.requests}) > "
            f"{max_error_rate:.2%} ({stats.name})"
        )
    return SloResult(ok=not messages, messages=messages)


# --------------------------------------------------------------------------- helpers

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([hms]?)")


def parse_duration(text: str) -> float:
    """Locust's ``--run-time`` syntax in seconds: ``90``, ``30s``, ``2m``, ``1h30m``."""
    text = text.strip().lower()
    parts = _DURATION.findall(text)
    if not text or "".join(f"{n}{u}" for n, u in parts) != text.replace(" ", ""):
        raise ValueError(f"bad duration {text!r} (use e.g. 90, 30s, 2m, 1h30m)")
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "": 1.0}
    return sum(float(n) * scale[u] for n, u in parts)


def _ms(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:g}"


def format_summary(stats: Stats, offered_rps: float | None, duration_s: float) -> str:
    """The one-line summary printed after a run."""
    offered = f"offered {offered_rps:g} rps, " if offered_rps is not None else ""
    achieved = stats.rps if not math.isnan(stats.rps) else stats.requests / max(duration_s, 1e-9)
    return (
        f"load: {offered}achieved {achieved:.1f} rps over {duration_s:g} s | "
        f"requests {stats.requests} errors {stats.failures} ({stats.error_rate:.2%}) | "
        f"p50 {_ms(stats.p50_ms)} ms p95 {_ms(stats.p95_ms)} ms p99 {_ms(stats.p99_ms)} ms"
    )


def result_row(
    stats: Stats, machine: str, model: str, rate_rps: float, duration_s: float
) -> dict[str, str]:
    return {
        "machine": machine,
        "model": model,
        "rate_rps": f"{rate_rps:g}",
        "duration_s": f"{duration_s:g}",
        "requests": str(stats.requests),
        "errors": str(stats.failures),
        "p50_ms": _ms(stats.p50_ms),
        "p95_ms": _ms(stats.p95_ms),
        "p99_ms": _ms(stats.p99_ms),
    }


def append_result(path: Path, row: dict[str, str]) -> None:
    """Append ``row`` to a results CSV, writing the header first if the file is new."""
    path = Path(path)
    if path.exists() and path.stat().st_size > 0:
        with path.open(newline="", encoding="utf-8") as handle:
            header = next(csv.reader(handle), [])
        if header != RESULTS_HEADER:
            raise ValueError(f"{path} has header {header}, expected {RESULTS_HEADER}")
        new = False
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        new = True
    with path.open("a", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=RESULTS_HEADER)
        if new:
            writer.writeheader()
        writer.writerow({key: row[key] for key in RESULTS_HEADER})


def read_history(path: Path, name: str = AGGREGATED) -> list[dict[str, float]]:
    """The ``name`` rows of a ``_stats_history.csv`` as floats (empty if there is none)."""
    if not Path(path).exists():
        return []
    with Path(path).open(newline="", encoding="utf-8") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("Name") == name]
    keys = ["Timestamp", "User Count", "Requests/s", "Failures/s", "50%", "95%", "99%"]
    return [{key: _float(row.get(key)) for key in keys} for row in rows]


# --------------------------------------------------------------------------- plot

_TICKS = {0.5, 0.9, 0.95, 0.99, 0.999, 0.9999, 1.0}


def _new_figure(figsize: tuple[float, float]) -> Figure:
    """A matplotlib figure drawn off-screen (Agg: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def _save_png(fig: Figure, out_png: Path) -> Path:
    """Lay ``fig`` out and write it to ``out_png`` (its folder made when missing)."""
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    return out_png


def plot_latency(
    rows: Sequence[Stats], history: Sequence[dict[str, float]], out_png: Path, title: str
) -> Path:
    """Latency-percentile curves per endpoint (left) and p50/p95/p99 over time (right)."""
    fig = _new_figure((13, 4.8))
    left, right = fig.subplots(1, 2)
    # x = "number of nines" so that the tail (p99, p99.9) gets room.
    xs = [-math.log10(1 - q) if q < 1 else 4.5 for q, _ in PERCENTILES]
    for row in rows:
        if row.requests <= 0:
            continue
        ys = [row.percentile(q) for q, _ in PERCENTILES]
        style = {"linewidth": 2.5, "color": "black"} if row.name == AGGREGATED else {}
        left.plot(
            xs, ys, marker="o", markersize=3, label=f"{row.label} (n={row.requests})", **style
        )
    ticks = [(x, col) for x, (q, col) in zip(xs, PERCENTILES, strict=True) if q in _TICKS]
    left.set_xticks([x for x, _ in ticks], [col for _, col in ticks])
    left.set_xlabel("percentile")
    left.set_ylabel("latency (ms)")
    left.set_yscale("log")
    left.grid(True, which="both", alpha=0.3)
    if left.get_legend_handles_labels()[0]:
        left.legend(fontsize=8)
    left.set_title("latency percentiles")

    if history:
        start = history[0]["Timestamp"]
        ts = [h["Timestamp"] - start for h in history]
        for key, color in (("50%", "tab:green"), ("95%", "tab:orange"), ("99%", "tab:red")):
            right.plot(ts, [h[key] for h in history], label=f"p{key[:-1]}", color=color)
        right.set_xlabel("time (s)")
        right.set_ylabel("latency (ms), rolling window")
        right.set_yscale("log")
        right.grid(True, alpha=0.3)
        rate = right.twinx()
        rate.plot(ts, [h["Requests/s"] for h in history], color="tab:blue", alpha=0.4, label="rps")
        rate.set_ylabel("requests/s")
        lines = right.get_legend_handles_labels()
        more = rate.get_legend_handles_labels()
        right.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="upper left")
        right.set_title("over time (all endpoints)")
    else:
        right.text(0.5, 0.5, "no stats history", ha="center", va="center")
        right.set_axis_off()

    fig.suptitle(title)
    return _save_png(fig, out_png)


# --------------------------------------------------------------------------- locust


def locust_command(
    host: str,
    users: int,
    spawn_rate: float,
    run_time: str,
    csv_prefix: Path,
    html: Path,
    locustfile: Path = LOCUSTFILE,
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "locust",
        "--headless",
        "-f",
        str(locustfile),
        "--host",
        host,
        "--users",
        str(users),
        "--spawn-rate",
        f"{spawn_rate:g}",
        "--run-time",
        run_time,
        "--csv",
        str(csv_prefix),
        "--html",
        str(html),
        "--only-summary",
        # Failures are judged by the SLO below, not by locust's own exit code.
        "--exit-code-on-error",
        "0",
        "--stop-timeout",
        "5",
        "--loglevel",
        "WARNING",
    ]


def locust_env(
    base: dict[str, str],
    user_rps: float,
    user_ids: str | None = None,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    env = dict(base, T2DIFF_LOADTEST_USER_RPS=f"{user_rps:g}")
    if user_ids:
        env["T2DIFF_LOADTEST_USERS"] = user_ids
    env.update(extra or {})
    return env


def users_for_rate(rate_rps: float, max_user_rps: float) -> tuple[int, float]:
    """(simulated users, tasks/s per user) that offer exactly ``rate_rps`` in total, with no
    user above ``max_user_rps`` (a user waits for its answer before its next task)."""
    if rate_rps <= 0 or max_user_rps <= 0:
        raise ValueError(f"rate ({rate_rps}) and per-user rate ({max_user_rps}) must be > 0")
    users = max(1, math.ceil(rate_rps / max_user_rps - 1e-9))
    return users, rate_rps / users


def parse_rates(text: str) -> list[float]:
    """``"10,20,40"`` -> ``[10.0, 20.0, 40.0]``."""
    try:
        rates = [float(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise ValueError(f"bad --rates {text!r}: {exc}") from exc
    if not rates or any(r <= 0 for r in rates):
        raise ValueError(f"bad --rates {text!r}: positive numbers, comma-separated")
    return rates


# --------------------------------------------------------------------------- response log

LOG_STAGES = ("redis", "queue", "tower", "ann", "filter", "diffusion", "attention")


@dataclass(frozen=True)
class Response:
    """One row of the locustfile's response log (``T2DIFF_LOADTEST_RESPONSE_LOG``)."""

    t_start: float
    latency_ms: float
    endpoint: str
    status: int
    degraded: bool | None
    reason: str
    server_ms: float
    stages_ms: dict[str, float] = field(default_factory=dict)

    @property
    def t_end(self) -> float:
        return self.t_start + self.latency_ms / 1000


def read_response_log(path: Path) -> list[Response]:
    if not Path(path).exists():
        return []
    out: list[Response] = []
    with Path(path).open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            degraded = row.get("degraded") or ""
            out.append(
                Response(
                    t_start=float(row["t_start"]),
                    latency_ms=float(row["latency_ms"]),
                    endpoint=row["endpoint"],
                    status=_int(row["status"]),
                    degraded=None if degraded == "" else degraded == "1",
                    reason=row.get("reason") or "",
                    server_ms=_float(row.get("server_ms")),
                    stages_ms={
                        stage: _float(row.get(f"{stage}_ms"))
                        for stage in LOG_STAGES
                        if row.get(f"{stage}_ms")
                    },
                )
            )
    return out


def _quantile(values: Sequence[float], q: float) -> float:
    """Nearest-rank quantile (``nan`` for no values)."""
    ordered = sorted(v for v in values if not math.isnan(v))
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def summarize_responses(responses: Sequence[Response]) -> dict[str, object]:
    """Degraded answers by reason, 5xx by endpoint, and the per-stage cost of full answers
    as the service reported it in ``stages_ms`` (mean, p50, p99; ms)."""
    recalls = [r for r in responses if r.endpoint == "/recall"]
    answered = [r for r in recalls if r.status == 200]
    degraded = [r for r in answered if r.degraded]
    reasons: dict[str, int] = {}
    for r in degraded:
        reasons[r.reason or "unknown"] = reasons.get(r.reason or "unknown", 0) + 1
    fives: dict[str, int] = {}
    for r in responses:
        if r.status >= 500 or r.status == 0:
            fives[r.endpoint] = fives.get(r.endpoint, 0) + 1
    full = [r for r in answered if r.degraded is False]
    stages: dict[str, dict[str, float]] = {}
    for stage in (*LOG_STAGES, "server"):
        values = [
            r.server_ms if stage == "server" else r.stages_ms.get(stage, math.nan) for r in full
        ]
        values = [v for v in values if not math.isnan(v)]
        if values:
            stages[stage] = {
                "n": len(values),
                "mean_ms": round(sum(values) / len(values), 3),
                "p50_ms": round(_quantile(values, 0.5), 3),
                "p99_ms": round(_quantile(values, 0.99), 3),
            }
    return {
        "recalls": len(recalls),
        "recalls_answered": len(answered),
        "degraded": len(degraded),
        "degraded_share": round(len(degraded) / len(answered), 6) if answered else 0.0,
        "degraded_reasons": reasons,
        "errors_5xx": fives,
        "events": sum(1 for r in responses if r.endpoint == "/events"),
        "stages_full_answers": stages,
    }


@dataclass(frozen=True)
class OutageTargets:
    """Issue #6: under a Redis outage no 5xx from /recall, every answer within budget +
    slack, every answer during the outage degraded, full answers back within recovery_s."""

    budget_ms: float = 200.0
    slack_ms: float = 10.0
    recovery_s: float = 2.0


def outage_report(
    responses: Sequence[Response],
    down_at: float,
    up_at: float,
    targets: OutageTargets = OutageTargets(),  # noqa: B008 - frozen dataclass
    restart_at: float | None = None,
    grace_s: float = 0.0,
) -> dict[str, object]:
    """The outage figures of one run (unix seconds): ``down_at``, when Redis had been
    stopped; ``restart_at``, when its restart (or SIGCONT) was issued (default ``up_at``);
    ``up_at``, when it answered PING again.  "During the outage" = recalls *sent* in
    [down_at, restart_at - grace_s): a read sent just before Redis resumes may still be
    answered by it, within the service's Redis timeout (and one retry), which is what
    ``grace_s`` allows for.  Recovery = from ``up_at`` to the end of the last degraded recall
    sent after it and degraded for a Redis reason (0 when none was), and to the first full
    answer."""
    recalls = [r for r in responses if r.endpoint == "/recall"]
    bound = targets.budget_ms + targets.slack_ms
    restart_at = up_at if restart_at is None else restart_at
    during = [r for r in recalls if down_at <= r.t_start < restart_at - grace_s]
    after = [r for r in recalls if r.t_start >= up_at and r.status == 200]
    # Only answers degraded because of Redis count against recovery: a tower_timeout after
    # the outage is the load's (it happens before the outage too), reported apart.
    degraded_after = [r for r in after if r.degraded and r.reason.startswith("redis")]
    other_after: dict[str, int] = {}
    for r in after:
        if r.degraded and not r.reason.startswith("redis"):
            other_after[r.reason or "unknown"] = other_after.get(r.reason or "unknown", 0) + 1
    first_full = min((r.t_end for r in after if r.degraded is False), default=math.nan)
    recall_5xx = sum(1 for r in recalls if r.status >= 500 or r.status == 0)
    over = [r for r in recalls if r.latency_ms > bound]
    over_server = [r for r in recalls if not math.isnan(r.server_ms) and r.server_ms > bound]
    reasons: dict[str, int] = {}
    for r in during:
        if r.degraded:
            reasons[r.reason or "unknown"] = reasons.get(r.reason or "unknown", 0) + 1
    recovery = max((r.t_end for r in degraded_after), default=up_at) - up_at
    report: dict[str, object] = {
        "down_at": round(down_at, 4),
        "restart_at": round(restart_at, 4),
        "up_at": round(up_at, 4),
        "grace_s": grace_s,
        "outage_s": round(up_at - down_at, 3),
        "recalls": len(recalls),
        "recall_5xx": recall_5xx,
        "events_5xx": sum(1 for r in responses if r.endpoint == "/events" and r.status >= 500),
        "bound_ms": bound,
        "max_latency_ms": round(max((r.latency_ms for r in recalls), default=math.nan), 3),
        "max_server_latency_ms": round(
            max((r.server_ms for r in recalls if not math.isnan(r.server_ms)), default=math.nan),
            3,
        ),
        "over_bound": len(over),
        "over_bound_server": len(over_server),
        "during": len(during),
        "during_degraded": sum(1 for r in during if r.degraded),
        "during_not_degraded": sum(1 for r in during if r.status == 200 and not r.degraded),
        "during_reasons": reasons,
        "max_latency_during_ms": round(max((r.latency_ms for r in during), default=math.nan), 3),
        "recovery_s": round(recovery, 3),
        "first_full_after_s": round(first_full - up_at, 3),
        "degraded_after_up": len(degraded_after),
        "other_degraded_after_up": other_after,
    }
    checks = {
        "no_5xx": recall_5xx == 0,
        "within_budget": not over,
        "all_degraded_during": bool(during) and report["during_not_degraded"] == 0,
        "recovered": recovery <= targets.recovery_s and not math.isnan(first_full),
    }
    report["checks"] = checks
    report["ok"] = all(checks.values())
    return report


def plot_outage(
    responses: Sequence[Response], down_at: float, up_at: float, out_png: Path, title: str
) -> Path:
    """Every recall's latency against its send time: full answers, degraded ones, errors."""
    recalls = [r for r in responses if r.endpoint == "/recall"]
    start = min((r.t_start for r in recalls), default=down_at)
    fig = _new_figure((11, 4.5))
    ax = fig.subplots()
    groups = [
        ("full", "tab:blue", [r for r in recalls if r.status == 200 and r.degraded is False]),
        ("degraded", "tab:orange", [r for r in recalls if r.status == 200 and r.degraded]),
        ("error", "tab:red", [r for r in recalls if r.status != 200]),
    ]
    for label, color, rows in groups:
        if rows:
            ax.scatter(
                [r.t_start - start for r in rows],
                [max(r.latency_ms, 0.1) for r in rows],
                s=4,
                color=color,
                label=f"{label} (n={len(rows)})",
            )
    ax.axvspan(down_at - start, up_at - start, color="grey", alpha=0.2, label="Redis down")
    ax.set_yscale("log")
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("latency (ms, client side)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title(title)
    return _save_png(fig, out_png)


# --------------------------------------------------------------------------- /metrics

_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

MetricKey = tuple[str, tuple[tuple[str, str], ...]]


def parse_prometheus(text: str) -> dict[MetricKey, float]:
    """Prometheus text format -> {(name, sorted labels): value} (comments skipped)."""
    samples: dict[MetricKey, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            continue
        name, labels, value = match.groups()
        pairs = tuple(sorted(_LABEL.findall(labels or "")))
        samples[(name, pairs)] = _float(value)
    return samples


def histogram_summary(
    before: dict[MetricKey, float],
    after: dict[MetricKey, float],
    metric: str,
    label: str | None,
    scale: float = 1000.0,
) -> dict[str, dict[str, float]]:
    """Per value of ``label`` (or one "all" entry), what a histogram observed between two
    scrapes: count, mean and p50/p95/p99 interpolated within buckets (as Prometheus'
    ``histogram_quantile``), multiplied by ``scale`` (seconds -> ms by default)."""
    groups: dict[str, dict[str, object]] = {}
    for (name, labels), value in after.items():
        if not name.startswith(metric):
            continue
        kind = name[len(metric) :]
        if kind not in ("_bucket", "_sum", "_count"):
            continue
        labels_d = dict(labels)
        group = labels_d.get(label, "all") if label else "all"
        delta = value - before.get((name, labels), 0.0)
        entry = groups.setdefault(group, {"buckets": [], "sum": 0.0, "count": 0.0})
        if kind == "_bucket":
            entry["buckets"].append((_float(labels_d.get("le")), delta))  # type: ignore[union-attr]
        elif kind == "_sum":
            entry["sum"] = delta
        else:
            entry["count"] = delta
    out: dict[str, dict[str, float]] = {}
    for group, entry in sorted(groups.items()):
        count = float(entry["count"])  # type: ignore[arg-type]
        if count <= 0:
            continue
        buckets = sorted(entry["buckets"])  # type: ignore[call-overload]
        summary = {"count": count, "mean": float(entry["sum"]) / count * scale}  # type: ignore[arg-type]
        for q in (0.5, 0.95, 0.99):
            summary[f"p{round(q * 100)}"] = _bucket_quantile(buckets, q) * scale
        out[group] = {k: round(v, 3) for k, v in summary.items()}
    return out


def _bucket_quantile(buckets: Sequence[tuple[float, float]], q: float) -> float:
    if not buckets or buckets[-1][1] <= 0:
        return math.nan
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, cumulative in buckets:
        if cumulative >= rank:
            if math.isinf(bound):
                return lower_bound  # above the highest finite bucket: its bound, as Prometheus
            if cumulative == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                cumulative - lower_count
            )
        lower_bound, lower_count = bound, cumulative
    return lower_bound


def scrape(url: str, timeout_s: float = 5.0) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 - our URL
        return response.read().decode("utf-8")


# --------------------------------------------------------------------------- CPU accounting

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_stat(pid: str) -> tuple[int, int] | None:
    """(ppid, utime + stime in ticks) of a live process, or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), int(fields[11]) + int(fields[12])


def cpu_snapshot() -> tuple[float, float, float] | None:
    """(wall time, busy CPU-seconds of the machine, CPU-seconds of this process tree: self,
    waited-for children and live descendants).  None where /proc is missing."""
    import resource

    try:
        cpu = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    ticks = [int(x) for x in cpu]
    busy = sum(ticks) - ticks[3] - (ticks[4] if len(ticks) > 4 else 0)  # minus idle, iowait
    procs: dict[int, tuple[int, int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _proc_stat(entry)
            if stat is not None:
                procs[int(entry)] = stat
    tree, frontier = set(), [os.getpid()]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, (ppid, _) in procs.items() if ppid == parent]
        tree.update(children)
        frontier.extend(children)
    ours = sum(procs[pid][1] for pid in tree) / _CLK_TCK
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        ours += usage.ru_utime + usage.ru_stime
    return time.monotonic(), busy / _CLK_TCK, ours


def others_cores(before: tuple | None, after: tuple | None) -> float:
    """Cores kept busy by processes outside this tree between two snapshots."""
    if before is None or after is None or after[0] <= before[0]:
        return math.nan
    return max(0.0, ((after[1] - before[1]) - (after[2] - before[2])) / (after[0] - before[0]))


def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def wait_for_quiet(
    max_load: float | None, max_wait_s: float, sample_s: float = 5.0, busy_cores: float = 0.5
) -> dict[str, object]:
    """Before a measured run: while the 1-minute load is above ``max_load`` *and* other
    processes keep more than ``busy_cores`` busy (our own idle stack does not count; the
    load average still carries our previous step), sleep 60 s and re-check, at most
    ``max_wait_s``.  Returns what was seen, for the results."""
    waited = 0.0
    others = math.nan
    while True:
        load = loadavg()
        if max_load is None or not load or load[0] <= max_load:
            break
        before = cpu_snapshot()
        time.sleep(sample_s)
        others = others_cores(before, cpu_snapshot())
        if not math.isnan(others) and others <= busy_cores:
            break
        if waited >= max_wait_s:
            print(f"run_load: still busy after {waited:.0f}s (load {load}); running anyway")
            break
        print(f"run_load: load {load}, others {others:.2f} cores busy: waiting 60 s", flush=True)
        time.sleep(60)
        waited += 60 + sample_s
    return {"loadavg": loadavg(), "waited_s": waited, "others_cores_idle": round(others, 3)}


# --------------------------------------------------------------------------- local stack


# Serving settings for a small CPU box: one ORT and one FAISS thread per call and one
# concurrent engine call more than there are cores (while one call's Python side holds the
# GIL, the others keep the cores busy: load.md runs d-g, 3 on 2 cores), OpenMP threads
# that sleep instead of spinning, quiet logs, no artifact polling.  --service-env overrides
# any of them.
SERVICE_DEFAULTS = {
    "T2DIFF_ORT_INTRA_THREADS": "1",
    "T2DIFF_FAISS_THREADS": "1",
    "T2DIFF_INFERENCE_CONCURRENCY": str(max(1, min((os.cpu_count() or 1) + 1, 4))),
    "T2DIFF_LOG_LEVEL": "warning",
    "T2DIFF_WATCH_INTERVAL_S": "0",
    "OMP_WAIT_POLICY": "PASSIVE",
}


class LocalStack:
    """redis-server + sessions from a data file + ``t2diff serve``, stopped on exit (also on
    an exception or Ctrl-C).  Writes ``users.txt`` (the loaded user ids, the longest sessions
    first) and ``items.txt`` (the model's item ids) for the locustfile."""

    def __init__(
        self,
        data: Path,
        artifacts: Path,
        index: Path,
        out_dir: Path,
        service_env: dict[str, str],
        ready_timeout_s: float = 180.0,
        data_format: str = "auto",
    ) -> None:
        self.data, self.artifacts, self.index = Path(data), Path(artifacts), Path(index)
        self.out_dir = Path(out_dir)
        self.service_env = service_env
        self.ready_timeout_s = ready_timeout_s
        self.data_format = data_format
        self.redis: RedisServer | None = None
        self.service: subprocess.Popen[bytes] | None = None
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.users_file = self.out_dir / "users.txt"
        self.items_file = self.out_dir / "items.txt"
        self.env: dict[str, str] = {}
        self.sessions_loaded = 0

    def __enter__(self) -> LocalStack:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        for what, path in (("--data", self.data), ("--artifacts", self.artifacts)):
            if not path.exists():
                raise RuntimeError(f"{what} {path} does not exist")
        if not (self.index / "manifest.json").exists():
            raise RuntimeError(f"--index {self.index} has no manifest.json")
        # Persistence off, but one SAVE snapshot after loading (below): a Redis killed by
        # --redis-outage-mode kill comes back with the sessions, as from its last RDB file.
        self.redis = RedisServer(workdir=self.out_dir / "redis", keep_snapshot=True)
        self.redis.start()
        print(f"run_load: redis-server on {self.redis.url}", flush=True)
        started = time.monotonic()
        load = subprocess.run(
            [sys.executable, "-m", "t2diff_cli.main", "sessions", "load", "--data",
             str(self.data), "--redis-url", self.redis.url, "--format", self.data_format],
            cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
            env={**os.environ, **self.service_env},
        )  # fmt: skip
        if load.returncode != 0:
            raise RuntimeError(f"t2diff sessions load failed: {load.stderr[-2000:]}")
        print(f"run_load: {load.stdout.strip()} ({time.monotonic() - started:.1f}s)", flush=True)
        self.sessions_loaded = self._write_users()
        self._write_items()
        self.redis.snapshot()

        self.env = {
            **SERVICE_DEFAULTS,
            **self.service_env,
            "T2DIFF_ARTIFACTS_DIR": str(self.artifacts.resolve()),
            "T2DIFF_INDEX_DIR": str(self.index.resolve()),
            "T2DIFF_REDIS_URL": self.redis.url,
            "T2DIFF_HOST": "127.0.0.1",
            "T2DIFF_PORT": str(self.port),
        }
        log = (self.out_dir / "service.log").open("ab")
        self.service = subprocess.Popen(
            [sys.executable, "-m", "t2diff_cli.main", "serve"],
            cwd=ROOT,
            env={**os.environ, **self.env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self._wait_ready()
        print(f"run_load: service ready at {self.base} (pid {self.service.pid})", flush=True)

    def _wait_ready(self) -> None:
        assert self.service is not None
        try:
            wait_until_ready(self.base, self.ready_timeout_s, self.service, poll_s=0.25)
        except ServiceNotReady as exc:
            if exc.returncode is None:
                raise  # not ready in time (a RuntimeError, like every stack failure)
            log_tail = file_tail(self.out_dir / "service.log", 3000)
            raise RuntimeError(f"t2diff serve exited with {exc.returncode}: {log_tail}") from None

    def _write_users(self) -> int:
        """The loaded user ids, longest session first (ties in a seeded shuffle), so that a
        Zipf draw over ranks makes the most active users the most frequent callers."""
        import random

        import redis

        assert self.redis is not None
        prefix = self.service_env.get("T2DIFF_REDIS_PREFIX", "t2diff") + ":session:"
        client = redis.Redis.from_url(self.redis.url, socket_timeout=30)
        try:
            keys = [k.decode() for k in client.scan_iter(match=prefix + "*", count=5000)]
            pipe = client.pipeline(transaction=False)
            for key in keys:
                pipe.llen(key)
            lengths = pipe.execute()
        finally:
            client.close()
        if not keys:
            raise RuntimeError("no sessions were loaded into Redis")
        users = [key[len(prefix) :] for key in keys]
        order = list(range(len(users)))
        random.Random(0).shuffle(order)
        order.sort(key=lambda i: -lengths[i])  # stable: ties keep the shuffled order
        self.users_file.write_text("\n".join(users[i] for i in order) + "\n", encoding="utf-8")
        return len(users)

    def _write_items(self) -> None:
        import json

        ids = json.loads((self.artifacts / "item_ids.json").read_text(encoding="utf-8"))
        self.items_file.write_text("\n".join(str(i) for i in ids) + "\n", encoding="utf-8")

    def warm_up(self, requests: int) -> None:
        """A few sequential recalls (first ORT runs allocate), not measured."""
        import json
        import urllib.request

        users = self.users_file.read_text(encoding="utf-8").split()
        for n in range(requests):
            body = json.dumps({"user_id": users[n % len(users)], "k": 100}).encode()
            request = urllib.request.Request(
                f"{self.base}/recall", body, {"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
                response.read()

    def close(self) -> None:
        if self.service is not None:
            stop_process(self.service, timeout_s=20, kill_group=True)
            self.service = None
        if self.redis is not None:
            self.redis.stop()
            self.redis = None


class RedisOutage(threading.Thread):
    """Stops Redis ``at_s`` seconds after :meth:`start` for ``duration_s`` seconds: ``kill``
    (SIGKILL, then a new redis-server on the same port, which loads the snapshot) or
    ``stop`` (SIGSTOP/SIGCONT: connections hang instead of being refused).  Records the
    unix times ``down_at`` and ``up_at`` (Redis answers PING again)."""

    def __init__(self, redis: RedisServer, at_s: float, duration_s: float, mode: str) -> None:
        super().__init__(name="redis-outage", daemon=True)
        if mode not in ("kill", "stop"):
            raise ValueError(f"outage mode must be kill or stop, not {mode!r}")
        self.redis, self.at_s, self.duration_s, self.mode = redis, at_s, duration_s, mode
        self.cancelled = threading.Event()
        self.down_at = math.nan
        self.restart_at = math.nan
        self.up_at = math.nan
        self.error: str | None = None

    def run(self) -> None:
        try:
            if self.cancelled.wait(self.at_s):
                return
            self.redis.kill() if self.mode == "kill" else self.redis.pause()
            self.down_at = time.time()  # after the signal: Redis is surely down from here
            print(f"run_load: Redis down ({self.mode}) for {self.duration_s:g} s", flush=True)
            self.cancelled.wait(self.duration_s)  # restore even when cancelled
            self.restart_at = time.time()  # before the restart: surely down until here
            if self.mode == "kill":
                self.redis.start()
            else:
                self.redis.resume()
                deadline = time.monotonic() + 10
                while not self.redis.ping() and time.monotonic() < deadline:
                    time.sleep(0.005)
            self.up_at = time.time()
            print(
                f"run_load: Redis back after {self.up_at - self.down_at:.2f} s "
                f"(restart took {self.up_at - self.restart_at:.3f} s)",
                flush=True,
            )
        except Exception as exc:  # noqa: BLE001 - reported in the results
            self.error = f"{type(exc).__name__}: {exc}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Headless locust run against the recall service, with plot and SLO check.",
    )
    target = parser.add_argument_group("target (one of)")
    target.add_argument("--host", default=None, help="base URL, e.g. http://127.0.0.1:8000")
    target.add_argument(
        "--start-local",
        action="store_true",
        help="start redis-server + sessions from --data + `t2diff serve` here, stop them after",
    )
    local = parser.add_argument_group("--start-local")
    local.add_argument("--data", type=Path, default=None, help="sessions: interactions file/dir")
    local.add_argument("--data-format", default="auto", help="as `t2diff sessions load --format`")
    local.add_argument(
        "--artifacts", type=Path, default=Path("artifacts/current"), help="model export"
    )
    local.add_argument("--index", type=Path, default=Path("indexes/current"), help="its index")
    local.add_argument(
        "--service-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra env for the service (repeatable), e.g. T2DIFF_MAX_BATCH=16",
    )
    local.add_argument("--warmup", type=int, default=20, help="unmeasured recalls first")
    local.add_argument("--redis-outage-at", type=float, default=None, help="s into each step")
    local.add_argument("--redis-outage-s", type=float, default=10.0, help="outage length (s)")
    local.add_argument(
        "--redis-outage-mode",
        choices=("kill", "stop"),
        default="kill",
        help="kill + restart on the same port (default), or SIGSTOP/SIGCONT",
    )
    local.add_argument(
        "--outage-grace-ms",
        type=float,
        default=100.0,
        help="recalls sent this close before Redis resumes do not count as during the outage "
        "(default 100: the service's 50 ms Redis timeout and its one retry)",
    )
    local.add_argument("--max-load", type=float, default=None, help="wait while loadavg1 > this")
    local.add_argument("--max-load-wait-s", type=float, default=600.0)

    rate = parser.add_argument_group("rate")
    rate.add_argument(
        "--rates",
        default=None,
        help="offered rates (req/s), comma-separated: one locust run (step) each, e.g. 10,20,40",
    )
    rate.add_argument("--stop-on-miss", action="store_true", help="no more steps after a miss")
    rate.add_argument("--pause-s", type=float, default=0.0, help="idle time between steps")
    rate.add_argument("--users", type=int, default=20, help="simulated users (default 20)")
    rate.add_argument("--spawn-rate", type=float, default=None, help="users/s (default: all in 1s)")
    rate.add_argument("--run-time", default="1m", help="per step: 30s, 2m, 1h (default 1m)")
    rate.add_argument(
        "--user-rps", type=float, default=1.0, help="tasks/s per user (with --rates: the most)"
    )
    rate.add_argument(
        "--user-ids", default=None, help="T2DIFF_LOADTEST_USERS: a range u0..uN or a file"
    )
    rate.add_argument("--budget-ms", type=float, default=None, help="budget_ms sent in recalls")
    parser.add_argument("--out-dir", type=Path, default=None, help="default loadtest/out/<time>")
    parser.add_argument("--csv-prefix", type=Path, default=None, help="default OUT/locust")
    parser.add_argument("--html", type=Path, default=None, help="default OUT/report.html")
    parser.add_argument("--plot", type=Path, default=None, help="default OUT/latency.png")
    slo = parser.add_argument_group("SLO")
    slo.add_argument("--endpoint", default=AGGREGATED, help="stats row the SLO applies to")
    slo.add_argument("--p99-ms", type=float, default=None, help="SLO: p99 latency bound")
    slo.add_argument("--max-error-rate", type=float, default=None, help="SLO: e.g. 0.01")
    slo.add_argument(
        "--max-degraded-rate",
        type=float,
        default=None,
        help="SLO: share of recalls answered degraded (from the response log), e.g. 0",
    )
    parser.add_argument("--results-csv", type=Path, default=None, help="append a results row")
    parser.add_argument("--machine", default=socket.gethostname(), help="results CSV column")
    parser.add_argument("--model", default=os.environ.get("T2DIFF_MODEL", "t2diff"))
    parser.add_argument("--locustfile", type=Path, default=LOCUSTFILE)
    return parser


@dataclass
class Step:
    """One locust run at one offered rate."""

    rate_rps: float
    users: int
    user_rps: float
    out_dir: Path
    csv_prefix: Path
    html: Path
    plot: Path


def plan_steps(args: argparse.Namespace, out_dir: Path) -> list[Step]:
    if args.rates is None:
        return [
            Step(
                args.users * args.user_rps,
                args.users,
                args.user_rps,
                out_dir,
                args.csv_prefix or out_dir / "locust",
                args.html or out_dir / "report.html",
                args.plot or out_dir / "latency.png",
            )
        ]
    steps = []
    rates = parse_rates(args.rates)
    for rate in rates:
        users, user_rps = users_for_rate(rate, args.user_rps)
        step_dir = out_dir if len(rates) == 1 else out_dir / f"rate-{rate:g}"
        steps.append(
            Step(
                rate,
                users,
                user_rps,
                step_dir,
                step_dir / "locust",
                step_dir / "report.html",
                step_dir / "latency.png",
            )
        )
    return steps


def _parse_env(pairs: Sequence[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--service-env expects KEY=VALUE, not {pair!r}")
        env[key] = value
    return env


def _run_locust(command: list[str], env: dict[str, str], timeout_s: float) -> int:
    """Run locust; on Ctrl-C/SIGTERM let it stop (SIGINT: it still writes its report)."""
    process = subprocess.Popen(command, env=env)
    try:
        return process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise
    except BaseException:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        raise


def run_step(
    args: argparse.Namespace,
    step: Step,
    host: str,
    duration_s: float,
    stack: LocalStack | None,
) -> tuple[int, dict[str, object]]:
    """One locust run: returns (0 ok / 1 missed / 2 failed, its summary)."""
    step.out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, object] = {
        "rate_rps": step.rate_rps,
        "users": step.users,
        "user_rps": round(step.user_rps, 6),
        "run_time": args.run_time,
    }
    summary["before"] = (
        wait_for_quiet(args.max_load, args.max_load_wait_s)
        if stack is not None
        else {"loadavg": loadavg()}
    )
    response_log = step.out_dir / "responses.csv"
    extra = {"T2DIFF_LOADTEST_RESPONSE_LOG": str(response_log)}
    user_ids = args.user_ids
    if stack is not None:
        user_ids = user_ids or str(stack.users_file)
        extra["T2DIFF_LOADTEST_ITEMS"] = str(stack.items_file)
        if not args.user_ids:
            extra["T2DIFF_LOADTEST_RANKED"] = "1"
    if args.budget_ms is not None:
        extra["T2DIFF_LOADTEST_BUDGET_MS"] = f"{args.budget_ms:g}"
    env = locust_env(dict(os.environ), step.user_rps, user_ids, extra)
    spawn_rate = args.spawn_rate or float(step.users)
    command = locust_command(
        host, step.users, spawn_rate, args.run_time, step.csv_prefix, step.html, args.locustfile
    )
    print(f"run_load: step {step.rate_rps:g} rps: " + " ".join(command), flush=True)

    metrics_before: dict[MetricKey, float] = {}
    if stack is not None:
        metrics_before = parse_prometheus(scrape(f"{host}/metrics"))
    outage: RedisOutage | None = None
    if stack is not None and args.redis_outage_at is not None:
        assert stack.redis is not None
        outage = RedisOutage(
            stack.redis, args.redis_outage_at, args.redis_outage_s, args.redis_outage_mode
        )
    cpu_before = cpu_snapshot()
    if outage is not None:
        outage.start()
    try:
        returncode = _run_locust(command, env, duration_s + 120)
    except subprocess.TimeoutExpired:
        print("run_load: locust did not finish in time", file=sys.stderr)
        return 2, summary
    finally:
        if outage is not None:
            outage.cancelled.set()
            outage.join(timeout=args.redis_outage_s + 30)
    summary["others_cores"] = round(others_cores(cpu_before, cpu_snapshot()), 3)
    summary["after"] = {"loadavg": loadavg()}

    stats_csv = Path(f"{step.csv_prefix}_stats.csv")
    if returncode != 0 or not stats_csv.exists():
        print(
            f"run_load: locust exited {returncode}; stats file {stats_csv} "
            f"{'exists' if stats_csv.exists() else 'missing'}",
            file=sys.stderr,
        )
        return 2, summary
    rows = read_stats_rows(stats_csv)
    try:
        stats = read_stats(stats_csv, args.endpoint)
    except ValueError as exc:
        print(f"run_load: {exc}", file=sys.stderr)
        return 2, summary
    history = read_history(Path(f"{step.csv_prefix}_stats_history.csv"))
    title = f"{args.model} on {args.machine}: {step.rate_rps:g} rps offered, {args.run_time}"
    plot_latency(rows, history, step.plot, title)
    summary["stats"] = {
        row.label: {
            "requests": row.requests,
            "failures": row.failures,
            "rps": round(row.rps, 2),
            "p50_ms": row.p50_ms,
            "p95_ms": row.p95_ms,
            "p99_ms": row.p99_ms,
            "max_ms": row.percentile(1.0),
        }
        for row in rows
    }
    responses = read_response_log(response_log)
    summary["responses"] = summarize_responses(responses)
    if stack is not None:
        try:
            text = scrape(f"{host}/metrics")
            (step.out_dir / "metrics.txt").write_text(text, encoding="utf-8")
            after = parse_prometheus(text)
            summary["metrics"] = {
                "stage_ms": histogram_summary(
                    metrics_before, after, "t2diff_stage_latency_seconds", "stage"
                ),
                "request_ms": histogram_summary(
                    metrics_before, after, "t2diff_request_latency_seconds", "endpoint"
                ),
                "batch_size": histogram_summary(
                    metrics_before, after, "t2diff_batch_size", None, scale=1.0
                ).get("all", {}),
                # Rows of the split tower found in the xhat cache (hit) or computed (miss).
                "xhat_cache": {
                    result: after.get(key, 0.0) - metrics_before.get(key, 0.0)
                    for result in ("hit", "miss")
                    for key in [("t2diff_xhat_cache_total", (("result", result),))]
                },
                # The startup warm (service/xhat_warm.py): what it computed, how long it
                # took (gauges of the last warm), and the background recompute after writes.
                "xhat_warm": {
                    "sessions": after.get(("t2diff_xhat_warm_sessions", ()), 0.0),
                    "seconds": round(after.get(("t2diff_xhat_warm_seconds", ()), 0.0), 2),
                    "outcomes": {
                        "/".join(v for _, v in labels): value
                        for (name, labels), value in after.items()
                        if name == "t2diff_xhat_warm_total" and value
                    },
                },
                "xhat_recompute": {
                    result: after.get(key, 0.0) - metrics_before.get(key, 0.0)
                    for result in ("computed", "unchanged", "dropped", "failed", "skipped")
                    for key in [("t2diff_xhat_recompute_total", (("result", result),))]
                },
            }
        except OSError as exc:
            summary["metrics"] = {"error": str(exc)}
        summary["service_env"] = {
            k: v for k, v in stack.env.items() if k.startswith(("T2DIFF_", "OMP_"))
        }
    print(format_summary(stats, step.rate_rps, duration_s))
    resp = summary["responses"]
    assert isinstance(resp, dict)
    print(
        f"run_load: degraded {resp['degraded']}/{resp['recalls_answered']} "
        f"{resp['degraded_reasons']}; 5xx {resp['errors_5xx']}; "
        f"loadavg before {summary['before'].get('loadavg')}, "  # type: ignore[union-attr]
        f"other processes {summary['others_cores']} cores"
    )
    if "metrics" in summary and "stage_ms" in summary["metrics"]:  # type: ignore[operator]
        stages = summary["metrics"]["stage_ms"]  # type: ignore[index]
        print(
            "run_load: stage mean/p99 ms (from /metrics): "
            + ", ".join(f"{k} {v['mean']:.2f}/{v['p99']:.2f}" for k, v in stages.items())
        )
        cache = summary["metrics"]["xhat_cache"]  # type: ignore[index]
        if cache["hit"] + cache["miss"] > 0:
            print(
                f"run_load: xhat cache {cache['hit']:.0f} hits, {cache['miss']:.0f} misses "
                f"(hit rate {cache['hit'] / (cache['hit'] + cache['miss']):.3f})"
            )
        warm = summary["metrics"]["xhat_warm"]  # type: ignore[index]
        recompute = summary["metrics"]["xhat_recompute"]  # type: ignore[index]
        print(
            f"run_load: xhat warm {warm['outcomes']} {warm['sessions']:.0f} sessions in "
            f"{warm['seconds']:.1f}s; background recompute {recompute}"
        )
    print(f"run_load: report {step.html}, plot {step.plot}, stats {stats_csv}")
    if args.results_csv:
        append_result(
            args.results_csv,
            result_row(stats, args.machine, args.model, step.rate_rps, duration_s),
        )
        print(f"run_load: appended to {args.results_csv}")

    status = 0
    result = check_slo(stats, args.p99_ms, args.max_error_rate)
    messages = list(result.messages)
    if args.max_degraded_rate is not None:
        share = float(resp["degraded_share"])  # type: ignore[arg-type]
        if share > args.max_degraded_rate:
            messages.append(
                f"degraded share {share:.2%} > {args.max_degraded_rate:.2%} "
                f"({resp['degraded_reasons']})"
            )
    summary["slo_messages"] = messages
    if messages:
        print("run_load: SLO MISSED: " + "; ".join(messages), file=sys.stderr)
        status = 1
    elif any(x is not None for x in (args.p99_ms, args.max_error_rate, args.max_degraded_rate)):
        print("run_load: SLO met")

    if outage is not None:
        if outage.error or math.isnan(outage.up_at):
            print(f"run_load: outage did not complete: {outage.error}", file=sys.stderr)
            summary["outage"] = {"error": outage.error or "Redis was not back before the end"}
            return 2, summary
        budget = args.budget_ms or float(stack.env.get("T2DIFF_BUDGET_MS", 200))  # type: ignore[union-attr]
        report = outage_report(
            responses,
            outage.down_at,
            outage.up_at,
            OutageTargets(budget_ms=budget),
            restart_at=outage.restart_at,
            grace_s=args.outage_grace_ms / 1000,
        )
        report.update(
            mode=outage.mode,
            at_s=outage.at_s,
            restart_s=round(outage.up_at - outage.restart_at, 3),
        )
        summary["outage"] = report
        plot_outage(
            responses,
            outage.down_at,
            outage.up_at,
            step.out_dir / "outage.png",
            f"{args.model}: Redis {outage.mode} for {outage.duration_s:g} s at "
            f"{step.rate_rps:g} rps",
        )
        print(
            f"run_load: outage {report['outage_s']} s ({outage.mode}): recall 5xx "
            f"{report['recall_5xx']}, events 5xx {report['events_5xx']}; during: "
            f"{report['during_degraded']}/{report['during']} degraded "
            f"{report['during_reasons']}; max latency {report['max_latency_ms']} ms "
            f"(server {report['max_server_latency_ms']} ms, bound {report['bound_ms']:g}); "
            f"recovery {report['recovery_s']} s (first full {report['first_full_after_s']} s)"
        )
        if report["ok"]:
            print("run_load: outage targets met")
        else:
            failed = [k for k, v in report["checks"].items() if not v]  # type: ignore[union-attr]
            print(f"run_load: OUTAGE TARGETS MISSED: {failed}", file=sys.stderr)
            status = 1
    return status, summary


def main(argv: Sequence[str] | None = None) -> int:
    import json

    args = build_parser().parse_args(argv)
    if (args.host is None) == (not args.start_local):
        print("run_load: give exactly one of --host URL and --start-local", file=sys.stderr)
        return 2
    if args.host is not None and not re.match(r"^https?://", args.host):
        print(f"run_load: --host must be an http(s) URL, not {args.host!r}", file=sys.stderr)
        return 2
    try:
        duration_s = parse_duration(args.run_time)
        service_env = _parse_env(args.service_env)
        out_dir = args.out_dir or HERE / "out" / time.strftime("%Y%m%dT%H%M%S")
        steps = plan_steps(args, out_dir)
    except ValueError as exc:
        print(f"run_load: {exc}", file=sys.stderr)
        return 2
    if args.start_local:
        if args.data is None:
            print("run_load: --start-local needs --data (sessions to load)", file=sys.stderr)
            return 2
        if args.redis_outage_at is not None and (
            args.redis_outage_at + args.redis_outage_s + 2 >= duration_s
        ):
            print("run_load: the outage must end 2 s before the run does", file=sys.stderr)
            return 2
    elif args.redis_outage_at is not None:
        print("run_load: --redis-outage-at needs --start-local", file=sys.stderr)
        return 2
    out_dir.mkdir(parents=True, exist_ok=True)

    # SIGTERM unwinds like Ctrl-C, so the stack below is always stopped.
    def _terminate(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, _terminate)
    results: list[dict[str, object]] = []
    status = 0
    try:
        stack: LocalStack | None = None
        if args.start_local:
            stack = LocalStack(
                args.data, args.artifacts, args.index, out_dir, service_env,
                data_format=args.data_format,
            )  # fmt: skip
            stack.__enter__()
        try:
            host = stack.base if stack is not None else args.host
            if stack is not None and args.warmup > 0:
                stack.warm_up(args.warmup)
            for n, step in enumerate(steps):
                if n and args.pause_s > 0:
                    time.sleep(args.pause_s)
                code, summary = run_step(args, step, host, duration_s, stack)
                summary["status"] = code
                results.append(summary)
                status = max(status, code)
                if code == 2 or (code == 1 and args.stop_on_miss):
                    break
        finally:
            if stack is not None:
                stack.close()
    except KeyboardInterrupt:
        print("run_load: interrupted; stack stopped", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"run_load: {exc}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
        if results:
            (out_dir / "summary.json").write_text(
                json.dumps({"machine": args.machine, "model": args.model, "steps": results},
                           indent=1, default=str),
                encoding="utf-8",
            )  # fmt: skip
    if len(results) > 1:
        met = [r["rate_rps"] for r in results if r["status"] == 0]
        print(
            f"run_load: steps {[r['rate_rps'] for r in results]}: SLO met at {met}; highest "
            f"{max(met) if met else 'none'}"  # type: ignore[type-var]
        )
    print(f"run_load: summary {out_dir / 'summary.json'}")
    return status


if __name__ == "__main__":
    sys.exit(main())
