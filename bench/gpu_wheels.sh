#!/usr/bin/env bash
# Download, into .whl/, the wheels that bench/gpu_pipeline.py needs on a GPU machine that has
# torch and transformers but not the rest (Python 3.12, x86-64 Linux), at the versions of .venv.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
names=(diffusers pydantic pydantic_core annotated-types typing-inspection structlog av ftfy wcwidth)
pins=()
for name in "${names[@]}"; do
  pins+=("$name==$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('$name'))")")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${pins[@]}"
ls .whl
