"""Generation tasks for decoder-only models: E2E NLG (data-to-text) and WikiText-2 (perplexity).

Also holds the pieces every causal-LM task shares (GSM8K uses them too): prompt/target
tokenization with the prompt masked out of the loss, the padding collator, batched greedy or
beam generation of continuations.

E2E on the Hub exists in two schemas, both supported and detected from the columns:

- ``tuetschek/e2e_nlg`` (the original E2E challenge data, the default: it is the version
  the LoRA/LaMDA GPT-2 experiments use): ``meaning_representation``, ``human_reference``;
  one row per (MR, reference), so references of one MR are spread over several rows.
- ``GEM/e2e_nlg`` (the cleaned GEM version): ``gem_id``, ``meaning_representation``,
  ``target`` and ``references`` (all references of the MR in validation/test).

Both repositories are script-based on the Hub; ``datasets`` >= 4 cannot run scripts, so the
default ``hub_revision`` is the Hub's automatic Parquet export (``refs/convert/parquet``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lamda_repro.tasks import metrics
from lamda_repro.tasks.base import HubSource, Task, TaskConfigError, register_task

# generate() settings a task config may set in `generation`; anything else is refused.
GENERATION_KEYS = (
    "max_new_tokens",
    "num_beams",
    "length_penalty",
    "no_repeat_ngram_size",
    "early_stopping",
    "min_new_tokens",
    "repetition_penalty",
    "do_sample",
)

HUB_PARAMS_SCHEMA = {
    "hub_id": {"type": "string", "minLength": 1},
    "hub_subset": {"type": ["string", "null"]},
    "hub_revision": {"type": ["string", "null"]},
    "eval_split": {"type": "string", "minLength": 1},
}


def resolve_eval_split(task: Task, hub_default: str) -> str:
    """The eval split: ``eval_split`` if set; for local files "validation" if present, else "test"."""
    if "eval_split" in task.params:
        return task.params["eval_split"]
    if task.data_files is None:
        return hub_default
    for split in ("validation", "test"):
        if split in task.data_files:
            return split
    raise TaskConfigError(
        f"task {task.name!r}: local files have no validation or test split "
        f"(have {sorted(task.data_files)}); set eval_split"
    )


def generation_kwargs(generation: dict[str, Any] | None, defaults: dict[str, Any]) -> dict[str, Any]:
    """Merge a config's generation settings over task defaults; refuse unknown keys.

    Decoding is deterministic (greedy or beam search) unless the config sets do_sample.
    """
    settings = {"do_sample": False, **defaults}
    for key, value in (generation or {}).items():
        if key not in GENERATION_KEYS:
            raise TaskConfigError(f"generation.{key}: unknown setting (known: {', '.join(GENERATION_KEYS)})")
        settings[key] = value
    return settings


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def pad_token_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    raise ValueError("tokenizer has neither a pad nor an eos token")


# -- prompt / target tokenization ---------------------------------------------------------


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of a prompt as the model sees it at generation time (special tokens included)."""
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def encode_prompt_target(tokenizer, prompt: str, target: str, max_length: int) -> dict[str, list[int]]:
    """input_ids = prompt + " " target + eos; labels copy the target and mask the prompt (-100).

    Prompt and target are tokenized separately, so the prompt tokens are exactly those fed
    at generation time. Sequences longer than ``max_length`` are cut on the right.
    """
    prompt_ids = encode_prompt(tokenizer, prompt)
    target_ids = list(tokenizer(" " + target, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        target_ids.append(tokenizer.eos_token_id)
    input_ids = (prompt_ids + target_ids)[:max_length]
    labels = ([-100] * len(prompt_ids) + target_ids)[:max_length]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


@dataclass
class CausalLMCollator:
    """Right-pads input_ids (pad or eos id), attention_mask (0) and labels (-100)."""

    pad_id: int
    label_pad_id: int = -100

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        batch: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
        for f in features:
            ids = list(f["input_ids"])
            pad = width - len(ids)
            batch["input_ids"].append(ids + [self.pad_id] * pad)
            mask = list(f.get("attention_mask", [1] * len(ids)))
            batch["attention_mask"].append(mask + [0] * pad)
            labels = list(f["labels"]) if "labels" in f else list(ids)
            batch["labels"].append(labels + [self.label_pad_id] * pad)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


@torch.no_grad()
def generate_continuations(
    model, tokenizer, prompts: list[str], batch_size: int, settings: dict[str, Any], max_prompt_length: int
) -> list[str]:
    """Decode what the model generates after each prompt (prompt tokens removed).

    Prompts are left-padded so that generation starts right after each prompt's last token;
    a prompt longer than ``max_prompt_length`` keeps its last tokens.
    """
    model.eval()
    device = model_device(model)
    pad_id = pad_token_id(tokenizer)
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        encoded = [
            encode_prompt(tokenizer, p)[-max_prompt_length:] for p in prompts[start : start + batch_size]
        ]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in encoded], device=device)
        attention = torch.tensor(
            [[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=device
        )
        generated = model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
            **settings,
        )
        for row in generated[:, width:]:
            outputs.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return outputs


class CausalLMTask(Task):
    """A prompt -> target task for decoder-only models (loss on the target tokens only)."""

    task_kind = "causal-lm"

    def data_collator(self, tokenizer, model=None):
        return CausalLMCollator(pad_id=pad_token_id(tokenizer))

    def prompt_and_target(self, row: dict[str, Any]) -> tuple[str, str]:
        raise NotImplementedError

    def tokenize(self, dataset, tokenizer, max_length: int):
        def fn(batch):
            rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
            encoded = [encode_prompt_target(tokenizer, *self.prompt_and_target(r), max_length) for r in rows]
            return {k: [e[k] for e in encoded] for k in ("input_ids", "attention_mask", "labels")}

        return dataset.map(
            fn, batched=True, remove_columns=dataset.column_names, desc=f"tokenize {self.name}"
        )


# -- E2E NLG ------------------------------------------------------------------------------

E2E_HUB_ID = "tuetschek/e2e_nlg"
PARQUET_EXPORT = "refs/convert/parquet"


def e2e_references_by_mr(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Group E2E rows by meaning representation, in order of first appearance.

    Returns (unique MRs, references per MR). Original-schema rows contribute their
    ``human_reference``; GEM rows their ``references`` list (or ``target`` when it is empty).
    """
    refs: dict[str, list[str]] = {}
    for row in rows:
        mr = row["meaning_representation"]
        bucket = refs.setdefault(mr, [])
        if "human_reference" in row:
            candidates = [row["human_reference"]]
        else:
            candidates = list(row.get("references") or []) or [row["target"]]
        bucket.extend(c for c in candidates if c not in bucket)
    return list(refs), list(refs.values())


@register_task
class E2ENLGTask(CausalLMTask):
    """E2E NLG: meaning representation -> restaurant description, scored per unique MR with the
    challenge's official metric set (BLEU, NIST, METEOR, ROUGE-L, CIDEr)."""

    type_name = "e2e_nlg"
    family = "generation"
    table_metrics = ("bleu", "nist", "meteor", "rougeL", "cider")
    params_schema = {
        **HUB_PARAMS_SCHEMA,
        "prompt_template": {"type": "string", "pattern": "\\{mr\\}"},
        "max_prompt_length": {"type": "integer", "minimum": 1},
    }
    default_generation = {"max_new_tokens": 64, "num_beams": 1}

    @property
    def primary_metric(self) -> str:
        return "bleu"

    def required_columns(self) -> tuple[str, ...]:
        return ("meaning_representation",)

    def hub_source(self) -> HubSource:
        return HubSource(
            self.params.get("hub_id", E2E_HUB_ID),
            self.params.get("hub_subset"),
            {"train": "train", "eval": resolve_eval_split(self, "validation")},
            self.params.get("hub_revision", PARQUET_EXPORT),
        )

    def load_splits(self):
        splits = self.load_hub_splits()
        columns = set(splits["train"].column_names)
        if "meaning_representation" not in columns or not columns & {"human_reference", "target"}:
            raise TaskConfigError(
                f"task {self.name!r}: E2E data needs meaning_representation and "
                f"human_reference or target columns, got {sorted(columns)}"
            )
        return splits

    def prompt_and_target(self, row):
        template = self.params.get("prompt_template", "{mr} ||")
        target = row["human_reference"] if "human_reference" in row else row["target"]
        return template.format(mr=row["meaning_representation"]), target

    def evaluate(self, model, tokenizer, eval_raw, eval_tokenized, batch_size, generation=None):
        mrs, references = e2e_references_by_mr(list(eval_raw))
        template = self.params.get("prompt_template", "{mr} ||")
        predictions = generate_continuations(
            model,
            tokenizer,
            [template.format(mr=mr) for mr in mrs],
            batch_size,
            generation_kwargs(generation, self.default_generation),
            self.params.get("max_prompt_length", 256),
        )
        return {
            "bleu": metrics.bleu_score(predictions, references),
            "nist": metrics.nist_score(predictions, references),
            "meteor": metrics.meteor_score(predictions, references),
            "rougeL": metrics.rouge_scores(predictions, references, ("rougeL",))["rougeL"],
            "cider": metrics.cider_score(predictions, references),
            "num_mrs": float(len(mrs)),
        }


# -- WikiText-2 ---------------------------------------------------------------------------

WIKITEXT_HUB_ID = "Salesforce/wikitext"


def token_blocks(token_ids: list[int], block_size: int, keep_last: bool) -> list[list[int]]:
    """Cut a token stream into consecutive blocks; the short tail is kept only if asked."""
    blocks = [token_ids[i : i + block_size] for i in range(0, len(token_ids), block_size)]
    if blocks and not keep_last and len(blocks[-1]) < block_size:
        blocks.pop()
    return [b for b in blocks if len(b) > 1]


@torch.no_grad()
def causal_lm_nll(model, dataset, collator, batch_size: int) -> tuple[float, int]:
    """Summed next-token negative log-likelihood and the number of predicted tokens."""
    model.eval()
    device = model_device(model)
    total, count = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = {k: v.to(device) for k, v in collator(rows).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        shift_logits = logits[:, :-1].float()
        shift_labels = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.size(-1)),
            shift_labels.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        total += float(loss)
        count += int((shift_labels != -100).sum())
    return total, count


@register_task
class WikiTextTask(CausalLMTask):
    """WikiText language modelling: train on the text, report perplexity on the eval split.

    Lines are joined with blank lines ("\\n\\n".join), tokenized once, and cut into
    non-overlapping blocks of ``max_length`` tokens (the short tail is kept as its own block).
    Perplexity = exp(total NLL / predicted tokens) over all eval blocks; each block's first
    token has no context and is not predicted.
    """

    type_name = "wikitext"
    family = "generation"
    params_schema = {**HUB_PARAMS_SCHEMA}

    @property
    def primary_metric(self) -> str:
        return "perplexity"

    def required_columns(self) -> tuple[str, ...]:
        return ("text",)

    def hub_source(self) -> HubSource:
        return HubSource(
            self.params.get("hub_id", WIKITEXT_HUB_ID),
            self.params.get("hub_subset", "wikitext-2-raw-v1"),
            {"train": "train", "eval": resolve_eval_split(self, "test")},
            self.params.get("hub_revision"),
        )

    def load_splits(self):
        splits = self.load_hub_splits()
        if "text" not in splits["train"].column_names:
            raise TaskConfigError(
                f"task {self.name!r}: WikiText data needs a text column, got {splits['train'].column_names}"
            )
        return splits

    def tokenize(self, dataset, tokenizer, max_length: int):
        import datasets

        text = "\n\n".join(dataset["text"])
        ids = list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        blocks = token_blocks(ids, max_length, keep_last=True)
        if not blocks:
            raise ValueError(f"task {self.name!r}: the text has fewer than two tokens")
        return datasets.Dataset.from_dict(
            {"input_ids": blocks, "attention_mask": [[1] * len(b) for b in blocks], "labels": blocks}
        )

    def evaluate(self, model, tokenizer, eval_raw, eval_tokenized, batch_size, generation=None):
        total, count = causal_lm_nll(model, eval_tokenized, self.data_collator(tokenizer), batch_size)
        return {
            "perplexity": metrics.perplexity(total, count),
            "eval_nll": total / count,
            "eval_tokens": float(count),
        }
