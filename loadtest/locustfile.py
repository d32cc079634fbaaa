"""Locust load test of the recall service: a ranking front-end's traffic.

The traffic model (Zipf-skewed user ids, weighted k, ~10% event writes; every knob an
``T2DIFF_LOADTEST_*`` env var) lives in traffic_model.py beside this file, which locust puts
on sys.path.  Pacing is constant-rate: each simulated user runs
``T2DIFF_LOADTEST_USER_RPS`` tasks per second (``constant_throughput``), so the offered
rate is ``users x USER_RPS`` whatever the latency, until the service saturates.

``POST /events`` answers 404 until that endpoint is deployed: such answers are recorded
under their own name (``/events [404: not deployed]``) as successes, so they stay visible
without counting in the run's error rate.  Anything else but 2xx is a failure.

    locust -f loadtest/locustfile.py --headless -H http://127.0.0.1:8000 -u 50 -r 10 -t 1m

Imports only locust and the standard library, so the official locust image runs it.
"""

from __future__ import annotations

import os
import random

from locust import FastHttpUser, constant_throughput, task
from traffic_model import TrafficModel, events_outcome, recall_problem

EVENTS_404_NAME = "/events [404: not deployed]"

MODEL = TrafficModel.from_env(os.environ)


class RecallUser(FastHttpUser):
    """One front-end stream: recalls with some event writes, at a constant rate."""

    wait_time = constant_throughput(MODEL.user_rps)

    def on_start(self) -> None:
        self.rng = random.Random()

    @task(MODEL.recall_weight)
    def recall(self) -> None:
        body = MODEL.recall_body(self.rng)
        with self.client.post("/recall", json=body, name="/recall", catch_response=True) as resp:
            payload: object = None
            if resp.status_code == 200:
                try:
                    payload = resp.json()
                except ValueError:
                    resp.failure("response is not JSON")
                    return
            problem = recall_problem(resp.status_code, payload)
            if problem is None:
                resp.success()
            else:
                resp.failure(f"{problem}: {(resp.text or '')[:200]}")

    @task(MODEL.events_weight)
    def events(self) -> None:
        body = MODEL.events_body(self.rng)
        with self.client.post("/events", json=body, name="/events", catch_response=True) as resp:
            outcome = events_outcome(resp.status_code)
            if outcome == "success":
                resp.success()
            elif outcome == "not_deployed":
                resp.request_meta["name"] = EVENTS_404_NAME
                resp.success()
            else:
                resp.failure(f"HTTP {resp.status_code}: {(resp.text or '')[:200]}")
