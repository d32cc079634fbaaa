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
achieved one.

This file is the command line and the walk of one step; the parts live beside it, one per
concern: ``steps.py`` (rates, durations, the locust command), ``stack.py`` (the local
stack and the Redis outage), ``report.py`` (locust's statistics, the SLO, the results CSV,
the latency plot), ``responses.py`` (the response log, the outage targets),
``metrics.py`` (``/metrics`` through ``prometheus_client``'s parser) and ``hostload.py``
(load average, CPU of other processes).  Only the standard library is needed to import
them (matplotlib, redis-py and prometheus_client are imported where used), so their pure
functions are testable without locust.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:  # run as a script: the loadtest modules import from ROOT
    sys.path.append(str(ROOT))

# The runner's parts, one module per concern (run as a script, loadtest/ is a namespace
# package under ROOT).
from loadtest.hostload import cpu_snapshot, loadavg, others_cores, wait_for_quiet  # noqa: E402
from loadtest.metrics import (  # noqa: E402
    MetricKey,
    metrics_lines,
    parse_prometheus,
    scrape,
    step_metrics,
)
from loadtest.report import (  # noqa: E402
    AGGREGATED,
    Stats,
    append_result,
    check_slo,
    format_summary,
    plot_latency,
    read_history,
    read_stats,
    read_stats_rows,
    result_row,
)
from loadtest.responses import (  # noqa: E402
    OutageTargets,
    Response,
    outage_report,
    plot_outage,
    read_response_log,
    summarize_responses,
)
from loadtest.stack import LocalStack, RedisOutage  # noqa: E402
from loadtest.steps import (  # noqa: E402
    LOCUSTFILE,
    Step,
    locust_command,
    locust_env,
    parse_duration,
    plan_steps,
    run_locust,
)


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


def _parse_env(pairs: Sequence[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--service-env expects KEY=VALUE, not {pair!r}")
        env[key] = value
    return env


def _step_env(
    args: argparse.Namespace, step: Step, stack: LocalStack | None
) -> tuple[dict[str, str], Path]:
    """The locustfile's settings for one step (pace, ids, response log) and its log path."""
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
    return locust_env(dict(os.environ), step.user_rps, user_ids, extra), response_log


def _drive_locust(
    args: argparse.Namespace,
    command: list[str],
    env: dict[str, str],
    duration_s: float,
    stack: LocalStack | None,
    summary: dict[str, object],
) -> tuple[int | None, RedisOutage | None]:
    """Run locust (with the Redis outage beside it, if asked), recording the CPU used by
    other processes meanwhile.  The return code is None when locust did not finish."""
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
        returncode: int | None = run_locust(command, env, duration_s + 120)
    except subprocess.TimeoutExpired:
        print("run_load: locust did not finish in time", file=sys.stderr)
        returncode = None
    finally:
        if outage is not None:
            outage.cancelled.set()
            outage.join(timeout=args.redis_outage_s + 30)
    if returncode is not None:  # a locust that timed out leaves the summary as it was
        summary["others_cores"] = round(others_cores(cpu_before, cpu_snapshot()), 3)
        summary["after"] = {"loadavg": loadavg()}
    return returncode, outage


def _read_locust_stats(
    args: argparse.Namespace, step: Step, returncode: int, summary: dict[str, object]
) -> Stats | None:
    """Locust's statistics of the step: the SLO row (None when missing: exit 2), every
    row into the summary, and the latency plot."""
    stats_csv = Path(f"{step.csv_prefix}_stats.csv")
    if returncode != 0 or not stats_csv.exists():
        print(
            f"run_load: locust exited {returncode}; stats file {stats_csv} "
            f"{'exists' if stats_csv.exists() else 'missing'}",
            file=sys.stderr,
        )
        return None
    rows = read_stats_rows(stats_csv)
    try:
        stats = read_stats(stats_csv, args.endpoint)
    except ValueError as exc:
        print(f"run_load: {exc}", file=sys.stderr)
        return None
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
    return stats


def _record_service(
    step: Step,
    host: str,
    stack: LocalStack,
    metrics_before: dict[MetricKey, float],
    summary: dict[str, object],
) -> None:
    """The local service's view of the step: a /metrics scrape kept beside the step's
    files, its figures against the scrape before, and the service's settings."""
    try:
        text = scrape(f"{host}/metrics")
        (step.out_dir / "metrics.txt").write_text(text, encoding="utf-8")
        summary["metrics"] = step_metrics(metrics_before, parse_prometheus(text))
    except OSError as exc:
        summary["metrics"] = {"error": str(exc)}
    summary["service_env"] = {
        k: v for k, v in stack.env.items() if k.startswith(("T2DIFF_", "OMP_"))
    }


def _print_step(
    step: Step, stats: Stats, duration_s: float, summary: dict[str, object], stats_csv: Path
) -> None:
    """The step's console summary: locust's figures, degraded answers, load, /metrics."""
    print(format_summary(stats, step.rate_rps, duration_s))
    resp: dict[str, object] = summary["responses"]  # type: ignore[assignment]
    before: dict[str, object] = summary["before"]  # type: ignore[assignment]
    print(
        f"run_load: degraded {resp['degraded']}/{resp['recalls_answered']} "
        f"{resp['degraded_reasons']}; 5xx {resp['errors_5xx']}; "
        f"loadavg before {before.get('loadavg')}, "
        f"other processes {summary['others_cores']} cores"
    )
    for line in metrics_lines(summary.get("metrics", {})):  # type: ignore[arg-type]
        print(line)
    print(f"run_load: report {step.html}, plot {step.plot}, stats {stats_csv}")


def _check_slo(args: argparse.Namespace, stats: Stats, summary: dict[str, object]) -> int:
    """1 when the step missed the SLO (latency, errors, degraded share), else 0."""
    resp: dict[str, object] = summary["responses"]  # type: ignore[assignment]
    messages = list(check_slo(stats, args.p99_ms, args.max_error_rate).messages)
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
        return 1
    if any(x is not None for x in (args.p99_ms, args.max_error_rate, args.max_degraded_rate)):
        print("run_load: SLO met")
    return 0


def _check_outage(
    args: argparse.Namespace,
    step: Step,
    outage: RedisOutage,
    stack: LocalStack,
    responses: list[Response],
    summary: dict[str, object],
) -> int:
    """Issue #6's outage targets: 2 when the outage did not complete, 1 when a target was
    missed, else 0; the report goes into the summary and ``outage.png``."""
    if outage.error or math.isnan(outage.up_at):
        print(f"run_load: outage did not complete: {outage.error}", file=sys.stderr)
        summary["outage"] = {"error": outage.error or "Redis was not back before the end"}
        return 2
    budget = args.budget_ms or float(stack.env.get("T2DIFF_BUDGET_MS", 200))
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
        f"{args.model}: Redis {outage.mode} for {outage.duration_s:g} s at {step.rate_rps:g} rps",
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
        return 0
    failed = [k for k, v in report["checks"].items() if not v]  # type: ignore[attr-defined]
    print(f"run_load: OUTAGE TARGETS MISSED: {failed}", file=sys.stderr)
    return 1


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
    env, response_log = _step_env(args, step, stack)
    spawn_rate = args.spawn_rate or float(step.users)
    command = locust_command(
        host, step.users, spawn_rate, args.run_time, step.csv_prefix, step.html, args.locustfile
    )
    print(f"run_load: step {step.rate_rps:g} rps: " + " ".join(command), flush=True)
    metrics_before = parse_prometheus(scrape(f"{host}/metrics")) if stack is not None else {}

    returncode, outage = _drive_locust(args, command, env, duration_s, stack, summary)
    if returncode is None:
        return 2, summary
    stats = _read_locust_stats(args, step, returncode, summary)
    if stats is None:
        return 2, summary
    responses = read_response_log(response_log)
    summary["responses"] = summarize_responses(responses)
    if stack is not None:
        _record_service(step, host, stack, metrics_before, summary)
    _print_step(step, stats, duration_s, summary, Path(f"{step.csv_prefix}_stats.csv"))
    if args.results_csv:
        append_result(
            args.results_csv,
            result_row(stats, args.machine, args.model, step.rate_rps, duration_s),
        )
        print(f"run_load: appended to {args.results_csv}")

    status = _check_slo(args, stats, summary)
    if outage is not None:
        assert stack is not None  # an outage is only planned on a local stack
        outage_status = _check_outage(args, step, outage, stack, responses, summary)
        if outage_status == 2:
            return 2, summary
        status = max(status, outage_status)
    return status, summary


def main(argv: Sequence[str] | None = None) -> int:

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
