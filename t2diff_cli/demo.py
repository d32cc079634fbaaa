"""``t2diff demo``: the whole path once, on synthetic data, on this machine.

Starts its own ``redis-server`` on a free port unless given a Redis URL, and the API as a
child process (the same ``python -m service.server`` a container runs), then stops both.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer

from t2diff_cli.local_stack import (
    RedisServer,
    free_port,
    redis_binary,
    service_process,
    service_settings,
)


@contextmanager
def local_redis(url: str | None) -> Iterator[str]:
    """Yield ``url``, or start a throw-away ``redis-server`` and yield its URL."""
    if url:
        yield url
        return
    if redis_binary() is None:
        raise typer.BadParameter("redis-server not found: install it (make setup) or --redis-url")
    with RedisServer() as server:
        yield server.url


def step(title: str) -> float:
    typer.secho(f"\n== {title}", fg=typer.colors.CYAN, bold=True)
    return time.monotonic()


def run_demo(
    workdir: Path, users: int, items: int, epochs: int, redis_url: str | None, n_requests: int
) -> None:
    import httpx

    from index_builder.build import build_from_artifacts
    from model.data import load_sequences, write_synthetic
    from model.export import export_run
    from model.train import DataSource, TrainConfig, evaluate_run, train_run
    from service.sessions import load_sessions_from_sequences

    version = time.strftime("demo-%Y%m%d-%H%M%S", time.gmtime())
    workdir = workdir.resolve()
    data_dir, run_dir = workdir / "data", workdir / "runs" / version
    artifacts_dir, index_dir = workdir / "artifacts" / version, workdir / "indexes" / version

    started = step(f"synthetic data: {users} users, {items} items -> {data_dir}")
    path = write_synthetic(data_dir, n_users=users, n_items=items, n_clusters=max(items // 50, 2))
    typer.echo(f"wrote {path} ({time.monotonic() - started:.1f}s)")

    started = step(f"train T2Diff (small, CPU-friendly) for up to {epochs} epochs -> {run_dir}")
    overrides = {"dim": 32, "unet_width": 16}
    summary = train_run(
        DataSource(str(data_dir)),
        run_dir,
        "t2diff",
        overrides,
        TrainConfig(epochs=epochs, batch_size=256, lr=2e-3, progress=False),
    )
    typer.echo(f"trained in {time.monotonic() - started:.0f}s: {json.dumps(summary)}")

    step("evaluate: full ranking, leave-one-out, test split")
    metrics = evaluate_run(run_dir)
    for name in ("t2diff", "popularity"):
        test = metrics[name]["test"]
        typer.echo(
            f"{name:>11}: recall@20 {test['recall@20']:.4f}  mrr@20 {test['mrr@20']:.4f}  "
            f"ndcg@10 {test['ndcg@10']:.4f}"
        )

    started = step(f"export the user tower (T = 50) to ONNX -> {artifacts_dir}")
    export_run(run_dir, artifacts_dir)
    typer.echo(f"exported ({time.monotonic() - started:.0f}s)")

    step(f"build the FAISS IVF-PQ index -> {index_dir}")
    index = build_from_artifacts(artifacts_dir, index_dir)
    typer.echo(
        f"{index['factory']} nprobe {index['nprobe']}: recall@10 {index['recall_at_10']:.4f}, "
        f"recall@100 {index['recall_at_100']:.4f} against exact search"
    )

    with local_redis(redis_url) as url:
        step(f"load sessions into Redis at {url}")
        sequences = load_sequences(data_dir)
        count = load_sessions_from_sequences(url, sequences)
        typer.echo(f"loaded {count} users")

        port = free_port()
        env = {
            **service_settings(artifacts_dir, index_dir, url, port),
            "T2DIFF_LOG_LEVEL": "warning",
            "OMP_WAIT_POLICY": "PASSIVE",
        }
        step(f"start the API on port {port} and call POST /recall")
        with service_process(env, ready_timeout_s=60) as base:
            user_ids = [str(u) for u in sequences.user_ids[:n_requests]] + ["new-user"]
            for user_id in user_ids:
                body = {"user_id": user_id, "k": 5, "exclude_seen": True}
                response = httpx.post(f"{base}/recall", json=body, timeout=10)
                typer.echo(f"POST /recall {json.dumps(body)} -> {response.status_code}")
                typer.echo(json.dumps(response.json(), indent=1))
            bad = httpx.post(f"{base}/recall", json={"user_id": "u1", "k": 0}, timeout=10)
            typer.echo(
                f"POST /recall with k=0 -> {bad.status_code} {bad.json()['detail'][0]['loc']}"
            )
    typer.secho("\ndemo finished", fg=typer.colors.GREEN, bold=True)
