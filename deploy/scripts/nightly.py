#!/usr/bin/env python3
"""A dependency-free nightly scheduler: run a command every day at HH:MM (compose `rebuild`).

Kubernetes has CronJobs (deploy/k8s/rebuild-cronjob.yaml); docker compose has no scheduler,
so the `rebuild` service runs this loop instead of shipping cron or supercronic:

    python nightly.py [--at 02:00] [--tz UTC] [--on-start] [--timeout-s 10800] -- t2diff rebuild

Each env var below overrides the default of the matching flag: T2DIFF_REBUILD_AT,
T2DIFF_REBUILD_TZ, T2DIFF_REBUILD_ON_START (1 = run once at start-up too),
T2DIFF_REBUILD_TIMEOUT_S, and T2DIFF_REBUILD_CMD (the command, shell-split) when none
follows ``--``.

Runs never overlap (the loop waits for the command) and a failed or timed-out run is
logged and retried at the next slot, never fatal: one bad night must not stop the
schedule.  SIGTERM/SIGINT (``docker compose stop``) end the wait at once, and a running
command gets SIGTERM, then SIGKILL 30 s later.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

DEFAULT_CMD = "t2diff rebuild"
KILL_GRACE_S = 30.0


def log(message: str) -> None:
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    print(f"{stamp} nightly: {message}", flush=True)


def parse_at(text: str) -> dt.time:
    """``"02:00"`` -> 02:00; rejects anything that is not HH:MM on a 24 h clock."""
    try:
        hour, minute = (int(part) for part in text.strip().split(":"))
        return dt.time(hour, minute)
    except ValueError as exc:
        raise ValueError(f"--at wants HH:MM (24 h), not {text!r}") from exc


def zone(name: str) -> dt.tzinfo:
    if name.upper() == "UTC":
        return dt.UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        # Slim images may lack tzdata; a wrong time zone must not stop the schedule.
        log(f"unknown time zone {name!r} ({exc}); using UTC")
        return dt.UTC


def next_run(now: dt.datetime, at: dt.time, tz: dt.tzinfo) -> dt.datetime:
    """The first ``at`` wall-clock time in ``tz`` strictly after ``now`` (an aware datetime)."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    local = now.astimezone(tz)
    candidate = dt.datetime.combine(local.date(), at, tzinfo=tz)
    if candidate <= local:
        candidate = dt.datetime.combine(local.date() + dt.timedelta(days=1), at, tzinfo=tz)
    return candidate


def run_once(command: list[str], stop: threading.Event, timeout_s: float) -> int:
    """Run ``command``; returns its exit code (124 on timeout, 143 when stopped)."""
    log(f"running: {shlex.join(command)}")
    started = time.monotonic()
    try:
        process = subprocess.Popen(command)
    except OSError as exc:
        log(f"cannot start {command[0]!r}: {exc}")
        return 127
    code: int | None = None
    while code is None:
        try:
            code = process.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            timed_out = time.monotonic() - started > timeout_s
            if timed_out or stop.is_set():
                log("timed out: terminating" if timed_out else "stop requested: terminating")
                process.terminate()
                try:
                    process.wait(timeout=KILL_GRACE_S)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
                code = 124 if timed_out else 143
    log(f"exit {code} after {time.monotonic() - started:.0f} s")
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a command every day at HH:MM.")
    env = os.environ
    parser.add_argument("--at", default=env.get("T2DIFF_REBUILD_AT", "02:00"))
    parser.add_argument("--tz", default=env.get("T2DIFF_REBUILD_TZ", "UTC"))
    parser.add_argument(
        "--on-start",
        action="store_true",
        default=env.get("T2DIFF_REBUILD_ON_START", "0") == "1",
        help="also run once right away",
    )
    parser.add_argument(
        "--timeout-s", type=float, default=float(env.get("T2DIFF_REBUILD_TIMEOUT_S", "10800"))
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    command = command or shlex.split(env.get("T2DIFF_REBUILD_CMD", DEFAULT_CMD))
    at, tz = parse_at(args.at), zone(args.tz)

    stop = threading.Event()

    def _stop(signum: int, _frame: object) -> None:
        log(f"signal {signum}: stopping")
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)

    if args.on_start:
        run_once(command, stop, args.timeout_s)
    while not stop.is_set():
        when = next_run(dt.datetime.now(dt.UTC), at, tz)
        log(f"next run at {when.isoformat()}")
        # Sleep in short slices against the wall clock: a suspended laptop or a clock step
        # does not push the run a whole day late.
        while not stop.is_set() and dt.datetime.now(dt.UTC) < when:
            remaining = (when - dt.datetime.now(dt.UTC)).total_seconds()
            stop.wait(min(60.0, max(remaining, 0.0)))
        if not stop.is_set():
            run_once(command, stop, args.timeout_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
