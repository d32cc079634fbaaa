"""Model names -> constructors, so the trainer, evaluator and CLI never special-case one.

``MODELS`` is the one table: each name has a config dataclass (its fields are the options
``make_config`` accepts), the overrides that define the variant, and a builder.  Adding a
model is adding a row.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from model.base import SequentialRecommender
from model.baselines import (
    GRU4Rec,
    GRU4RecConfig,
    SASRec,
    SASRecConfig,
    TwoTower,
    TwoTowerConfig,
)
from model.dimerec import DimeRec, DimeRecConfig
from model.popularity import Popularity
from model.t2diff import T2Diff, T2DiffConfig

# The builder gets (n_items, config instance, training item popularity or None).
Builder = Callable[[int, Any, "np.ndarray | None"], SequentialRecommender]


@dataclass
class PopularityConfig:
    max_seq_len: int = 50  # only sets the evaluation windows; the model reads no history


@dataclass(frozen=True)
class ModelSpec:
    config_class: type
    build: Builder
    fixed: Mapping[str, Any] = field(default_factory=dict)  # overrides defining the variant


def _plain(model_class: Callable[[int, Any], SequentialRecommender]) -> Builder:
    return lambda n_items, config, popularity: model_class(n_items, config)


# name -> overrides of T2DiffConfig that define the variant
T2DIFF_VARIANTS: dict[str, dict[str, Any]] = {
    "t2diff": {},
    "mixed_attention": {"use_diffusion": False},
    "t2diff_no_dp": {"drift": False},
    "t2diff_linear": {"schedule": "linear"},
    "t2diff_log": {"schedule": "log"},
    "t2diff_T10": {"diffusion_steps": 10},
    "t2diff_T200": {"diffusion_steps": 200},
    # The causal-transformer encoder over the whole window, trained on every position, the
    # tower fed the served (T-step reverse) xhat; docs/model.md, "the causal encoder".
    "t2diff_causal": {
        "encoder": "causal",
        "dense_loss": True,
        "tower_xhat": "reverse",
        "dropout": 0.2,
    },
    "mixed_attention_causal": {
        "encoder": "causal",
        "dense_loss": True,
        "use_diffusion": False,
        "dropout": 0.2,
    },
}

# name -> overrides of DimeRecConfig that define the variant (paper Table 4's ablations)
DIMEREC_VARIANTS: dict[str, dict[str, Any]] = {
    "dimerec": {},
    "comirec_sa": {"use_diffusion": False},  # the GEM alone
    "dimerec_no_gem": {"gem_weight": 0.0},
    "dimerec_no_recon": {"recon_weight": 0.0},
    "dimerec_no_ssm": {"ssm_weight": 0.0},
    "dimerec_no_grw": {"geodesic": False},
}

MODELS: dict[str, ModelSpec] = {
    **{
        name: ModelSpec(T2DiffConfig, T2Diff, fixed)  # takes the popularity (sampled softmax)
        for name, fixed in T2DIFF_VARIANTS.items()
    },
    **{
        name: ModelSpec(DimeRecConfig, _plain(DimeRec), fixed)
        for name, fixed in DIMEREC_VARIANTS.items()
    },
    "popularity": ModelSpec(
        PopularityConfig, lambda n_items, config, popularity: Popularity(n_items, popularity)
    ),
    "sasrec": ModelSpec(SASRecConfig, _plain(SASRec)),
    "gru4rec": ModelSpec(GRU4RecConfig, _plain(GRU4Rec)),
    "two_tower": ModelSpec(TwoTowerConfig, _plain(TwoTower)),
}


def model_names() -> list[str]:
    return sorted(MODELS)


def _spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(model_names())}")
    return MODELS[name]


def make_config(name: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The full config dict of ``name`` with user ``overrides`` applied (unknown keys fail)."""
    spec = _spec(name)
    overrides = dict(overrides or {})
    known = {f.name for f in fields(spec.config_class)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown option(s) for {name}: {sorted(unknown)}")
    # A value of the wrong type (``--set unet_width=abc``) would otherwise fail deep in the
    # model's constructor with an unrelated message: check it against the default's type.
    defaults = asdict(spec.config_class(**spec.fixed))
    for key, value in overrides.items():
        default = defaults[key]
        if isinstance(default, bool) or default is None:
            ok = default is None or isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            value = float(value) if ok else value
        else:
            ok = isinstance(value, type(default))
        if not ok:
            raise ValueError(
                f"option {key} of {name} takes a {type(default).__name__} "
                f"(default {default!r}), not {value!r}"
            )
        overrides[key] = value
    return asdict(spec.config_class(**{**spec.fixed, **overrides}))


def build_model(
    name: str, n_items: int, config: dict[str, Any], popularity: np.ndarray | None = None
) -> SequentialRecommender:
    """``name``'s model from a config dict (normally ``make_config``'s; missing keys take
    the variant's values, then the defaults)."""
    spec = _spec(name)
    return spec.build(n_items, spec.config_class(**{**spec.fixed, **config}), popularity)
