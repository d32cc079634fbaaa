"""What a release operation raises.  The CLI prints ``error: <message>`` and exits with
``exit_code``; library callers (tests, the service's admin rollback) catch the class they
care about.  Plain Python: ``release.links`` and the service import it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from release.validate import ValidationReport


class ReleaseError(RuntimeError):
    """A release operation cannot be done (missing version, no previous version, busy)."""

    #: The ``t2diff`` exit code: 1 for a refused or failed operation.
    exit_code = 1


class ReleaseUsageError(ReleaseError):
    """The request itself is wrong (conflicting options, an existing version): exit 2, the
    code typer uses for bad options, so a cron wrapper can tell it from a failed night."""

    exit_code = 2


class RebuildError(ReleaseError):
    """A rebuild step cannot go on (no trained run, no model.pt); the message is the reason.

    Raised inside :func:`release.pipeline.rebuild` and reported through
    :class:`RebuildFailed`, whose reason is this message verbatim."""


class ValidationFailed(ReleaseError):
    """A version failed the release checks; ``report`` holds every check's outcome."""

    def __init__(self, message: str, report: ValidationReport) -> None:
        super().__init__(message)
        self.report = report


class RebuildFailed(ReleaseError):
    """A rebuild failed after it started writing: the new version was removed (or hidden
    with ``keep_failed``), a ``failed`` entry was appended to ``releases.jsonl`` and the
    ``current`` links were not touched.  ``__cause__`` is the step's own exception (a
    :class:`ValidationFailed` when ``step == "validate"``)."""

    def __init__(
        self,
        *,
        version: str,
        served: str | None,
        step: str,
        reason: str,
        kept: list[Path],
        report: ValidationReport | None = None,
    ) -> None:
        where = f" (kept in {', '.join(map(str, kept))})" if kept else ""
        super().__init__(
            f"rebuild {version} failed, still serving {served or 'nothing'}{where}: {reason}"
        )
        self.version = version
        self.served = served
        self.step = step
        self.reason = reason
        self.kept = kept
        self.report = report
