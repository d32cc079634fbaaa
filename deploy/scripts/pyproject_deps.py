#!/usr/bin/env python3
"""Print the requirements of pyproject.toml (core + chosen extras), one per line.

The Dockerfile installs these *before* it copies the source, so the heavy dependency layer
is rebuilt only when pyproject.toml changes, then installs the project itself with
``--no-deps``.  The result is what ``pip install .[EXTRA,...]`` would install.

``--exclude NAME`` drops a requirement by project name: the GPU image installs the ``gpu``
extra instead of the CPU builds of the same modules (``onnxruntime`` and
``onnxruntime-gpu`` both provide the ``onnxruntime`` package, ``faiss-cpu`` and
``faiss-gpu-cu12`` both provide ``faiss``: installed together they overwrite each other).

Standard library only (tomllib, Python 3.11+): it runs in a bare build stage.

    python pyproject_deps.py pyproject.toml serve > requirements.txt
    python pyproject_deps.py pyproject.toml serve gpu --exclude onnxruntime --exclude faiss-cpu
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
_SELF_EXTRAS = re.compile(r"\[([^\]]*)\]")


def canonical(name: str) -> str:
    """PEP 503 normalised project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    match = _NAME.match(requirement)
    if match is None:
        raise ValueError(f"cannot read a project name from requirement {requirement!r}")
    return canonical(match.group(1))


def requirements(pyproject: Path, extras: list[str], exclude: list[str] | None = None) -> list[str]:
    """Core dependencies plus those of ``extras``, de-duplicated, order kept."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [extra for extra in extras if extra not in optional]
    if unknown:
        raise SystemExit(f"unknown extra(s) {unknown}; pyproject.toml has {sorted(optional)}")
    dropped = {canonical(name) for name in exclude or []}
    own = canonical(project["name"])
    out: list[str] = []
    seen_extras: set[str] = set()
    pending = [*project.get("dependencies", []), *(f"{own}[{e}]" for e in extras)]
    while pending:
        requirement = pending.pop(0)
        name = requirement_name(requirement)
        if name == own:
            # An extra, or a self-reference such as "t2diff-recall[serve]" inside another
            # extra: expand it in place.
            for extra in _SELF_EXTRAS.search(requirement).group(1).split(","):
                extra = extra.strip()
                if extra not in optional:
                    raise SystemExit(f"unknown extra {extra!r} in {requirement!r}")
                if extra not in seen_extras:
                    seen_extras.add(extra)
                    pending[0:0] = optional[extra]
            continue
        if name in dropped or requirement in out:
            continue
        out.append(requirement)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pyproject", type=Path)
    parser.add_argument("extras", nargs="*")
    parser.add_argument("--exclude", action="append", default=[], metavar="NAME")
    args = parser.parse_args(argv)
    sys.stdout.write(
        "".join(f"{r}\n" for r in requirements(args.pyproject, args.extras, args.exclude))
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
