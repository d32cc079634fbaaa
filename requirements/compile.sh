#!/usr/bin/env bash
# Regenerate the lock files from pyproject.toml (`make lock`).  Needs uv (`pip install uv`)
# and the package index; resolves for Linux x86-64 whatever machine runs it.
#
#   dev.lock        Python 3.11: .[train,serve,dev,loadtest]   make setup / make test / CI
#   train.lock      Python 3.11: .[train,serve]                trainer image
#   serve.lock      Python 3.11: .[serve] (no torch)           cpu serving image
#   serve-gpu.lock  Python 3.12: .[serve,gpu] without onnxruntime and faiss-cpu
#                   (gpu-pins.txt)                             gpu serving image
#
# The CPU locks pin the CPU build of torch (torch-cpu.txt), found through TORCH_LINKS
# (PyTorch's CPU index page by default; a local wheel directory works too:
# `make lock TORCH_LINKS=/opt/wheels`).  dev.lock is resolved first and constrains the
# others, so a package has one version in every lock.  Upgrading: `make lock` resolves
# the newest releases within pyproject's ranges (uv's --upgrade); run `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."
UV=${UV:-uv}
TORCH_LINKS=${TORCH_LINKS:-https://download.pytorch.org/whl/cpu/torch/}
common=(--upgrade --quiet --custom-compile-command "make lock" --python-platform x86_64-manylinux_2_28)
cpu=("${common[@]}" --python-version 3.11 --find-links "$TORCH_LINKS" -c requirements/torch-cpu.txt)

"$UV" pip compile pyproject.toml "${cpu[@]}" \
    --extra train --extra serve --extra dev --extra loadtest -o requirements/dev.lock
"$UV" pip compile pyproject.toml "${cpu[@]}" -c requirements/dev.lock \
    --extra train --extra serve -o requirements/train.lock
"$UV" pip compile pyproject.toml "${cpu[@]}" -c requirements/dev.lock \
    --extra serve -o requirements/serve.lock
python3 deploy/scripts/pyproject_deps.py pyproject.toml serve gpu \
        --exclude onnxruntime --exclude faiss-cpu \
    | "$UV" pip compile - "${common[@]}" --python-version 3.12 \
        -c requirements/gpu-pins.txt -c requirements/serve.lock -o requirements/serve-gpu.lock
