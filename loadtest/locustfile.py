"""Locust load test of the recall service: a ranking front-end's traffic.

The traffic model (Zipf-skewed user ids, weighted k, ~10% event writes; every knob an
``T2DIFF_LOADTEST_*`` env var) lives in traffic_model.py beside this file, which locust puts
on sys.path.  Pacing: each simulated user runs
``T2DIFF_LOADTEST_USER_RPS`` tasks per second on a schedule (``traffic_model.Pacer``: Poisson
gaps by default, from a random phase), so the offered rate is ``users x USER_RPS`` whatever
the latency, until the service saturates.

``POST /events`` answers 404 until that endpoint is deployed: such answers are recorded
under their own name (``/events [404: not deployed]``) as successes, so they stay visible
without counting in the run's error rate.  Anything else but 2xx is a failure.

    locust -f loadtest/locustfile.py --headless -H http://127.0.0.1:8000 -u 50 -r 10 -t 1m

With ``T2DIFF_LOADTEST_RESPONSE_LOG=PATH`` every response is also written as one CSV row
(``traffic_model.LOG_COLUMNS``: start time, latency, status, ``degraded`` and its reason,
the service's ``stages_ms``), so degraded answers are counted and an outage can be timed
to the response; ``run_load.py`` reads it back.

Imports only locust and the standard library, so the official locust image runs it.
"""

from __future__ import annotations

import csv
import os
import random
import time

from locust import FastHttpUser, events, task
from traffic_model import LOG_COLUMNS, TrafficModel, events_outcome, log_row, recall_problem

EVENTS_404_NAME = "/events [404: not deployed]"

MODEL = TrafficModel.from_env(os.environ)


class ResponseLog:
    """Appends one CSV row per response to ``T2DIFF_LOADTEST_RESPONSE_LOG`` (if set)."""

    def __init__(self, path: str | None) -> None:
        self.handle = None
        if path:
            self.handle = open(path, "w", newline="", encoding="utf-8")
            self.writer = csv.writer(self.handle)
            self.writer.writerow(LOG_COLUMNS)

    def write(self, t_start: float, endpoint: str, status: int, payload: object) -> None:
        if self.handle is not None:
            latency_ms = (time.time() - t_start) * 1000
            self.writer.writerow(log_row(t_start, latency_ms, endpoint, status, payload))

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None


RESPONSE_LOG = ResponseLog(os.environ.get("T2DIFF_LOADTEST_RESPONSE_LOG"))


@events.quitting.add_listener
def _close_log(**_kwargs: object) -> None:
    RESPONSE_LOG.close()


class RecallUser(FastHttpUser):
    """One front-end stream: recalls with some event writes, at a constant rate."""

    def wait_time(self) -> float:
        return self.pacer.wait(time.monotonic())

    def on_start(self) -> None:
        self.rng = random.Random()
        self.pacer = MODEL.pacer(self.rng)
        # The first task too waits for its (random) phase; time.sleep is gevent-patched.
        time.sleep(self.pacer.wait(time.monotonic()))

    @task(MODEL.recall_weight)
    def recall(self) -> None:
        body = MODEL.recall_body(self.rng)
        started = time.time()
        with self.client.post("/recall", json=body, name="/recall", catch_response=True) as resp:
            payload: object = None
            if resp.status_code == 200:
                try:
                    payload = resp.json()
                except ValueError:
                    RESPONSE_LOG.write(started, "/recall", resp.status_code, None)
                    resp.failure("response is not JSON")
                    return
            RESPONSE_LOG.write(started, "/recall", resp.status_code, payload)
            problem = recall_problem(resp.status_code, payload)
            if problem is None:
                resp.success()
            else:
                resp.failure(f"{problem}: {(resp.text or '')[:200]}")

    @task(MODEL.events_weight)
    def events(self) -> None:
        body = MODEL.events_body(self.rng)
        started = time.time()
        with self.client.post("/events", json=body, name="/events", catch_response=True) as resp:
            RESPONSE_LOG.write(started, "/events", resp.status_code, None)
            outcome = events_outcome(resp.status_code)
            if outcome == "success":
                resp.success()
            elif outcome == "not_deployed":
                resp.request_meta["name"] = EVENTS_404_NAME
                resp.success()
            else:
                resp.failure(f"HTTP {resp.status_code}: {(resp.text or '')[:200]}")
