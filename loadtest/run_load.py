"""Run a headless locust load test against a recall service, plot it and check an SLO.

    python loadtest/run_load.py --host http://127.0.0.1:8000 --users 50 --spawn-rate 10 \\
        --run-time 1m --user-rps 2 --p99-ms 50 --max-error-rate 0.01 \\
        --results-csv docs/results/load.csv --machine "$(hostname)" --model t2diff

Runs ``locust --headless -f loadtest/locustfile.py ...`` as a subprocess, reads its
``PREFIX_stats.csv`` (and ``PREFIX_stats_history.csv`` for the plot), writes a latency plot
PNG next to the HTML report, prints one summary line and exits:

* 0 when the SLO holds (or none was asked for),
* 1 when it is missed (the reason is printed),
* 2 when locust failed or left no statistics.

The offered rate is ``users x user-rps`` (the locustfile paces each user with
``constant_throughput``); ``rate_rps`` in the results CSV is that offered rate, and the
summary line also shows the achieved one.  Only the standard library is needed to import
this module (matplotlib is imported when plotting), so its pure functions are testable
without locust.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
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


def plot_latency(
    rows: Sequence[Stats], history: Sequence[dict[str, float]], out_png: Path, title: str
) -> Path:
    """Latency-percentile curves per endpoint (left) and p50/p95/p99 over time (right)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 4.8))
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
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    return out_png


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Headless locust run against the recall service, with plot and SLO check.",
    )
    parser.add_argument("--host", required=True, help="base URL, e.g. http://127.0.0.1:8000")
    # The lead wires --start-local (start a local service for the run) separately.
    parser.add_argument("--users", type=int, default=20, help="simulated users (default 20)")
    parser.add_argument("--spawn-rate", type=float, default=10.0, help="users started per s")
    parser.add_argument("--run-time", default="1m", help="e.g. 30s, 2m, 1h (default 1m)")
    parser.add_argument(
        "--user-rps", type=float, default=1.0, help="tasks per second per user (default 1)"
    )
    parser.add_argument(
        "--user-ids", default=None, help="T2DIFF_LOADTEST_USERS: a range u0..uN or a file"
    )
    parser.add_argument("--out-dir", type=Path, default=None, help="default loadtest/out/<time>")
    parser.add_argument("--csv-prefix", type=Path, default=None, help="default OUT/locust")
    parser.add_argument("--html", type=Path, default=None, help="default OUT/report.html")
    parser.add_argument("--plot", type=Path, default=None, help="default OUT/latency.png")
    parser.add_argument("--endpoint", default=AGGREGATED, help="stats row the SLO applies to")
    parser.add_argument("--p99-ms", type=float, default=None, help="SLO: p99 latency bound")
    parser.add_argument("--max-error-rate", type=float, default=None, help="SLO: e.g. 0.01")
    parser.add_argument("--results-csv", type=Path, default=None, help="append a results row")
    parser.add_argument("--machine", default=socket.gethostname(), help="results CSV column")
    parser.add_argument("--model", default=os.environ.get("T2DIFF_MODEL", "t2diff"))
    parser.add_argument("--locustfile", type=Path, default=LOCUSTFILE)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not re.match(r"^https?://", args.host):
        print(f"run_load: --host must be an http(s) URL, not {args.host!r}", file=sys.stderr)
        return 2
    try:
        duration_s = parse_duration(args.run_time)
    except ValueError as exc:
        print(f"run_load: {exc}", file=sys.stderr)
        return 2
    out_dir = args.out_dir or HERE / "out" / time.strftime("%Y%m%dT%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_prefix = args.csv_prefix or out_dir / "locust"
    html = args.html or out_dir / "report.html"
    plot = args.plot or out_dir / "latency.png"
    offered_rps = args.users * args.user_rps

    env = dict(os.environ, T2DIFF_LOADTEST_USER_RPS=f"{args.user_rps:g}")
    if args.user_ids:
        env["T2DIFF_LOADTEST_USERS"] = args.user_ids
    command = locust_command(
        args.host, args.users, args.spawn_rate, args.run_time, csv_prefix, html, args.locustfile
    )
    print("run_load: " + " ".join(command), flush=True)
    try:
        completed = subprocess.run(command, env=env, timeout=duration_s + 120, check=False)
    except subprocess.TimeoutExpired:
        print("run_load: locust did not finish in time", file=sys.stderr)
        return 2
    stats_csv = Path(f"{csv_prefix}_stats.csv")
    if completed.returncode != 0 or not stats_csv.exists():
        print(
            f"run_load: locust exited {completed.returncode}; stats file {stats_csv} "
            f"{'exists' if stats_csv.exists() else 'missing'}",
            file=sys.stderr,
        )
        return 2

    rows = read_stats_rows(stats_csv)
    try:
        stats = read_stats(stats_csv, args.endpoint)
    except ValueError as exc:
        print(f"run_load: {exc}", file=sys.stderr)
        return 2
    history = read_history(Path(f"{csv_prefix}_stats_history.csv"))
    title = f"{args.model} on {args.machine}: {offered_rps:g} rps offered, {args.run_time}"
    plot_latency(rows, history, plot, title)
    print(format_summary(stats, offered_rps, duration_s))
    print(f"run_load: report {html}, plot {plot}, stats {stats_csv}")
    if args.results_csv:
        append_result(
            args.results_csv, result_row(stats, args.machine, args.model, offered_rps, duration_s)
        )
        print(f"run_load: appended to {args.results_csv}")

    result = check_slo(stats, args.p99_ms, args.max_error_rate)
    if not result.ok:
        print("run_load: SLO MISSED: " + "; ".join(result.messages), file=sys.stderr)
        return 1
    if args.p99_ms is not None or args.max_error_rate is not None:
        print("run_load: SLO met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
