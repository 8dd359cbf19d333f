#!/usr/bin/env bash
# The smoke reproduction: install, run the default (smoke) config offline on CPU, then build
# the HTML report. Outputs: results/tables, results/figures, results/claims.md, results/report.html.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
source scripts/offline.sh
start=$(date +%s)
snakemake --cores all "$@"
snakemake --report results/report.html
echo "smoke reproduction done in $(( $(date +%s) - start )) s: see results/ and results/report.html"
