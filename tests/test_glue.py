"""GLUE: every loader on local files with the Hub schema, metrics against hand-computed values."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from lamda_repro.tasks.base import get_task_class
from lamda_repro.tasks.glue import GLUE_TASKS, glue_metrics

# One row of each nyu-mll/glue subset, with its real columns.
ROWS = {
    "cola": {"sentence": "The book was read by me.", "label": 1, "idx": 0},
    "sst2": {"sentence": "a gripping film", "label": 1, "idx": 0},
    "mrpc": {"sentence1": "He left.", "sentence2": "He went away.", "label": 1, "idx": 0},
    "qqp": {"question1": "How old is it?", "question2": "What is its age?", "label": 1, "idx": 0},
    "stsb": {"sentence1": "A cat sits.", "sentence2": "A cat is sitting.", "label": 4.2, "idx": 0},
    "mnli": {"premise": "It rains.", "hypothesis": "It is wet.", "label": 0, "idx": 0},
    "qnli": {"question": "Who wrote it?", "sentence": "She wrote it.", "label": 0, "idx": 0},
    "rte": {"sentence1": "It rains.", "sentence2": "It is dry.", "label": 1, "idx": 0},
}


def _write(tmp_path, subset, splits):
    files = {}
    for split in splits:
        p = tmp_path / f"{subset}-{split}.jsonl"
        p.write_text("".join(json.dumps(ROWS[subset]) + "\n" for _ in range(3)))
        files[split] = str(p)
    return files


@pytest.mark.parametrize("subset", sorted(GLUE_TASKS))
def test_glue_loader_reads_local_files_with_hub_schema(tmp_path, subset, minilm_path):
    from transformers import AutoTokenizer

    splits = (
        ["train", "validation_matched", "validation_mismatched"]
        if subset == "mnli"
        else ["train", "validation"]
    )
    task = get_task_class("glue")(subset, {"subset": subset}, _write(tmp_path, subset, splits))
    raw = task.load_splits()
    assert set(raw) == ({"train", "eval", "eval_mismatched"} if subset == "mnli" else {"train", "eval"})
    tok = AutoTokenizer.from_pretrained(minilm_path)
    enc = task.tokenize(raw["train"], tok, max_length=16)
    assert set(enc.column_names) >= {"input_ids", "attention_mask", "labels"}
    assert isinstance(enc[0]["labels"], float) == (subset == "stsb")
    assert task.num_labels == {"stsb": 1, "mnli": 3}.get(subset, 2)


def test_missing_local_split_is_named(tmp_path):
    task = get_task_class("glue")("x", {"subset": "sst2"}, _write(tmp_path, "sst2", ["train"]))
    with pytest.raises(FileNotFoundError, match="validation"):
        task.load_splits()


def test_max_samples_keep_the_first_rows(tmp_path):
    task = get_task_class("glue")(
        "x", {"subset": "sst2", "max_train_samples": 2}, _write(tmp_path, "sst2", ["train", "validation"])
    )
    assert len(task.load_splits()["train"]) == 2


def test_glue_metrics_match_hand_computed_values():
    preds, refs = np.array([1, 0, 1, 1]), np.array([1, 0, 0, 1])
    assert glue_metrics("sst2", preds, refs) == {"accuracy": 0.75}
    m = glue_metrics("mrpc", preds, refs)
    assert m["accuracy"] == 0.75 and math.isclose(m["f1"], 0.8)  # tp 2, fp 1, fn 0
    # MCC = (tp*tn - fp*fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = 2 / sqrt(12)
    assert math.isclose(glue_metrics("cola", preds, refs)["matthews_correlation"], 2 / math.sqrt(12))
    s = glue_metrics("stsb", np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 4.0]))
    assert math.isclose(s["pearson"], 9 / math.sqrt(84))
    assert math.isclose(s["spearmanr"], 1.0)


def test_smoke_generators_are_deterministic_and_in_hub_schema():
    from lamda_repro.tasks.smoke import generate

    a = generate("sentiment", 20, 10, seed=1)
    assert a == generate("sentiment", 20, 10, seed=1)
    assert a != generate("sentiment", 20, 10, seed=2)
    assert set(a["train"][0]) == set(ROWS["sst2"])
    assert {r["label"] for r in a["train"]} == {0, 1}
    b = generate("similarity", 20, 10, seed=0)
    assert set(b["validation"][0]) == set(ROWS["stsb"])
    assert all(0.0 <= r["label"] <= 5.0 for r in b["train"])
    # Identical sentences score 5, fully different ones 0.
    for r in b["train"]:
        if r["sentence1"] == r["sentence2"]:
            assert r["label"] == 5.0
