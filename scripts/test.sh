#!/usr/bin/env bash
# The test suite, in six groups: fast unit tests, the loading code on local replicas of the Hub
# repositories of the paper config (hub), several processes on CPU (distributed), slower checks on
# real weights (slow), the smoke workflow end to end through Snakemake (workflow), and a reduced workflow through a real
# SLURM cluster on this machine (cluster). All run offline on CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --browser || exit 1
source scripts/offline.sh
status=0
# Lint, format, the architecture's import layers and the declared dependencies (pyproject.toml).
.venv/bin/ruff check --quiet . || status=1
.venv/bin/ruff format --check --quiet . || status=1
.venv/bin/lint-imports --no-cache >/dev/null || { .venv/bin/lint-imports --no-cache; status=1; }
.venv/bin/deptry . >/dev/null 2>&1 || { .venv/bin/deptry .; status=1; }
# Snakemake's own linter on the workflow (rules, paths, parameters): no lints.
.venv/bin/snakemake --lint >/dev/null 2>&1 || { .venv/bin/snakemake --lint; status=1; }
group() {  # pytest exits 5 when a group has no tests: that is not a failure
  .venv/bin/python -m pytest -q -m "$1" "${@:2}"
  rc=$?
  if [ $rc -ne 0 ] && [ $rc -ne 5 ]; then status=$rc; fi
}
group "not slow and not workflow and not cluster and not distributed and not hub"
group "hub"
group "distributed"
group "slow"
group "workflow"
# The workflow through a real single-node SLURM cluster (scripts/local_slurm.sh installs and starts
# it; the group is skipped with one line where SLURM cannot be installed).
group "cluster" -rs
exit $status
