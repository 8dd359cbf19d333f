"""Abstractive summarization with encoder-decoder models: XSum and CNN/DailyMail.

- XSum (``EdinburghNLP/xsum``): columns ``document``, ``summary``, ``id``.
- CNN/DailyMail (``abisee/cnn_dailymail``, config ``3.0.0``): ``article``, ``highlights``, ``id``.

Sources are cut to ``max_source_length`` tokens and targets to ``max_target_length``; the
evaluation generates with the config's ``generation`` settings (beam search: num_beams,
max_new_tokens, length_penalty, no_repeat_ngram_size, early_stopping) and scores ROUGE-1/2/L/Lsum
as the mean of per-example F-measures (deterministic; see ``metrics.rouge_scores``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from lamda_repro.tasks import metrics
from lamda_repro.tasks.base import HubSource, Task, TaskConfigError, register_task
from lamda_repro.tasks.generation import (
    HUB_PARAMS_SCHEMA,
    generation_kwargs,
    model_device,
    resolve_eval_split,
)


@torch.no_grad()
def generate_summaries(
    model, tokenizer, encoded_sources, batch_size: int, settings: dict[str, Any]
) -> list[str]:
    """One summary per tokenized source (rows with input_ids), from an encoder-decoder model.

    Generating from the tokenized eval split keeps the source truncation identical to training.
    """
    model.eval()
    device = model_device(model)
    summaries: list[str] = []
    for start in range(0, len(encoded_sources), batch_size):
        rows = encoded_sources[start : start + batch_size]
        enc = tokenizer.pad({"input_ids": rows["input_ids"]}, return_tensors="pt")
        generated = model.generate(
            input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device), **settings
        )
        summaries.extend(t.strip() for t in tokenizer.batch_decode(generated, skip_special_tokens=True))
    return summaries


class SummarizationTask(Task):
    """A document -> summary task; subclasses name the Hub data set and its columns."""

    family = "summarization"
    task_kind = "seq2seq"
    hub_id: ClassVar[str] = ""
    hub_subset: ClassVar[str | None] = None
    source_column: ClassVar[str] = ""
    target_column: ClassVar[str] = ""
    params_schema = {
        **HUB_PARAMS_SCHEMA,
        "max_source_length": {"type": "integer", "minimum": 1},
        "max_target_length": {"type": "integer", "minimum": 1},
    }
    default_generation: ClassVar[dict[str, Any]] = {"num_beams": 1, "max_new_tokens": 64}

    @property
    def primary_metric(self) -> str:
        return "rouge2"

    def required_columns(self) -> tuple[str, ...]:
        return (self.source_column, self.target_column)

    def hub_source(self) -> HubSource:
        return HubSource(
            self.params.get("hub_id", self.hub_id),
            self.params.get("hub_subset", self.hub_subset),
            {"train": "train", "eval": resolve_eval_split(self, "validation")},
            self.params.get("hub_revision"),
        )

    def load_splits(self):
        splits = self.load_hub_splits()
        for name, ds in splits.items():
            missing = {self.source_column, self.target_column} - set(ds.column_names)
            if missing:
                raise TaskConfigError(
                    f"task {self.name!r}: {name} split lacks column(s) "
                    f"{sorted(missing)} (has {ds.column_names})"
                )
        return splits

    def tokenize(self, dataset, tokenizer, max_length: int):
        source_length = self.params.get("max_source_length", max_length)
        target_length = self.params.get("max_target_length", max_length)
        src, tgt = self.source_column, self.target_column

        def fn(batch):
            enc = tokenizer(batch[src], max_length=source_length, truncation=True)
            enc["labels"] = tokenizer(text_target=batch[tgt], max_length=target_length, truncation=True)[
                "input_ids"
            ]
            return enc

        return dataset.map(
            fn, batched=True, remove_columns=dataset.column_names, desc=f"tokenize {self.name}"
        )

    def data_collator(self, tokenizer, model=None):
        from transformers import DataCollatorForSeq2Seq

        return DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100)

    def evaluate(self, model, tokenizer, eval_raw, eval_tokenized, batch_size, generation=None):
        settings = generation_kwargs(generation, self.default_generation)
        predictions = generate_summaries(model, tokenizer, eval_tokenized, batch_size, settings)
        scores = metrics.rouge_scores(predictions, list(eval_raw[self.target_column]))
        scores["gen_len"] = sum(len(p.split()) for p in predictions) / len(predictions)
        return scores


@register_task
class XSumTask(SummarizationTask):
    type_name = "xsum"
    hub_id = "EdinburghNLP/xsum"
    source_column = "document"
    target_column = "summary"


@register_task
class CnnDailyMailTask(SummarizationTask):
    type_name = "cnn_dailymail"
    hub_id = "abisee/cnn_dailymail"
    hub_subset = "3.0.0"
    source_column = "article"
    target_column = "highlights"
