# Sourced by the scripts: no Hugging Face Hub access (smoke runs and tests are offline).
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_EVALUATE_OFFLINE=1
export TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg
export PATH="$(pwd)/.venv/bin:$PATH"
