#!/usr/bin/env bash
# FSDP fine-tuning check on a machine with 2 or more CUDA GPUs: full FT, LoRA and LaMDA trained
# with training.distributed: fsdp on 2 GPUs (torchrun, the suite's train path) against one GPU with
# the same global batch; replicas' gathered weights identical, LaMDA's frozen columns unchanged.
# (On CPU the suite refuses FSDP: the Trainer would silently train with DDP there.)
# Usage, from the repository root with the project's environment active:
#   bash scripts/check_fsdp_gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c 'import sys, torch; sys.exit(torch.cuda.device_count() < 2)'; then
    echo "check_fsdp_gpu: needs 2 CUDA devices, this machine has fewer" >&2
    exit 1
fi
exec python -m pytest -q -m distributed tests/test_distributed_finetune.py -k fsdp -rs "$@"
