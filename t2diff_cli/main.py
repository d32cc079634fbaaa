"""``t2diff``: data, train, evaluate, export, build-index, sessions, serve, demo.

Every heavy import (torch, FAISS, ONNX Runtime, FastAPI) happens inside the command that
needs it, so ``t2diff serve`` works in an image without torch and ``--help`` is instant.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from t2diff_cli.common import fail as _fail
from t2diff_cli.common import parse_overrides
from t2diff_cli.release_cmds import register as register_release_commands

app = typer.Typer(help=__doc__, no_args_is_help=True, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Synthetic data and data sets.", no_args_is_help=True)
sessions_app = typer.Typer(help="User sessions in Redis.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(sessions_app, name="sessions")
register_release_commands(app)  # rebuild, promote, rollback, release status|validate

FormatOption = Annotated[
    str, typer.Option("--format", help="auto | csv | tsv | parquet | ml-1m | ml-100k")
]


@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Option(help="output directory (interactions.csv)")],
    users: int = 2000,
    items: int = 1000,
    clusters: int = 20,
    seed: int = 0,
) -> None:
    """Write a seeded synthetic log: clustered items, drifting interests, sessions."""
    from model.data import DataError, write_synthetic

    try:
        path = write_synthetic(out, n_users=users, n_items=items, n_clusters=clusters, seed=seed)
    except DataError as exc:
        _fail(str(exc))
    typer.echo(f"wrote {path}")


@app.command()
def train(
    data: Annotated[Path, typer.Option(help="interactions file or directory")],
    out: Annotated[Path, typer.Option(help="run directory, e.g. runs/NAME")],
    model: Annotated[str, typer.Option(help="model name (see `t2diff models`)")] = "t2diff",
    fmt: FormatOption = "auto",
    epochs: int = 20,
    batch_size: int = 256,
    lr: float = 1e-3,
    patience: int = 4,
    seed: int = 0,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    max_minutes: Annotated[float | None, typer.Option(help="stop after this long")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="model option key=value, repeatable")
    ] = None,
    resume: Annotated[bool, typer.Option(help="continue from checkpoint.pt")] = False,
    amp: Annotated[bool, typer.Option(help="bf16 autocast on CUDA")] = False,
    compile_: Annotated[
        bool, typer.Option("--compile", help="torch.compile the training step")
    ] = False,
    progress: bool = True,
) -> None:
    """Train a model on a log with leave-one-out validation and early stopping.

    Multi-GPU (or multi-process CPU) data parallel: launch under torchrun, e.g.
    ``torchrun --nproc-per-node 2 -m t2diff_cli.main train ...``; rank 0 evaluates and writes.
    """
    from model.data import DataError
    from model.train import DataSource, TrainConfig, train_run

    config = TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        patience=patience,
        seed=seed,
        device=device,
        max_minutes=max_minutes,
        amp=amp,
        compile=compile_,
        progress=progress,
    )
    try:
        summary = train_run(
            DataSource(str(data.resolve()), fmt),
            out,
            model,
            parse_overrides(set_ or []),
            config,
            resume=resume,
        )
    except (DataError, ValueError) as exc:
        _fail(str(exc))
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for the job
        typer.echo(json.dumps(summary, indent=2))


@app.command()
def models() -> None:
    """List the model names the harness knows."""
    from model.registry import model_names

    typer.echo("\n".join(model_names()))


@app.command()
def evaluate(
    run: Annotated[Path, typer.Option(help="run directory")],
    device: str = "auto",
    xhat_probe: Annotated[
        str,
        typer.Option(
            help="none | only (xhat itself as the query) | zero (the tower fed a zero xhat);"
            " diffusion models, writes metrics-xhat-PROBE.json"
        ),
    ] = "none",
) -> None:
    """Full-ranking Recall/HR, MRR, NDCG on validation and test; writes metrics.json."""
    from model.train import evaluate_run

    if not (run / "model.pt").is_file():
        _fail(f"{run}: no trained model (model.pt)")
    try:
        result = evaluate_run(run, device, xhat_probe=xhat_probe)
    except ValueError as error:
        _fail(str(error))
    name = result["model_name"]
    for model_name in (name, "popularity"):
        test = result[model_name]["test"]
        typer.echo(
            f"{model_name:>12} test  recall@20 {test['recall@20']:.4f}  mrr@20 "
            f"{test['mrr@20']:.4f}  ndcg@10 {test['ndcg@10']:.4f}  hr@50 {test['hr@50']:.4f}"
        )
    written = "metrics.json" if xhat_probe == "none" else f"metrics-xhat-{xhat_probe}.json"
    typer.echo(f"wrote {run / written}")


@app.command()
def export(
    run: Annotated[Path, typer.Option(help="run directory")],
    out: Annotated[Path, typer.Option(help="new artifacts directory, e.g. artifacts/VERSION")],
    version: Annotated[str | None, typer.Option(help="model version (default: out's name)")] = None,
    noise_seed: int = 0,
) -> None:
    """Export the user tower (fixed T-step reverse process) to ONNX plus item embeddings."""
    from model.export import export_run

    if not (run / "model.pt").is_file():
        _fail(f"{run}: no trained model (model.pt)")
    try:
        manifest = export_run(run, out, version, noise_seed)
    except FileExistsError as exc:
        _fail(str(exc))
    typer.echo(f"exported {manifest['model_name']} {manifest['model_version']} to {out}")


@app.command("build-index")
def build_index(
    artifacts: Annotated[Path, typer.Option(help="artifacts directory (an export)")],
    out: Annotated[Path, typer.Option(help="new index directory, e.g. indexes/VERSION")],
    factory: Annotated[str | None, typer.Option(help="FAISS factory string")] = None,
    nprobe: int | None = None,
) -> None:
    """Build a FAISS IVF-PQ index of the item embeddings and measure its recall."""
    from contracts.manifest import ArtifactError
    from index_builder.build import build_from_artifacts

    try:
        manifest = build_from_artifacts(artifacts, out, factory=factory, nprobe=nprobe)
    except (ArtifactError, FileExistsError, ValueError) as exc:
        _fail(str(exc))
    typer.echo(
        f"index {manifest['index_version']}: {manifest['factory']} nprobe {manifest['nprobe']} "
        f"recall@10 {manifest['recall_at_10']:.4f} recall@100 {manifest['recall_at_100']:.4f} "
        f"vs exact, {manifest['bytes_per_item']:.0f} bytes/item"
    )


@sessions_app.command("load")
def sessions_load(
    data: Annotated[Path, typer.Option(help="interactions file or directory")],
    redis_url: Annotated[
        str,
        typer.Option(
            envvar="T2DIFF_REDIS_URL",
            help="redis://[[user]:password@]host:port/db, or rediss://... for TLS",
        ),
    ] = "redis://localhost:6379/0",
    redis_password: Annotated[
        str | None,
        typer.Option(
            envvar="T2DIFF_REDIS_PASSWORD",
            help="for a URL without a password (prefer the variable: argv is visible)",
            show_default=False,
        ),
    ] = None,
    redis_tls_ca_file: Annotated[
        Path | None,
        typer.Option(envvar="T2DIFF_REDIS_TLS_CA_FILE", help="CA bundle (rediss:// only)"),
    ] = None,
    redis_tls_cert_file: Annotated[
        Path | None,
        typer.Option(envvar="T2DIFF_REDIS_TLS_CERT_FILE", help="client certificate (mutual TLS)"),
    ] = None,
    redis_tls_key_file: Annotated[
        Path | None,
        typer.Option(envvar="T2DIFF_REDIS_TLS_KEY_FILE", help="client key (mutual TLS)"),
    ] = None,
    prefix: Annotated[str, typer.Option(envvar="T2DIFF_REDIS_PREFIX")] = "t2diff",
    max_len: int = 200,
    fmt: FormatOption = "auto",
) -> None:
    """Bulk-load every user's recent behaviours into Redis (pipelined)."""
    import redis

    from model.data import DataError, load_sequences
    from service.sessions import (
        load_sessions_from_sequences,
        redact_redis_url,
        redis_connection_kwargs,
    )

    shown = redact_redis_url(redis_url)
    try:
        connection = redis_connection_kwargs(
            redis_url,
            password=redis_password,
            tls_ca_file=redis_tls_ca_file,
            tls_cert_file=redis_tls_cert_file,
            tls_key_file=redis_tls_key_file,
        )
    except ValueError as exc:  # TLS files without rediss://, a certificate without its key
        _fail(f"Redis at {shown}: {exc}")
    try:
        sequences = load_sequences(data, fmt, min_length=1)
        count = load_sessions_from_sequences(
            redis_url, sequences, prefix=prefix, max_len=max_len, connection_kwargs=connection
        )
    except DataError as exc:
        _fail(str(exc))
    except redis.RedisError as exc:
        _fail(f"Redis at {shown}: {exc}")
    typer.echo(f"loaded sessions of {count} users into {shown}")


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="overrides T2DIFF_HOST")] = None,
    port: Annotated[int | None, typer.Option(help="overrides T2DIFF_PORT")] = None,
    tower_worker: Annotated[
        str,
        typer.Option(
            "--tower-worker",
            envvar="T2DIFF_TOWER_WORKER",
            help="auto: start a tower worker child (torch, the fused kernel) when torch is "
            "installed and a CUDA GPU is visible | on: always (eager on a CPU) | off: never; "
            "a worker that does not come up leaves ONNX Runtime serving",
        ),
    ] = "auto",
) -> None:
    """Start the recall API (FastAPI under uvicorn); settings from T2DIFF_* variables."""
    from service.observability import configure_logging
    from service.server import run
    from service.settings import Settings
    from worker.supervisor import MODES, Terminated
    from worker.supervisor import tower_worker as tower_worker_child

    if tower_worker not in MODES:
        _fail(f"--tower-worker must be one of {', '.join(MODES)}, not {tower_worker!r}")
    overrides = {k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    settings = Settings(**overrides)
    # Logging first: the worker's start (or why none starts) is logged before uvicorn runs.
    configure_logging(settings.log_level, settings.log_json)
    try:
        with tower_worker_child(tower_worker, settings) as serving:
            run(serving)
    except Terminated as exc:  # the worker is stopped: now end by the signal, as before
        exc.resend()


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="where data, run, artifacts go")] = Path(".demo"),
    users: int = 1000,
    items: int = 500,
    epochs: int = 3,
    redis_url: Annotated[
        str | None, typer.Option(help="use this Redis instead of starting one")
    ] = None,
    requests: int = 3,
) -> None:
    """Synthetic data -> train -> export -> index -> Redis -> server -> a few /recall calls."""
    from t2diff_cli.demo import run_demo

    run_demo(
        workdir, users=users, items=items, epochs=epochs, redis_url=redis_url, n_requests=requests
    )


if __name__ == "__main__":
    app()
