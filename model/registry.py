"""Model names -> constructors, so the trainer, evaluator and CLI never special-case one."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from typing import Any

import numpy as np

from model.base import SequentialRecommender
from model.popularity import Popularity
from model.t2diff import T2Diff, T2DiffConfig

# name -> (config class, fixed overrides that define the variant)
T2DIFF_VARIANTS: dict[str, dict[str, Any]] = {
    "t2diff": {},
    "mixed_attention": {"use_diffusion": False},
    "t2diff_no_dp": {"drift": False},
    "t2diff_linear": {"schedule": "linear"},
    "t2diff_log": {"schedule": "log"},
    "t2diff_T10": {"diffusion_steps": 10},
    "t2diff_T200": {"diffusion_steps": 200},
}


def model_names() -> list[str]:
    return sorted([*T2DIFF_VARIANTS, "popularity"])


def make_config(name: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The full config dict of ``name`` with user ``overrides`` applied (unknown keys fail)."""
    overrides = dict(overrides or {})
    if name == "popularity":
        return {"max_seq_len": int(overrides.pop("max_seq_len", 50))}
    if name not in T2DIFF_VARIANTS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(model_names())}")
    known = {f.name for f in fields(T2DiffConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown option(s) for {name}: {sorted(unknown)}")
    return T2DiffConfig(**{**T2DIFF_VARIANTS[name], **overrides}).to_dict()


def build_model(
    name: str, n_items: int, config: dict[str, Any], popularity: np.ndarray | None = None
) -> SequentialRecommender:
    builders: dict[str, Callable[[], SequentialRecommender]] = {
        "popularity": lambda: Popularity(n_items, popularity),
    }
    if name in builders:
        return builders[name]()
    return T2Diff(n_items, T2DiffConfig(**config))
