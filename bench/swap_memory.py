"""Resident memory of the recall service over hot swaps under traffic.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/swap_memory.py \\
        --swaps 30 --rate 20 --csv docs/results/raw/swap_memory.csv

What it runs, all real and on this machine:

* two model versions ``A`` and ``B`` of an untrained T2Diff tower exported as
  ``t2diff export`` writes it (the single graph, the two split parts and the one-request
  diffusion part; ``--items``, ``--dim``, ``--width``, ``--steps``) with their FAISS
  indexes, built once under ``--workdir`` and reused by later runs;
* a private ``redis-server`` on a free port;
* the service (``python -m service.server``, uvicorn, one worker) on a free port, with the
  watcher polling the ``current`` links every ``--watch-interval`` seconds;
* ``--users`` users' sessions written through ``POST /events``, then ``--rate`` requests/s
  (nine recalls to one ``/events`` write, users drawn at random) for the whole run;
* ``--swaps`` promotions alternating ``B``, ``A``, ``B``, ...: index link first, then the
  artifacts link (the order ``t2diff promote`` uses); each waits until ``/readyz`` names
  the promoted version, then ``--settle`` seconds.

The server's RSS (``/proc/PID/status`` ``VmRSS``) is sampled every ``--sample-s`` seconds
into the CSV (``t_s, rss_mib, swaps_done, requests, errors``).  Printed: RSS after each swap
(the last sample before the next promotion), the baseline (the last sample before the first
swap, after ``--warm-s`` seconds of traffic) and the growth over all swaps.  Exits 1 when
the growth exceeds ``--max-growth`` (default 0.10), or requests failed.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # export_fixtures / service_fixtures

from t2diff_cli.local_stack import (  # noqa: E402
    RedisServer,
    free_port,
    stop_process,
    wait_until_ready,
)

VERSIONS = ("swap-a", "swap-b")


def item_name(row: int) -> str:
    return f"item-{row}"


def build_versions(workdir: Path, items: int, dim: int, width: int, steps: int) -> Path:
    """``workdir/{artifacts,indexes}/{swap-a,swap-b}`` (kept when already there)."""
    marker = workdir / "built.json"
    wanted = {"items": items, "dim": dim, "width": width, "steps": steps}
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        return workdir
    import shutil

    import torch
    from export_fixtures import export_tiny_t2diff
    from service_fixtures import build_tiny_index

    from model.t2diff import T2Diff, T2DiffConfig

    for kind in ("artifacts", "indexes"):
        shutil.rmtree(workdir / kind, ignore_errors=True)
    for seed, version in enumerate(VERSIONS):
        torch.manual_seed(seed)
        config = T2DiffConfig(dim=dim, unet_width=width, diffusion_steps=steps)
        model = T2Diff(items, config).eval()
        started = time.perf_counter()
        export = export_tiny_t2diff(
            workdir / "artifacts" / version,
            model,
            version,
            noise_seed=seed,
            item_name=item_name,
            split=True,
        )
        build_tiny_index(export, workdir / "indexes" / version)
        print(f"built {version} in {time.perf_counter() - started:.1f}s", flush=True)
    marker.write_text(json.dumps(wanted))
    return workdir


def point(link: Path, version: str) -> None:
    tmp = link.with_name(f".{link.name}.tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(version)
    tmp.replace(link)


def promote(root: Path, version: str) -> None:
    point(root / "indexes" / "current", version)
    point(root / "artifacts" / "current", version)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def post(base: str, path: str, body: dict, timeout: float = 10.0) -> dict:
    request = urllib.request.Request(
        base + path,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
        return json.loads(response.read())


def served_model(base: str) -> str | None:
    try:
        with urllib.request.urlopen(base + "/readyz", timeout=5) as response:  # noqa: S310
            return json.loads(response.read()).get("model_version")
    except (urllib.error.URLError, OSError, ValueError):
        return None


class Traffic(threading.Thread):
    """``rate`` requests/s, open loop: nine recalls to one event write."""

    def __init__(self, base: str, rate: float, users: int, items: int, seed: int) -> None:
        super().__init__(daemon=True)
        self.base, self.rate, self.users, self.items = base, rate, users, items
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.requests = 0
        self.errors = 0
        self.last_error = ""

    def run(self) -> None:
        interval = 1.0 / self.rate
        due = time.monotonic()
        n = 0
        while not self.stop.is_set():
            user = f"u{self.rng.randrange(self.users)}"
            try:
                if n % 10 == 9:
                    item = item_name(self.rng.randrange(self.items))
                    post(self.base, "/events", {"user_id": user, "item_id": item})
                else:
                    body = post(self.base, "/recall", {"user_id": user, "k": 100})
                    if body.get("degraded"):
                        self.errors += 1
                        self.last_error = str(body.get("degraded_reason"))
            except (urllib.error.URLError, OSError, ValueError) as exc:
                self.errors += 1
                self.last_error = repr(exc)
            self.requests += 1
            n += 1
            due += interval
            delay = due - time.monotonic()
            if delay > 0:
                self.stop.wait(delay)
            else:
                due = time.monotonic()  # behind: do not burst to catch up


def load_sessions(base: str, users: int, items: int, length: int, seed: int) -> None:
    rng = random.Random(seed)
    now = time.time()
    events = []
    for u in range(users):
        start = now - 86400 * rng.uniform(1, 30)
        for position in range(rng.randint(3, length)):
            item = item_name(rng.randrange(items))
            events.append({"user_id": f"u{u}", "item_id": item, "timestamp": start + position})
    for start in range(0, len(events), 100):
        post(base, "/events", {"events": events[start : start + 100]}, timeout=30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workdir", type=Path, default=Path(tempfile.gettempdir()) / "t2diff-swap-memory"
    )
    parser.add_argument("--swaps", type=int, default=30)
    parser.add_argument("--rate", type=float, default=20.0, help="requests/s")
    parser.add_argument("--watch-interval", type=float, default=1.0)
    parser.add_argument("--settle", type=float, default=2.0, help="seconds after each swap")
    parser.add_argument("--warm-s", type=float, default=10.0, help="traffic before swap 1")
    parser.add_argument("--sample-s", type=float, default=0.5)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--items", type=int, default=3000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--max-growth", type=float, default=0.10)
    parser.add_argument("--csv", type=Path, default=None)
    parser.add_argument("--log", type=Path, default=None, help="service log (default workdir)")
    parser.add_argument("--env", action="append", default=[], help="extra KEY=VALUE for it")
    parser.add_argument(
        "--server-module", default="service.server", help="what `python -m` runs (a wrapper)"
    )
    args = parser.parse_args(argv)

    root = build_versions(args.workdir.resolve(), args.items, args.dim, args.width, args.steps)
    promote(root, VERSIONS[0])
    log_path = args.log or root / "service.log"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with RedisServer() as redis:
        env = {
            **os.environ,
            "T2DIFF_ARTIFACTS_DIR": str(root / "artifacts" / "current"),
            "T2DIFF_INDEX_DIR": str(root / "indexes" / "current"),
            "T2DIFF_REDIS_URL": redis.url,
            "T2DIFF_PORT": str(port),
            "T2DIFF_WATCH_INTERVAL_S": str(args.watch_interval),
            "T2DIFF_LOG_LEVEL": "warning",
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
            **dict(item.split("=", 1) for item in args.env),
        }
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", args.server_module],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        samples: list[tuple[float, float, int, int, int]] = []
        after_swap: list[float] = []
        try:
            wait_until_ready(base, 120, process)
            load_sessions(base, args.users, args.items, 60, seed=1)
            traffic = Traffic(base, args.rate, args.users, args.items, seed=2)
            started = time.monotonic()
            swaps_done = 0
            sampling = threading.Event()

            def sample_forever() -> None:
                while not sampling.wait(args.sample_s):
                    samples.append(
                        (
                            round(time.monotonic() - started, 2),
                            round(rss_mib(process.pid), 1),
                            swaps_done,
                            traffic.requests,
                            traffic.errors,
                        )
                    )

            sampler = threading.Thread(target=sample_forever, daemon=True)
            traffic.start()
            sampler.start()
            time.sleep(args.warm_s)
            baseline = rss_mib(process.pid)
            print(f"baseline after {args.warm_s:g}s of traffic: {baseline:.1f} MiB", flush=True)
            for n in range(args.swaps):
                version = VERSIONS[(n + 1) % 2]
                promote(root, version)
                deadline = time.monotonic() + 120
                while served_model(base) != version:
                    if process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"swap {n + 1} to {version} did not happen")
                    time.sleep(0.2)
                swaps_done = n + 1
                time.sleep(args.settle)
                after_swap.append(rss_mib(process.pid))
                print(
                    f"swap {n + 1:>2} -> {version}: RSS {after_swap[-1]:.1f} MiB "
                    f"({traffic.requests} requests, {traffic.errors} errors)",
                    flush=True,
                )
            traffic.stop.set()
            traffic.join()
            sampling.set()
            sampler.join()
        finally:
            stop_process(process, 20)

    if args.csv is not None:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with args.csv.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["t_s", "rss_mib", "swaps_done", "requests", "errors"])
            writer.writerows(samples)
    growth = after_swap[-1] / baseline - 1
    peak = max(s[1] for s in samples)
    print(
        json.dumps(
            {
                "date": datetime.now(UTC).isoformat(timespec="seconds"),
                "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus",
                "swaps": args.swaps,
                "rate": args.rate,
                "requests": traffic.requests,
                "errors": traffic.errors,
                "last_error": traffic.last_error,
                "baseline_mib": round(baseline, 1),
                "after_swap_mib": [round(x, 1) for x in after_swap],
                "final_mib": round(after_swap[-1], 1),
                "peak_mib": peak,
                "growth": round(growth, 4),
            }
        ),
        flush=True,
    )
    print(f"RSS {baseline:.1f} -> {after_swap[-1]:.1f} MiB over {args.swaps} swaps: "
          f"{growth:+.1%} (limit {args.max_growth:+.0%}), peak {peak:.1f} MiB")  # fmt: skip
    return 0 if growth <= args.max_growth and traffic.errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
