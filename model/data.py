"""Interaction logs: the synthetic generator, loaders, and the leave-one-out split.

Data crosses into training as a :class:`SequenceData`: flat, time-ordered token arrays with
per-user offsets (CSR layout), so a batch of training windows is gathered with index
arithmetic on the GPU instead of per-sample Python.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

INTERACTIONS_FILE = "interactions.csv"
COLUMNS = ("user_id", "item_id", "timestamp")
# Other names of the columns, as the shared MovieLens-1M file spells them (position = time).
COLUMN_ALIASES = {"movie_id": "item_id", "position": "timestamp"}


class DataError(ValueError):
    """An input file is missing, malformed or too small to split."""


# --------------------------------------------------------------------------- synthetic


def synthesize(
    n_users: int = 2000,
    n_items: int = 1000,
    n_clusters: int = 20,
    sessions_per_user: tuple[int, int] = (3, 8),
    session_length: tuple[int, int] = (3, 10),
    zipf_a: float = 1.1,
    seed: int = 0,
) -> pd.DataFrame:
    """A log a sequential model can learn and a popularity model cannot fully exploit.

    * items are split into ``n_clusters`` clusters; inside a cluster items have a Zipf-like
      popularity, and a session walks the cluster: after item j the next is usually one of
      the next few items of the same cluster (short-term sequential structure);
    * each session stays in one cluster; the next session's cluster follows a sparse Markov
      chain over clusters that each user perturbs with a personal favourite (interest drift
      across sessions);
    * sessions are separated by gaps of hours to days, behaviours inside one by seconds to
      minutes, so a time-gap session rule recovers them.
    """
    if n_items < n_clusters or n_clusters < 2:
        raise DataError("need n_items >= n_clusters >= 2")
    rng = np.random.default_rng(seed)
    cluster_of_item = np.sort(rng.integers(0, n_clusters, size=n_items))
    members = [np.flatnonzero(cluster_of_item == c) for c in range(n_clusters)]
    members = [m if len(m) else np.array([c % n_items]) for c, m in enumerate(members)]
    # Cluster transitions: mostly to one of two "successor" clusters.
    successors = np.stack([rng.permutation(n_clusters)[:2] for _ in range(n_clusters)])
    rows_user: list[np.ndarray] = []
    rows_item: list[np.ndarray] = []
    rows_time: list[np.ndarray] = []
    base_time = 1_700_000_000.0
    for user in range(n_users):
        favourite = int(rng.integers(n_clusters))
        seen: set[int] = set()
        cluster = favourite
        now = base_time + float(rng.uniform(0, 30 * 86400))
        n_sessions = int(rng.integers(sessions_per_user[0], sessions_per_user[1] + 1))
        for _ in range(n_sessions):
            pool = members[cluster]
            length = int(rng.integers(session_length[0], session_length[1] + 1))
            ranks = np.minimum(rng.zipf(zipf_a, size=1) - 1, len(pool) - 1)
            position = int(ranks[0])
            steps = rng.integers(1, 4, size=length)
            chosen: list[int] = []
            for step in steps:
                # Walk forward through the cluster, skipping items this user already had:
                # MovieLens-like logs have no repeats, and evaluation excludes seen items.
                for _ in range(len(pool)):
                    candidate = int(pool[position % len(pool)])
                    position += 1
                    if candidate not in seen:
                        break
                else:
                    break
                seen.add(candidate)
                chosen.append(candidate)
                position += int(step) - 1
            if not chosen:
                continue
            items = np.asarray(chosen)
            length = len(items)
            gaps = rng.exponential(60.0, size=length) + 1.0
            times = now + np.cumsum(gaps)
            rows_user.append(np.full(length, user))
            rows_item.append(items)
            rows_time.append(times)
            now = float(times[-1]) + float(rng.uniform(3 * 3600, 3 * 86400))
            roll = rng.random()
            if roll < 0.6:
                cluster = int(successors[cluster, 0])
            elif roll < 0.8:
                cluster = int(successors[cluster, 1])
            else:
                cluster = favourite
    users = np.concatenate(rows_user)
    return pd.DataFrame(
        {
            "user_id": np.char.add("u", users.astype(str)),
            "item_id": np.char.add("i", np.concatenate(rows_item).astype(str)),
            "timestamp": np.round(np.concatenate(rows_time), 3),
        }
    )


def write_synthetic(out_dir: Path, **kwargs: int) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = synthesize(**kwargs)
    path = out_dir / INTERACTIONS_FILE
    frame.to_csv(path, index=False)
    return path


# --------------------------------------------------------------------------- loaders


def load_interactions(path: Path, fmt: str = "auto") -> pd.DataFrame:
    """Read a log as a frame with string ``user_id``/``item_id`` and float ``timestamp``.

    ``fmt``: ``auto`` (by name), ``csv``, ``tsv``, ``parquet``, ``ml-1m`` (the shared
    ``sequences.tsv``: position is the time), ``ml-100k`` (``u.data``).  A directory means its
    ``interactions.csv``.
    """
    path = Path(path)
    if path.is_dir():
        for candidate, kind in (
            (INTERACTIONS_FILE, "csv"),
            ("sequences.tsv", "ml-1m"),
            ("u.data", "ml-100k"),
        ):
            if (path / candidate).is_file():
                return load_interactions(path / candidate, kind if fmt == "auto" else fmt)
        raise DataError(f"{path}: no interactions.csv, sequences.tsv or u.data inside")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if fmt == "auto":
        fmt = {
            "sequences.tsv": "ml-1m",
            "u.data": "ml-100k",
        }.get(path.name, path.suffix.lstrip(".").lower())
    try:
        if fmt == "ml-1m":
            frame = pd.read_csv(path, sep="\t", dtype={"user_id": str, "movie_id": str})
            frame = frame.rename(columns=COLUMN_ALIASES)
        elif fmt == "ml-100k":
            frame = pd.read_csv(
                path,
                sep="\t",
                header=None,
                names=["user_id", "item_id", "rating", "timestamp"],
                dtype={"user_id": str, "item_id": str},
            )
        elif fmt in ("csv", "tsv"):
            frame = pd.read_csv(
                path,
                sep="," if fmt == "csv" else "\t",
                dtype={"user_id": str, "item_id": str, "movie_id": str},
            )
            # A log in the shared MovieLens layout under another name (``movie_id``,
            # ``position`` as the time) reads the same as ``sequences.tsv``.
            frame = frame.rename(columns=COLUMN_ALIASES)
        elif fmt == "parquet":
            frame = pd.read_parquet(path)
        else:
            raise DataError(f"{path}: unknown format {fmt!r}")
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{path}: cannot parse as {fmt}: {exc}") from exc
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; need {list(COLUMNS)}")
    frame = frame[list(COLUMNS)].copy()
    frame["user_id"] = frame["user_id"].astype(str)
    frame["item_id"] = frame["item_id"].astype(str)
    frame["timestamp"] = pd.to_numeric(frame["timestamp"], errors="coerce").astype(float)
    if frame["timestamp"].isna().any():
        raise DataError(f"{path}: non-numeric timestamps")
    return frame


# --------------------------------------------------------------------------- sequences


@dataclass
class SequenceData:
    """Time-ordered behaviour sequences in CSR layout.

    ``items[offsets[u]:offsets[u+1]]`` are user ``u``'s tokens oldest first; token ``t``
    (1..n_items) is the raw item id ``item_ids[t-1]``; 0 is padding.
    """

    user_ids: np.ndarray  # [U] raw user ids (str)
    item_ids: np.ndarray  # [N] raw item ids (str)
    offsets: np.ndarray  # [U+1] int64
    items: np.ndarray  # [total] int64 tokens
    timestamps: np.ndarray  # [total] float64 seconds

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def to_sequences(frame: pd.DataFrame, min_length: int = 3) -> SequenceData:
    """Order each user's log by time (stable, so file order breaks ties); drop short users."""
    frame = frame.sort_values(["user_id", "timestamp"], kind="stable")
    counts = frame.groupby("user_id", sort=True).size()
    keep = counts[counts >= min_length].index
    frame = frame[frame["user_id"].isin(keep)]
    if frame.empty:
        raise DataError(f"no user has at least {min_length} interactions")
    item_ids, tokens = np.unique(frame["item_id"].to_numpy(), return_inverse=True)
    user_ids, user_codes = np.unique(frame["user_id"].to_numpy(), return_inverse=True)
    counts = np.bincount(user_codes, minlength=len(user_ids))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return SequenceData(
        user_ids=user_ids.astype(str),
        item_ids=item_ids.astype(str),
        offsets=offsets,
        items=(tokens + 1).astype(np.int64),
        timestamps=frame["timestamp"].to_numpy(dtype=np.float64),
    )


def load_sequences(path: Path, fmt: str = "auto", min_length: int = 3) -> SequenceData:
    return to_sequences(load_interactions(path, fmt), min_length=min_length)


@dataclass
class LeaveOneOut:
    """Target positions (indices into ``SequenceData.items``) of each split.

    A target at flat position ``p`` of user ``u`` is predicted from ``items[offsets[u]:p]``.
    Test = each user's last item, validation = second-to-last, training = every earlier
    position that has at least one behaviour before it.
    """

    train_targets: np.ndarray
    train_users: np.ndarray
    valid_targets: np.ndarray
    test_targets: np.ndarray
    eval_users: np.ndarray  # user index of valid_targets[i] / test_targets[i]


def leave_one_out(data: SequenceData) -> LeaveOneOut:
    lengths = data.lengths
    if (lengths < 3).any():
        raise DataError("leave-one-out needs at least 3 interactions per user")
    starts, ends = data.offsets[:-1], data.offsets[1:]
    n_train = lengths - 3  # targets start+1 .. end-3
    train_users = np.repeat(np.arange(data.n_users), n_train)
    within = np.arange(n_train.sum()) - np.repeat(np.cumsum(n_train) - n_train, n_train)
    train_targets = starts[train_users] + 1 + within
    return LeaveOneOut(
        train_targets=train_targets.astype(np.int64),
        train_users=train_users.astype(np.int64),
        valid_targets=(ends - 2).astype(np.int64),
        test_targets=(ends - 1).astype(np.int64),
        eval_users=np.arange(data.n_users, dtype=np.int64),
    )


def item_popularity(data: SequenceData, targets: np.ndarray | None = None) -> np.ndarray:
    """Interaction counts per token (index 0 = padding, always 0), from training data only
    when ``targets`` (the training target positions) is given plus each user's first item."""
    if targets is None:
        tokens = data.items
    else:
        tokens = np.concatenate([data.items[data.offsets[:-1]], data.items[targets]])
    return np.bincount(tokens, minlength=data.n_items + 1).astype(np.float64)
