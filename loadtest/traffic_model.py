"""The traffic model of loadtest/locustfile.py, without locust (importable anywhere).

What a ranking front-end sends the recall service:

* user ids with a Zipf-like skew (a few heavy users, a long tail), from
  ``T2DIFF_LOADTEST_USERS``: a file with one id per line, or a range ``u0..u1999`` (the
  synthetic generator's ids; the default);
* ``k`` from {20, 50, 100, 200} with weights 4:3:2:1 (``T2DIFF_LOADTEST_K_WEIGHTS``, e.g.
  ``20:4,50:3,100:2,200:1``);
* ``T2DIFF_LOADTEST_EVENTS_SHARE`` (default 0.1) of the tasks are ``POST /events`` writes
  of 1-3 recent interactions, with item ids from ``T2DIFF_LOADTEST_ITEMS`` (``i0..i999``);
* ``T2DIFF_LOADTEST_USER_RPS`` tasks per second per simulated user, scheduled by a
  :class:`Pacer`: ``T2DIFF_LOADTEST_ARRIVALS=poisson`` (default: exponential gaps, so the
  total is a Poisson stream, as from many independent callers) or ``constant`` (fixed gaps);
  either way from a random phase, and a slow answer does not lower the offered rate.

Also ``T2DIFF_LOADTEST_ZIPF`` (exponent, default 1.1), ``T2DIFF_LOADTEST_SEED`` (which ids
are the heavy ones, default 0), ``T2DIFF_LOADTEST_EXCLUDE_SEEN`` (default 1),
``T2DIFF_LOADTEST_RANKED`` (default 0; 1 = the ids file lists the heaviest users first, e.g.
ordered by session length as ``run_load.py --start-local`` writes it, so rank follows the
file instead of a seeded shuffle), ``T2DIFF_LOADTEST_BUDGET_MS`` (unset = the service's
default budget; else sent as ``budget_ms`` in every recall) and
``T2DIFF_LOADTEST_RESPONSE_LOG`` (a CSV path: one row per response, :data:`LOG_COLUMNS`,
read back by ``run_load.py`` for degraded counts, stage costs and the Redis-outage figures).
"""

from __future__ import annotations

import itertools
import random
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

DEFAULT_USERS = "u0..u1999"
DEFAULT_ITEMS = "i0..i999"
DEFAULT_K_WEIGHTS = "20:4,50:3,100:2,200:1"
# Task weights are out of this total, so an events share of 0.1 gives 900 : 100.
WEIGHT_TOTAL = 1000

_RANGE = re.compile(r"^\s*([^\d\s]*)(\d+)\s*\.\.\s*([^\d\s]*)(\d+)\s*$")


def parse_ids(spec: str) -> list[str]:
    """``"u0..u99"`` -> ``["u0", ..., "u99"]`` (inclusive); otherwise a path to a file with
    one id per line (blank lines and ``#`` comments skipped)."""
    match = _RANGE.match(spec)
    if match is not None:
        prefix, start, prefix_end, stop = match.groups()
        if prefix_end and prefix_end != prefix:
            raise ValueError(f"range {spec!r} mixes prefixes {prefix!r} and {prefix_end!r}")
        first, last = int(start), int(stop)
        if last < first:
            raise ValueError(f"empty id range {spec!r}")
        return [f"{prefix}{n}" for n in range(first, last + 1)]
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"{spec!r} is neither an id range like u0..u1999 nor a file of ids")
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    ids = [line for line in lines if line and not line.startswith("#")]
    if not ids:
        raise ValueError(f"no ids in {path}")
    return ids


def parse_k_weights(spec: str) -> tuple[list[int], list[float]]:
    """``"20:4,50:3"`` -> ``([20, 50], [4.0, 3.0])``; a missing weight is 1."""
    ks: list[int] = []
    weights: list[float] = []
    try:
        for part in spec.split(","):
            k, _, weight = part.partition(":")
            ks.append(int(k))
            weights.append(float(weight) if weight.strip() else 1.0)
    except ValueError as exc:
        raise ValueError(f"bad k weights {spec!r}: {exc}") from exc
    if any(k <= 0 for k in ks) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"bad k weights {spec!r}")
    return ks, weights


class ZipfSampler:
    """Draws ids with probability proportional to ``1 / rank**s``.

    Ranks are a seeded shuffle of the ids, so the heavy users are not simply u0, u1, ...
    (real ids are often ordered by sign-up date).  Sampling bisects cumulative weights.
    """

    def __init__(
        self, ids: Sequence[str], s: float = 1.1, seed: int = 0, ranked: bool = False
    ) -> None:
        if not ids:
            raise ValueError("no ids to sample from")
        if s < 0:
            raise ValueError(f"Zipf exponent must be >= 0, not {s}")
        self.ids = list(ids)
        if not ranked:  # ranked: the caller's order is the popularity order (heaviest first)
            random.Random(seed).shuffle(self.ids)
        self.cum_weights = list(
            itertools.accumulate(1.0 / (rank**s) for rank in range(1, len(self.ids) + 1))
        )

    def __call__(self, rng: random.Random) -> str:
        return rng.choices(self.ids, cum_weights=self.cum_weights)[0]


@dataclass
class TrafficModel:
    users: ZipfSampler
    items: list[str]
    k_values: list[int]
    k_weights: list[float]
    user_rps: float = 1.0
    events_share: float = 0.1
    exclude_seen: bool = True
    budget_ms: int | None = None
    arrivals: str = "poisson"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> TrafficModel:
        share = float(env.get("T2DIFF_LOADTEST_EVENTS_SHARE", "0.1"))
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"T2DIFF_LOADTEST_EVENTS_SHARE must be in [0, 1], not {share}")
        user_rps = float(env.get("T2DIFF_LOADTEST_USER_RPS", "1"))
        if user_rps <= 0:
            raise ValueError(f"T2DIFF_LOADTEST_USER_RPS must be > 0, not {user_rps}")
        k_values, k_weights = parse_k_weights(
            env.get("T2DIFF_LOADTEST_K_WEIGHTS", DEFAULT_K_WEIGHTS)
        )
        return cls(
            users=ZipfSampler(
                parse_ids(env.get("T2DIFF_LOADTEST_USERS", DEFAULT_USERS)),
                s=float(env.get("T2DIFF_LOADTEST_ZIPF", "1.1")),
                seed=int(env.get("T2DIFF_LOADTEST_SEED", "0")),
                ranked=_flag(env.get("T2DIFF_LOADTEST_RANKED", "0")),
            ),
            items=parse_ids(env.get("T2DIFF_LOADTEST_ITEMS", DEFAULT_ITEMS)),
            k_values=k_values,
            k_weights=k_weights,
            user_rps=user_rps,
            events_share=share,
            exclude_seen=_flag(env.get("T2DIFF_LOADTEST_EXCLUDE_SEEN", "1")),
            budget_ms=_budget(env.get("T2DIFF_LOADTEST_BUDGET_MS")),
            arrivals=_arrivals(env.get("T2DIFF_LOADTEST_ARRIVALS", "poisson")),
        )

    def pacer(self, rng: random.Random) -> Pacer:
        return Pacer(self.user_rps, self.arrivals == "poisson", rng)

    @property
    def events_weight(self) -> int:
        return round(WEIGHT_TOTAL * self.events_share)

    @property
    def recall_weight(self) -> int:
        return WEIGHT_TOTAL - self.events_weight

    def recall_body(self, rng: random.Random) -> dict[str, object]:
        """A ``POST /recall`` body."""
        body: dict[str, object] = {
            "user_id": self.users(rng),
            "k": rng.choices(self.k_values, weights=self.k_weights)[0],
            "exclude_seen": self.exclude_seen,
        }
        if self.budget_ms is not None:
            body["budget_ms"] = self.budget_ms
        return body

    def events_body(self, rng: random.Random, now: float | None = None) -> dict[str, object]:
        """A ``POST /events`` body (the batch form): 1-3 interactions of one user in the last
        few seconds, oldest first, each with its own ``user_id`` and a fresh ``event_id``."""
        now = time.time() if now is None else now
        count = rng.randint(1, 3)
        user_id = self.users(rng)
        return {
            "events": [
                {
                    "user_id": user_id,
                    "item_id": rng.choice(self.items),
                    "timestamp": round(now - (count - i), 3),
                    "event_id": f"lt-{rng.getrandbits(64):016x}",
                }
                for i in range(count)
            ],
        }


class Pacer:
    """When a simulated user sends its next task: on a schedule of ``rate`` tasks per second
    (Poisson or constant gaps) that starts at a random phase and is kept whatever the
    latency.  A user that fell behind (a slow answer) sends at once, but catches up at most
    one gap, so a stall is not followed by a burst.

    Unlike locust's ``constant_throughput``, whose schedule starts when the user is created
    (users spawned in one batch then send in lock-step bursts), the phase is random."""

    def __init__(self, rate: float, poisson: bool, rng: random.Random) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be > 0, not {rate}")
        self.rate, self.poisson, self.rng = rate, poisson, rng
        self.next_at: float | None = None

    def gap(self) -> float:
        return self.rng.expovariate(self.rate) if self.poisson else 1.0 / self.rate

    def wait(self, now: float) -> float:
        """Seconds to wait from ``now`` (a monotonic clock) before the next task."""
        if self.next_at is None:
            self.next_at = now + self.rng.uniform(0, 1.0 / self.rate)
        else:
            self.next_at = max(self.next_at, now - 1.0 / self.rate) + self.gap()
        return max(0.0, self.next_at - now)


def _arrivals(value: str) -> str:
    value = value.strip().lower()
    if value not in ("poisson", "constant"):
        raise ValueError(f"T2DIFF_LOADTEST_ARRIVALS must be poisson or constant, not {value!r}")
    return value


def _flag(value: str) -> bool:
    return value.strip().lower() not in ("0", "false", "no", "")


def _budget(value: str | None) -> int | None:
    if value is None or not value.strip():
        return None
    budget = round(float(value))  # the API takes whole milliseconds
    if budget <= 0:
        raise ValueError(f"T2DIFF_LOADTEST_BUDGET_MS must be >= 1, not {value}")
    return budget


# The response log (T2DIFF_LOADTEST_RESPONSE_LOG): wall-clock start (unix s), client-side
# latency, endpoint, HTTP status, degraded (1/0; empty for /events), reason, and the
# service's own stage timings of a recall (ms; empty when absent).  ``diffusion`` and
# ``attention`` are the split tower's parts (inside ``tower``); ``diffusion`` is absent
# when every row of the request's batch was in the xhat cache.
STAGES = ("redis", "queue", "tower", "ann", "filter", "diffusion", "attention")
LOG_COLUMNS = (
    "t_start",
    "latency_ms",
    "endpoint",
    "status",
    "degraded",
    "reason",
    "server_ms",
) + tuple(f"{stage}_ms" for stage in STAGES)


def log_row(
    t_start: float, latency_ms: float, endpoint: str, status: int, payload: object
) -> list[str]:
    """One response-log row (strings, in :data:`LOG_COLUMNS` order)."""
    degraded = reason = server_ms = ""
    stages: dict[str, object] = {}
    if isinstance(payload, dict):
        if "degraded" in payload:
            degraded = "1" if payload.get("degraded") else "0"
            reason = str(payload.get("degraded_reason") or "")
        if isinstance(payload.get("latency_ms"), int | float):
            server_ms = f"{payload['latency_ms']:g}"
        if isinstance(payload.get("stages_ms"), dict):
            stages = payload["stages_ms"]
    cells = [f"{t_start:.4f}", f"{latency_ms:.3f}", endpoint, str(status), degraded, reason]
    cells.append(server_ms)
    for stage in STAGES:
        value = stages.get(stage)
        cells.append(f"{value:g}" if isinstance(value, int | float) else "")
    return cells


def events_outcome(status_code: int) -> str:
    """How a ``POST /events`` answer counts: ``success`` (2xx), ``not_deployed`` (404: the
    endpoint does not exist yet; reported apart, not as a failure) or ``failure``."""
    if 200 <= status_code < 300:
        return "success"
    if status_code == 404:
        return "not_deployed"
    return "failure"


def recall_problem(status_code: int, payload: object) -> str | None:
    """Why a ``POST /recall`` answer is a failure, or None when it is a good one."""
    if status_code != 200:
        return f"HTTP {status_code}"
    if not isinstance(payload, dict) or not isinstance(payload.get("items"), list):
        return "response has no items list"
    return None
