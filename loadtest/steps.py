"""The steps of a run: the offered rates, one locust process per step, and its command line.

A step is one headless locust run at one offered rate, with its own CSVs, HTML report and
``/metrics`` scrape.  Locust's ``LoadTestShape`` would drive the rates inside one locust
run instead, but then the per-step outputs (stats CSV, report, results row, outage) that
docs/results/load.md records would be merged into one; so the runner keeps one process a
step and this module plans them.
"""

from __future__ import annotations

import argparse
import math
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([hms]?)")


def parse_duration(text: str) -> float:
    """Locust's ``--run-time`` syntax in seconds: ``90``, ``30s``, ``2m``, ``1h30m``."""
    text = text.strip().lower()
    parts = _DURATION.findall(text)
    if not text or "".join(f"{n}{u}" for n, u in parts) != text.replace(" ", ""):
        raise ValueError(f"bad duration {text!r} (use e.g. 90, 30s, 2m, 1h30m)")
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "": 1.0}
    return sum(float(n) * scale[u] for n, u in parts)


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


def run_locust(command: list[str], env: dict[str, str], timeout_s: float) -> int:
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
