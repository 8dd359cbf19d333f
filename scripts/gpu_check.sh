#!/usr/bin/env bash
# The serving and memory measurements that need a GPU, in one go (sized for under 10 minutes on
# one H100; random weights, nothing downloaded):
#   <out>/latency/gemma-2b.cuda.json    latency tables of one Gemma 2B layer, batch 1..1024, bf16
#                                       (point recursive.serving.paper_estimate.latency_tables at it)
#   <out>/gpu_check/engine.cuda.json    the real engine's decode tokens/s on a small recursive model,
#                                       next to the simulator on tables of the same model
#   <out>/bench/lamda_bench.{json,md}   LaMDA vs LoRA peak memory on LLaMA-2-7B geometry (2 layers,
#                                       extrapolated to 32; `lamda-repro aggregate --bench-dir <out>/bench`)
# --tiny runs the same steps on tiny geometries (on a CPU in seconds: the tests do).
# usage: scripts/gpu_check.sh [--tiny] [--device cuda|cpu] [--out-dir DIR]   (default results/reference)
set -euo pipefail
cd "$(dirname "$0")/.."
tiny=() device=cuda out=results/reference
while (($#)); do
    case "$1" in
        --tiny) tiny=(--tiny); shift ;;
        --device) device=$2; shift 2 ;;
        --out-dir) out=$2; shift 2 ;;
        *) echo "gpu_check.sh: unknown option $1 (--tiny, --device cuda|cpu, --out-dir DIR)" >&2; exit 2 ;;
    esac
done
start=$(date +%s)
lamda-repro recursive-gpu-check --out-dir "$out" --device "$device" "${tiny[@]}"
if ((${#tiny[@]})); then
    bench=(--layers 2 --hidden 64 --intermediate 172 --heads 4 --vocab 256 --seq 32 --rank 4 --steps 1 --warmup 0)
else
    bench=(--layers 2 --seq 512 --rank 64 --steps 3 --warmup 1)
fi
lamda-repro bench-lamda --device "$device" --methods lora lamda "${bench[@]}" --out "$out/bench/lamda_bench"
echo "gpu check done in $(($(date +%s) - start)) s: files under $out"
