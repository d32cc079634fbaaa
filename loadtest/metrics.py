"""The service's ``/metrics`` scraped, parsed and turned into per-step figures.

Parsing is ``prometheus_client``'s own (the service exposes its metrics with it, so its
parser reads exactly what the service writes); this module only flattens samples into
``{(name, sorted labels): value}`` and computes what a histogram observed between two
scrapes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from loadtest.report import parse_float

MetricKey = tuple[str, tuple[tuple[str, str], ...]]


def parse_prometheus(text: str) -> dict[MetricKey, float]:
    """Prometheus text format -> {(sample name, sorted labels): value}, one entry per sample
    (``_bucket``/``_sum``/``_count`` of a histogram apart, as histogram_summary needs)."""
    # Imported here: the runner's pure functions stay importable with the standard library.
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (sample.name, tuple(sorted(sample.labels.items()))): float(sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


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
            entry["buckets"].append((parse_float(labels_d.get("le")), delta))  # type: ignore[union-attr]
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


def _delta(before: dict[MetricKey, float], after: dict[MetricKey, float], key: MetricKey) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


def step_metrics(
    before: dict[MetricKey, float], after: dict[MetricKey, float]
) -> dict[str, object]:
    """What the service's ``/metrics`` say about one step (the scrapes before and after it):
    per-stage and per-endpoint latency, batch sizes, and the split tower's xhat cache."""
    return {
        "stage_ms": histogram_summary(before, after, "t2diff_stage_latency_seconds", "stage"),
        "request_ms": histogram_summary(
            before, after, "t2diff_request_latency_seconds", "endpoint"
        ),
        "batch_size": histogram_summary(before, after, "t2diff_batch_size", None, scale=1.0).get(
            "all", {}
        ),
        # Rows of the split tower found in the xhat cache (hit) or computed (miss).
        "xhat_cache": {
            result: _delta(before, after, ("t2diff_xhat_cache_total", (("result", result),)))
            for result in ("hit", "miss")
        },
        # The startup warm (service/xhat_warm.py): what it computed, how long it took
        # (gauges of the last warm), and the background recompute after writes.
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
            result: _delta(before, after, ("t2diff_xhat_recompute_total", (("result", result),)))
            for result in ("computed", "unchanged", "dropped", "failed", "skipped")
        },
    }


def metrics_lines(metrics: dict[str, object]) -> list[str]:
    """The console lines of :func:`step_metrics` (none when the scrape failed)."""
    if "stage_ms" not in metrics:
        return []
    stages: dict[str, dict[str, float]] = metrics["stage_ms"]  # type: ignore[assignment]
    lines = [
        "run_load: stage mean/p99 ms (from /metrics): "
        + ", ".join(f"{k} {v['mean']:.2f}/{v['p99']:.2f}" for k, v in stages.items())
    ]
    cache: dict[str, float] = metrics["xhat_cache"]  # type: ignore[assignment]
    if cache["hit"] + cache["miss"] > 0:
        lines.append(
            f"run_load: xhat cache {cache['hit']:.0f} hits, {cache['miss']:.0f} misses "
            f"(hit rate {cache['hit'] / (cache['hit'] + cache['miss']):.3f})"
        )
    warm: dict[str, object] = metrics["xhat_warm"]  # type: ignore[assignment]
    recompute = metrics["xhat_recompute"]
    lines.append(
        f"run_load: xhat warm {warm['outcomes']} {warm['sessions']:.0f} sessions in "
        f"{warm['seconds']:.1f}s; background recompute {recompute}"
    )
    return lines
