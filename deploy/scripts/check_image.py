#!/usr/bin/env python3
"""Build-time sanity check of an image's Python environment (used by the Dockerfile).

    python check_image.py --present onnxruntime-gpu --absent onnxruntime --import service.app

``--present``/``--absent`` look at installed distributions only (importlib.metadata), so
they also work where importing would need hardware the build machine lacks (CUDA).
Exits 1 listing every violated expectation.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib.metadata import PackageNotFoundError, version


def installed(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def problems(present: list[str], absent: list[str], imports: list[str]) -> list[str]:
    out = [f"{name} is not installed" for name in present if installed(name) is None]
    out += [f"{name} {installed(name)} must not be installed" for name in absent if installed(name)]
    for module in imports:
        try:
            importlib.import_module(module)
        except Exception as exc:  # report every failure, whatever its kind
            out.append(f"import {module} failed: {exc!r}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--present", nargs="+", default=[], metavar="DIST")
    parser.add_argument("--absent", nargs="+", default=[], metavar="DIST")
    parser.add_argument("--import", dest="imports", nargs="+", default=[], metavar="MODULE")
    args = parser.parse_args(argv)
    found = problems(args.present, args.absent, args.imports)
    for line in found:
        print(f"check_image: {line}", file=sys.stderr)
    if not found:
        print("check_image: ok")
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
