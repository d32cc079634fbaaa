"""Pack a GPU call's training runs into files that fit the device tool's return limits.

``python bench/pack_runs.py OUT_DIR RUNS_DIR...`` writes ``OUT_DIR/results.tgz`` (every
run without checkpoints or TensorBoard files) and ``OUT_DIR/ckpt-N.tar`` (the
``checkpoint.pt`` and best ``model.pt`` of each run that has not stopped early, at most
``--part-mb`` per tar, ``--first`` runs first; the device returns 8 files, 64 MB in all),
so a later call can ``--resume`` the unfinished runs to early stopping.  ``--model PAT``
also packs the best ``model.pt`` of finished runs whose path has PAT (to export and serve
them here), into ``models.tar``.
"""

from __future__ import annotations

import argparse
import json
import tarfile
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--part-mb", type=float, default=15.5)
    parser.add_argument(
        "--first", action="append", default=[], help="pack runs whose path has this first"
    )
    parser.add_argument(
        "--model", action="append", default=[], help="bring back model.pt of runs with PAT"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    unfinished: list[Path] = []
    wanted: list[Path] = []
    with tarfile.open(args.out / "results.tgz", "w:gz") as tar:
        for root in args.runs:
            tar.add(
                root,
                filter=lambda info: (
                    None
                    if info.name.endswith(("checkpoint.pt", "model.pt")) or "/tb" in info.name
                    else info
                ),
            )
            for meta_path in sorted(root.glob("*/run.json")):
                meta = json.loads(meta_path.read_text())
                checkpoint = meta_path.parent / "checkpoint.pt"
                if not meta.get("stopped_early") and checkpoint.is_file():
                    unfinished.append(checkpoint)
                best = meta_path.parent / "model.pt"
                if any(key in str(best) for key in args.model) and best.is_file():
                    wanted.append(best)
    if wanted:
        with tarfile.open(args.out / "models.tar", "w") as models:
            for best in wanted:
                models.add(best)
    # The rows that matter most first, in case the return limit drops the last tars.
    unfinished.sort(key=lambda path: not any(key in str(path) for key in args.first))
    part, size, tar = 0, 0.0, None
    for checkpoint in unfinished:
        best = checkpoint.parent / "model.pt"  # a resumed run that never improves needs it
        mb = (checkpoint.stat().st_size + best.stat().st_size) / 2**20
        if tar is None or size + mb > args.part_mb:
            if tar is not None:
                tar.close()
            tar, size, part = tarfile.open(args.out / f"ckpt-{part}.tar", "w"), 0.0, part + 1
        tar.add(checkpoint)
        tar.add(best)
        size += mb
    if tar is not None:
        tar.close()
    print(f"packed {len(unfinished)} unfinished checkpoint(s) into {part} tar(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
