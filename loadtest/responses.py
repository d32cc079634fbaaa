"""The locustfile's response log read back: degraded answers, 5xx, per-stage cost, and the
Redis-outage targets of issue #6 with their plot."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from loadtest.report import new_figure, parse_float, parse_int, save_png

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
                    status=parse_int(row["status"]),
                    degraded=None if degraded == "" else degraded == "1",
                    reason=row.get("reason") or "",
                    server_ms=parse_float(row.get("server_ms")),
                    stages_ms={
                        stage: parse_float(row.get(f"{stage}_ms"))
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
    fig = new_figure((11, 4.5))
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
    return save_png(fig, out_png)
