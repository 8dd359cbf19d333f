#!/usr/bin/env bash
# Create .venv (Python 3.11) and install the suite with its smoke/test extras.
# torch is pinned to 2.13.0 in pyproject.toml, so no CUDA wheels are pulled on a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), f"Python 3.11 is required, found {sys.version.split()[0]}"'
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]' 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
.venv/bin/python -c 'import lamda_repro, torch, transformers, peft, snakemake; print("installed lamda-repro with torch", torch.__version__)'
