"""Release validation: is a freshly built (artifacts, index) version fit to be served?

:func:`validate_version` (what ``t2diff rebuild``, ``promote`` and ``release validate`` run)
validates ``ROOT``'s version against the served one with :func:`validate_release`, before
anything switches the ``current`` links (:mod:`release.links`); any failed check keeps the
served version.  Checks, each named in the report:

* ``checksums``: both manifests verify (every listed file present, right size and SHA-256);
* ``artifacts``: the export is well formed (:func:`index_builder.build.load_artifacts`:
  kinds, ids, ``num_items``/``embedding_dim`` agree with the files, no NaN/inf embedding);
* ``index``: the index loads (:func:`index_builder.loaded.load_index`) and agrees with its
  manifest;
* ``consistency``: the contracts' one pair check (:func:`contracts.manifest.pair_mismatches`:
  the same ``model_version`` and ``embedding_dim``, one vector per item, the same item ids
  in the same order);
* ``tower_dim``: the user tower's ONNX output ``user_embedding`` has the index's dimension
  (read from the graph's declared shape; skipped with a note when the graph declares none);
* ``item_count``: ``num_items`` within ``[min_ratio, max_ratio]`` times the previously
  served version's (skipped when there is none);
* ``recall``: recall@``k`` of the index with its manifest's ``nprobe``/``k_factor``
  against exact inner-product search on ``n_queries`` queries (the export's
  ``query_embeddings.npy`` when present, else user-like sampled queries) >= ``min_recall``;
  scores returned are finite;
* ``serving`` (only with ``serving_check``, which :func:`validate_version` always passes:
  :func:`serving_check` -> :func:`service.release_check.check_serving`): the version loads
  through the service's own loader, every graph the manifest names (the split parts, the
  one-request part) opens and a warm-up recall answers.  It runs after the checks above
  passed, and the service is imported only then.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from contracts.manifest import (
    USER_TOWER_FILE,
    ArtifactError,
    IndexManifest,
    pair_mismatches,
    read_manifest,
)
from index_builder.build import exact_topk, load_artifacts, sample_queries
from index_builder.loaded import configure_threads, load_index
from release.errors import RebuildError
from release.links import artifacts_dir as version_artifacts_dir
from release.links import current_version
from release.links import index_dir as version_index_dir
from release.settings import (
    DEFAULT_MAX_RATIO,
    DEFAULT_MIN_RATIO,
    DEFAULT_MIN_RECALL,
    DEFAULT_VALIDATION_QUERIES,
    ValidationThresholds,
)

TOWER_OUTPUT = "user_embedding"


@dataclass
class ValidationReport:
    """Outcome of :func:`validate_release`: ``ok`` when no check failed."""

    checks: dict[str, str] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failures

    def passed(self, name: str, note: str = "ok") -> None:
        self.checks[name] = note

    def failed(self, name: str, reason: str) -> None:
        self.checks[name] = "FAILED"
        self.failures[name] = reason

    def reason(self) -> str:
        return "; ".join(f"{name}: {why}" for name, why in self.failures.items())

    def lines(self) -> list[str]:
        """One line per check, as the ``t2diff`` commands print them."""
        return [f"  {name:<12} {note}" for name, note in self.checks.items()]

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checks": self.checks,
            "failures": self.failures,
            "metrics": self.metrics,
        }


def tower_output_dim(onnx_path: Path) -> int | None:
    """Last dimension of the tower's ``user_embedding`` output as declared in the graph.

    Reads the graph with ``onnx`` (weights not needed), else asks ONNX Runtime; None when
    neither is installed or the dimension is symbolic.
    """
    try:
        import onnx

        model = onnx.load(str(onnx_path), load_external_data=False)
        for output in model.graph.output:
            if output.name == TOWER_OUTPUT or len(model.graph.output) == 1:
                dims = output.type.tensor_type.shape.dim
                if dims and dims[-1].HasField("dim_value"):
                    return int(dims[-1].dim_value)
                return None
        return None
    except ImportError:
        pass
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    for output in session.get_outputs():
        if output.name == TOWER_OUTPUT and isinstance(output.shape[-1], int):
            return int(output.shape[-1])
    return None


def validate_release(
    artifacts_dir: Path,
    index_dir: Path,
    previous_index_dir: Path | None = None,
    min_recall: float = DEFAULT_MIN_RECALL,
    min_ratio: float = DEFAULT_MIN_RATIO,
    max_ratio: float = DEFAULT_MAX_RATIO,
    n_queries: int = DEFAULT_VALIDATION_QUERIES,
    k: int = 100,
    seed: int = 0,
    require_tower: bool = True,
    serving_check: Callable[[Path, Path], dict[str, Any]] | None = None,
) -> ValidationReport:
    """Run every check (see the module docstring); never raises for a bad version.

    ``serving_check(artifacts_dir, index_dir)``: loads the pair as the service would and
    answers a recall; returns what it exercised, raises with the reason.  Run last, and
    only when every other check passed.
    """
    report = ValidationReport()
    artifacts_dir, index_dir = Path(artifacts_dir), Path(index_dir)
    started = time.perf_counter()

    try:
        read_manifest(artifacts_dir, verify=True)
        read_manifest(index_dir, verify=True)
        report.passed("checksums")
    except ArtifactError as exc:
        report.failed("checksums", str(exc))
        return report

    try:
        export, embeddings, item_ids, user_queries = load_artifacts(artifacts_dir)
        report.passed("artifacts")
    except ArtifactError as exc:
        report.failed("artifacts", str(exc))
        return report

    try:
        loaded = load_index(index_dir)
        report.passed("index")
    except ArtifactError as exc:
        report.failed("index", str(exc))
        return report

    # The one pair check the service's loader and hot swap also run (load_artifacts has
    # already matched the export's files to its manifest).
    mismatches = pair_mismatches(
        export,
        loaded.manifest,
        export_item_ids=item_ids,
        index_item_ids=[str(i) for i in loaded.item_ids],
        index_dim=loaded.dim,
        index_vectors=loaded.ntotal,
    )
    if mismatches:
        # Searching a pair that disagrees is meaningless (or fails): stop here.
        report.failed("consistency", "; ".join(m.reason for m in mismatches))
        return report
    report.passed("consistency")

    tower = artifacts_dir / USER_TOWER_FILE
    if not export.lists(USER_TOWER_FILE):
        if require_tower:
            report.failed("tower_dim", f"{USER_TOWER_FILE} is not in the artifacts")
        else:
            report.passed("tower_dim", "skipped: no tower")
    else:
        try:
            tower_dim = tower_output_dim(tower)
        except Exception as exc:  # noqa: BLE001 - any parse failure means a bad tower
            report.failed("tower_dim", f"{tower}: unreadable ONNX graph ({exc})")
        else:
            if tower_dim is None:
                report.passed("tower_dim", "skipped: output dimension not declared")
            elif tower_dim != loaded.dim:
                report.failed(
                    "tower_dim", f"user tower outputs d={tower_dim}, index d={loaded.dim}"
                )
            else:
                report.passed("tower_dim")
            report.metrics["tower_dim"] = tower_dim

    n_items = len(embeddings)
    report.metrics["num_items"] = n_items
    if previous_index_dir is None:
        report.passed("item_count", "skipped: no previous version")
    else:
        try:
            previous_n = IndexManifest.load(Path(previous_index_dir), verify=False).num_items
        except ArtifactError as exc:
            report.passed("item_count", f"skipped: previous manifest unreadable ({exc})")
        else:
            ratio = n_items / max(previous_n, 1)
            report.metrics["item_ratio"] = round(ratio, 4)
            if min_ratio <= ratio <= max_ratio:
                report.passed("item_count", f"{n_items} items, {ratio:.2f}x previous")
            else:
                report.failed(
                    "item_count",
                    f"{n_items} items is {ratio:.2f}x the previous {previous_n} "
                    f"(allowed {min_ratio}..{max_ratio})",
                )

    if user_queries is not None and len(user_queries) > 0:
        queries = user_queries[:n_queries]
    else:
        queries = sample_queries(embeddings, n_queries, seed + 7)
    k = min(k, n_items)
    try:
        _, exact = exact_topk(embeddings, queries, k)
        scores, rows = loaded.search(queries, k)
    except (RuntimeError, ValueError) as exc:
        report.failed("recall", f"search failed ({exc})")
        return report
    hits = sum(len(np.intersect1d(r[r >= 0], e)) for r, e in zip(rows, exact, strict=True))
    recall = hits / (k * len(queries))
    report.metrics[f"recall_at_{k}"] = round(recall, 6)
    valid = rows >= 0
    if not np.isfinite(scores[valid]).all():
        report.failed("recall", "the index returned NaN/inf scores")
    elif recall < min_recall:
        report.failed("recall", f"recall@{k} {recall:.4f} < {min_recall} against exact search")
    else:
        report.passed("recall", f"recall@{k} {recall:.4f} >= {min_recall}")
    if serving_check is not None:
        if report.ok:
            try:
                serving = serving_check(artifacts_dir, index_dir)
            except Exception as exc:  # noqa: BLE001 - any failure: the service refuses it
                report.failed("serving", str(exc) or type(exc).__name__)
            else:
                report.metrics["serving"] = serving
                graphs = ", ".join(serving.get("graphs", []))
                report.passed("serving", f"loaded by the service ({graphs}), recall answered")
        else:
            report.passed("serving", "skipped: an earlier check failed")
    report.metrics["seconds"] = round(time.perf_counter() - started, 3)
    return report


def serving_check(artifacts: Path, index: Path) -> dict[str, Any]:
    """The ``serving`` check: the candidate loads through the service's own loader and
    answers a warm-up recall (``service.release_check``).  Without the serving extras it
    fails: a version nobody checked the service can load is not promoted."""
    try:
        from service.release_check import check_serving
    except ImportError as exc:
        raise RebuildError(
            f"cannot load the service to check the version (pip install .[serve]): {exc}"
        ) from exc
    return check_serving(artifacts, index)


def validate_version(
    root: Path, version: str, thresholds: ValidationThresholds | None = None
) -> ValidationReport:
    """Validate ``ROOT``'s ``version`` against the currently served one (its item count is
    the ``item_count`` check's reference), with the serving check; returns the report."""
    thresholds = thresholds or ValidationThresholds()
    configure_threads(os.cpu_count() or 1)
    current = current_version(root)
    previous_dir = version_index_dir(root, current) if current and current != version else None
    if previous_dir is not None and not previous_dir.is_dir():
        previous_dir = None
    return validate_release(
        version_artifacts_dir(root, version),
        version_index_dir(root, version),
        previous_index_dir=previous_dir,
        min_recall=thresholds.min_recall,
        min_ratio=thresholds.min_ratio,
        max_ratio=thresholds.max_ratio,
        n_queries=thresholds.queries,
        serving_check=serving_check,
    )
