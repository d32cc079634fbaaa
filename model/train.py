"""The trainer: one loop for every model, early stopping on validation, resumable runs.

A run directory holds ``run.json`` (model name and config, training config, data source,
item ids), ``model.pt`` (best weights, a plain state dict), ``checkpoint.pt`` (last epoch,
for resume), ``history.json`` (per-epoch losses and validation metrics) and TensorBoard
event files under ``tb/``.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from model.base import SequentialRecommender
from model.data import LeaveOneOut, SequenceData, item_popularity, leave_one_out, load_sequences
from model.harness import DeviceSequences, evaluate
from model.registry import build_model, make_config


@dataclass
class TrainConfig:
    epochs: int = 20
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 4
    seed: int = 0
    device: str = "auto"
    amp: bool = False  # bf16 autocast on CUDA (ignored on CPU); TF32 matmuls are always on
    compile: bool = False  # torch.compile the loss (fuses the U-Net's small kernels on a GPU)
    select_metric: str = "ndcg@10"
    exclude_seen: bool = True
    max_minutes: float | None = None
    grad_clip: float = 5.0
    progress: bool = True


@dataclass
class DataSource:
    path: str
    format: str = "auto"
    min_length: int = 3


@dataclass
class LoadedRun:
    model: SequentialRecommender
    meta: dict[str, Any]
    data: SequenceData
    split: LeaveOneOut
    popularity: np.ndarray = field(repr=False)


def pick_device(name: str) -> torch.device:
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name
    )
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


class _LossModule(torch.nn.Module):
    """``model.loss`` as a ``forward``: DDP syncs gradients only through ``forward`` calls."""

    def __init__(self, model: SequentialRecommender) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.model.loss(batch)


@dataclass
class Distributed:
    """Where this process sits in a ``torchrun`` job (rank 0 of 1 without one)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Distributed:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        return cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def _init_distributed(dist_info: Distributed, device: torch.device) -> torch.device:
    """Join the torchrun process group: NCCL with one GPU per process, gloo on CPU."""
    if dist_info.world_size == 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def _write_json(path: Path, payload: Any) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=float))


def train_run(
    source: DataSource,
    run_dir: Path,
    model_name: str = "t2diff",
    model_overrides: dict[str, Any] | None = None,
    config: TrainConfig | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Train ``model_name`` on ``source`` into ``run_dir``; returns the run summary."""
    config = config or TrainConfig()
    run_dir = Path(run_dir)
    dist_info = Distributed.from_env()
    # Same seed on every rank: identical initial weights (DDP also broadcasts rank 0's).
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    device = _init_distributed(dist_info, pick_device(config.device))
    data = load_sequences(Path(source.path), source.format, source.min_length)
    split = leave_one_out(data)
    popularity = item_popularity(data, split.train_targets)
    model_config = make_config(model_name, model_overrides)
    model = build_model(model_name, data.n_items, model_config, popularity).to(device)
    max_len = int(model_config["max_seq_len"])
    meta = {
        "model_name": model_name,
        "model_config": model_config,
        "train_config": asdict(config),
        "data": asdict(source),
        "n_items": data.n_items,
        "n_users": data.n_users,
        "n_train_examples": int(len(split.train_targets)),
        "item_ids": data.item_ids.tolist(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if dist_info.is_main:
        # Only now: a bad data file or model option leaves no run directory behind.
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_json(run_dir / "run.json", meta)
        np.save(run_dir / "item_popularity.npy", popularity[1:])

    sequences = DeviceSequences.from_data(data, device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    history: list[dict[str, Any]] = []
    best_score, best_epoch, start_epoch = -math.inf, -1, 0
    checkpoint_path = run_dir / "checkpoint.pt"
    if resume and checkpoint_path.is_file():
        state = torch.load(checkpoint_path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, best_score, best_epoch = (
            state["epoch"] + 1,
            state["best_score"],
            state["best_epoch"],
        )
        history = json.loads((run_dir / "history.json").read_text())
    writer = _tensorboard(run_dir) if dist_info.is_main else None
    use_amp = config.amp and device.type == "cuda"
    # The same generator seed on every rank: all ranks draw the same permutation and each
    # takes its own stride of it, so the shards are disjoint and cover the epoch.
    generator = torch.Generator(device=device).manual_seed(config.seed)
    started = time.monotonic()
    trainable = any(p.requires_grad for p in model.parameters()) and model_name != "popularity"
    epochs = config.epochs if trainable else 1
    loss_module: torch.nn.Module = _LossModule(model)
    if dist_info.world_size > 1 and trainable:
        # Unused parameters exist in some variants (the U-Net of "mixed attention only").
        loss_module = torch.nn.parallel.DistributedDataParallel(
            loss_module,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True,
        )
    if config.compile and trainable:
        loss_module = torch.compile(loss_module)  # type: ignore[assignment]
    stop_reason = "max_epochs"
    epoch_targets: np.ndarray | None = None
    for epoch in range(start_epoch, epochs):
        model.train()
        # The same draw on every rank (seeded by the run's seed and the epoch); copied to
        # the device only when the model drew other targets than last epoch's.
        drawn = model.training_targets(
            split.train_targets, split.train_users, np.random.default_rng([config.seed, epoch])
        )
        if drawn is not epoch_targets:
            epoch_targets = drawn
            train_targets = torch.as_tensor(drawn, device=device)
        order = train_targets[
            torch.randperm(len(train_targets), device=device, generator=generator)
        ]
        order = order[dist_info.rank :: dist_info.world_size]
        if dist_info.world_size > 1:
            # Equal shard lengths: every rank must run the same number of steps.
            order = order[: len(train_targets) // dist_info.world_size]
        if trainable:
            model.prepare_epoch(lambda chunk: sequences.batch(chunk, max_len), order)
        n_batches = math.ceil(len(order) / config.batch_size) if trainable else 0
        if config.compile:
            # Whole batches only: a smaller last batch would recompile the graph.
            n_batches = max(len(order) // config.batch_size, 1) if trainable else 0
        totals: dict[str, torch.Tensor] = {}
        epoch_start = time.monotonic()
        bar = tqdm(
            range(n_batches), desc=f"epoch {epoch}", disable=not config.progress, leave=False
        )
        for index in bar:
            batch = sequences.batch(
                order[index * config.batch_size : (index + 1) * config.batch_size], max_len
            )
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                loss, parts = loss_module(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            for name, value in {"loss": loss.detach(), **parts}.items():
                totals[name] = totals.get(name, 0.0) + value.float()
        train_seconds = time.monotonic() - epoch_start
        losses = {k: float(v) / max(n_batches, 1) for k, v in totals.items()}
        if not dist_info.is_main:
            # Rank 0 evaluates and writes; the others wait for its stop decision.
            if _broadcast_stop(dist_info, device, None):
                break
            continue
        valid = evaluate(model, sequences, split.valid_targets, max_len, config.exclude_seen)
        record = {
            "epoch": epoch,
            "train_seconds": train_seconds,
            **{f"train_{k}": v for k, v in losses.items()},
            **{f"valid_{k}": v for k, v in valid.items()},
        }
        history.append(record)
        if writer is not None:
            for key, value in record.items():
                if key != "epoch":
                    writer.add_scalar(key.replace("_", "/", 1), value, epoch)
        score = valid[config.select_metric]
        if score > best_score:
            best_score, best_epoch = score, epoch
            torch.save(model.state_dict(), run_dir / "model.pt")
        if config.progress:
            tqdm.write(
                f"epoch {epoch}: loss {losses.get('loss', 0.0):.4f} "
                f"valid {config.select_metric} {score:.4f} recall@20 {valid['recall@20']:.4f} "
                f"({train_seconds:.1f}s)"
            )
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "epoch": epoch,
                "best_score": best_score,
                "best_epoch": best_epoch,
            },
            checkpoint_path,
        )
        _write_json(run_dir / "history.json", history)
        out_of_time = (
            config.max_minutes is not None
            and (time.monotonic() - started) / 60 > config.max_minutes
        )
        patience_out = epoch - best_epoch >= config.patience
        stop = patience_out or out_of_time
        if stop:
            stop_reason = "early_stopping" if patience_out else "max_minutes"
        if _broadcast_stop(dist_info, device, stop) or stop:
            break
    if writer is not None:
        writer.close()
    summary = {
        "best_epoch": best_epoch,
        f"best_valid_{config.select_metric}": best_score,
        "epochs_run": len(history),
        # True only when validation stopped improving for ``patience`` epochs; a run cut
        # by ``max_minutes`` (resume it) or by ``epochs`` has not converged by that test.
        "stopped_early": stop_reason == "early_stopping",
        "stop_reason": stop_reason,
        "train_minutes": (time.monotonic() - started) / 60,
    }
    meta.update(summary)
    if dist_info.is_main:
        _write_json(run_dir / "run.json", meta)
    if dist_info.world_size > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return summary


def _broadcast_stop(dist_info: Distributed, device: torch.device, stop: bool | None) -> bool:
    """Rank 0's early-stopping decision, shared with every rank (False without torchrun)."""
    if dist_info.world_size == 1:
        return False
    flag = torch.tensor([1 if stop else 0], device=device)
    torch.distributed.broadcast(flag, src=0)
    return bool(flag.item())


def _tensorboard(run_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional; training works without it
        return None
    return SummaryWriter(log_dir=str(run_dir / "tb"))


def load_run(run_dir: Path, device: str = "cpu") -> LoadedRun:
    """Rebuild a trained model (best weights), its data and split from a run directory."""
    run_dir = Path(run_dir)
    meta = json.loads((run_dir / "run.json").read_text())
    source = DataSource(**meta["data"])
    data = load_sequences(Path(source.path), source.format, source.min_length)
    if data.item_ids.tolist() != meta["item_ids"]:
        raise ValueError(f"{source.path}: the data changed since {run_dir} was trained")
    split = leave_one_out(data)
    popularity = item_popularity(data, split.train_targets)
    model = build_model(meta["model_name"], data.n_items, meta["model_config"], popularity)
    state = torch.load(run_dir / "model.pt", map_location=device, weights_only=True)
    model.load_state_dict(state)
    model.to(device).eval()
    return LoadedRun(model=model, meta=meta, data=data, split=split, popularity=popularity)


def evaluate_run(
    run_dir: Path, device: str = "auto", seeds: int = 1, xhat_probe: str = "none"
) -> dict[str, Any]:
    """Validation and test metrics of a run, beside the popularity baseline; writes
    metrics.json, or with ``xhat_probe`` ("only": xhat itself as the query, "zero": the
    tower fed a zero xhat; diffusion models only) metrics-xhat-PROBE.json."""
    if xhat_probe not in ("none", "only", "zero"):
        raise ValueError(f"xhat_probe is 'none', 'only' or 'zero', not {xhat_probe!r}")
    dev = pick_device(device)
    run = load_run(run_dir, str(dev))
    if xhat_probe != "none":
        if not getattr(getattr(run.model, "config", None), "use_diffusion", False):
            raise ValueError(f"{run.meta['model_name']} has no diffusion to probe")
        run.model.xhat_probe = xhat_probe  # type: ignore[assignment]
    max_len = int(run.meta["model_config"]["max_seq_len"])
    exclude = bool(run.meta["train_config"].get("exclude_seen", True))
    sequences = DeviceSequences.from_data(run.data, dev)
    popularity = build_model("popularity", run.data.n_items, {}, run.popularity).to(dev)
    result: dict[str, Any] = {
        "model_name": run.meta["model_name"],
        "exclude_seen": exclude,
        "xhat_probe": xhat_probe,
    }
    for name, model in ((run.meta["model_name"], run.model), ("popularity", popularity)):
        result[name] = {
            "valid": evaluate(model, sequences, run.split.valid_targets, max_len, exclude),
            "test": evaluate(model, sequences, run.split.test_targets, max_len, exclude),
        }
    out = "metrics.json" if xhat_probe == "none" else f"metrics-xhat-{xhat_probe}.json"
    _write_json(Path(run_dir) / out, result)
    return result
