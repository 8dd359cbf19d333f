"""GLUE (nyu-mll/glue): the eight tasks of the LaMDA paper's NLU table, with official metrics."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lamda_repro.tasks import metrics
from lamda_repro.tasks.base import HubSource, Task, register_task

# subset -> (text columns, number of labels (1 = regression), metric names, primary metric)
GLUE_TASKS: dict[str, dict[str, Any]] = {
    "cola": {"text": ("sentence", None), "num_labels": 2, "metrics": ("matthews_correlation",)},
    "sst2": {"text": ("sentence", None), "num_labels": 2, "metrics": ("accuracy",)},
    "mrpc": {"text": ("sentence1", "sentence2"), "num_labels": 2, "metrics": ("accuracy", "f1")},
    "qqp": {"text": ("question1", "question2"), "num_labels": 2, "metrics": ("accuracy", "f1")},
    "stsb": {"text": ("sentence1", "sentence2"), "num_labels": 1, "metrics": ("pearson", "spearmanr")},
    "mnli": {"text": ("premise", "hypothesis"), "num_labels": 3, "metrics": ("accuracy",)},
    "qnli": {"text": ("question", "sentence"), "num_labels": 2, "metrics": ("accuracy",)},
    "rte": {"text": ("sentence1", "sentence2"), "num_labels": 2, "metrics": ("accuracy",)},
}
GLUE_HUB_ID = "nyu-mll/glue"


def glue_metrics(subset: str, predictions: np.ndarray, references: np.ndarray) -> dict[str, float]:
    """The official GLUE metrics of one subset, through the suite's ``glue`` evaluate module."""
    return metrics.glue_scores(subset, np.asarray(predictions).tolist(), np.asarray(references).tolist())


@torch.no_grad()
def predict_logits(model, dataset, collator, batch_size: int) -> np.ndarray:
    """Logits of a sequence-classification model over a tokenized data set, in order."""
    model.eval()
    device = next(model.parameters()).device
    cols = [c for c in dataset.column_names if c in ("input_ids", "attention_mask", "token_type_ids")]
    outs = []
    for start in range(0, len(dataset), batch_size):
        rows = dataset.select(range(start, min(start + batch_size, len(dataset))))
        batch = collator([{c: r[c] for c in cols} for r in rows])
        batch = {k: v.to(device) for k, v in batch.items()}
        outs.append(model(**batch).logits.float().cpu())
    return torch.cat(outs).numpy()


@register_task
class GlueTask(Task):
    type_name = "glue"
    family = "nlu"
    task_kind = "seq-cls"
    params_schema = {"subset": {"type": "string", "enum": sorted(GLUE_TASKS)}}
    required_params = ("subset",)

    @property
    def subset(self) -> str:
        return self.params["subset"]

    @property
    def info(self) -> dict[str, Any]:
        return GLUE_TASKS[self.subset]

    @property
    def num_labels(self) -> int:
        return self.info["num_labels"]

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    @property
    def primary_metric(self) -> str:
        return self.info["metrics"][0]

    def required_columns(self) -> tuple[str, ...]:
        return (*(c for c in self.info["text"] if c), "label")

    def label_classes(self) -> int | None:
        return None if self.is_regression else self.num_labels

    def hub_source(self) -> HubSource:
        if self.subset == "mnli":
            splits = {
                "train": "train",
                "eval": "validation_matched",
                "eval_mismatched": "validation_mismatched",
            }
        else:
            splits = {"train": "train", "eval": "validation"}
        return HubSource(GLUE_HUB_ID, self.subset, splits)

    def load_splits(self):
        return self.load_hub_splits()

    def tokenize(self, dataset, tokenizer, max_length: int):
        a, b = self.info["text"]
        regression = self.is_regression

        def fn(batch):
            enc = tokenizer(batch[a], batch[b] if b else None, truncation=True, max_length=max_length)
            enc["labels"] = [float(x) for x in batch["label"]] if regression else batch["label"]
            return enc

        return dataset.map(
            fn, batched=True, remove_columns=dataset.column_names, desc=f"tokenize {self.name}"
        )

    def evaluate(
        self,
        model,
        tokenizer,
        eval_raw,
        eval_tokenized,
        batch_size: int,
        generation: dict[str, Any] | None = None,
    ) -> dict[str, float]:
        from transformers import DataCollatorWithPadding

        logits = predict_logits(model, eval_tokenized, DataCollatorWithPadding(tokenizer), batch_size)
        preds = logits[:, 0] if self.is_regression else logits.argmax(-1)
        refs = np.asarray(eval_raw["label"])
        return glue_metrics(self.subset, preds, refs)
