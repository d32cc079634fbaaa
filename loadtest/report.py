"""Locust's statistics read back, the SLO check, the results CSV and the latency plot.

Only the standard library is needed to import it (matplotlib is imported where a plot is
drawn), so the tests call these functions without locust.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # matplotlib is imported where a plot is drawn
    from matplotlib.figure import Figure

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


def parse_float(value: str | None) -> float:
    """Locust writes ``N/A`` (or nothing) where it has no sample."""
    try:
        return float(value) if value not in (None, "", "N/A") else math.nan
    except ValueError:
        return math.nan


def parse_int(value: str | None) -> int:
    number = parse_float(value)
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
                requests=parse_int(row["Request Count"]),
                failures=parse_int(row["Failure Count"]),
                rps=parse_float(row.get("Requests/s")),
                percentiles_ms={q: parse_float(row.get(col)) for q, col in PERCENTILES},
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
    return [{key: parse_float(row.get(key)) for key in keys} for row in rows]


# --------------------------------------------------------------------------- plot

_TICKS = {0.5, 0.9, 0.95, 0.99, 0.999, 0.9999, 1.0}


def new_figure(figsize: tuple[float, float]) -> Figure:
    """A matplotlib figure drawn off-screen (Agg: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def save_png(fig: Figure, out_png: Path) -> Path:
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
    fig = new_figure((13, 4.8))
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
    return save_png(fig, out_png)
