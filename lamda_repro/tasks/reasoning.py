"""Math word problems: GSM8K (``openai/gsm8k``, config ``main``; columns question, answer).

Training: the model reads the prompt (the question in ``prompt_template``) and learns the full
reference solution, which ends in "#### <number>"; the loss covers the solution only.
Evaluation: greedy decoding (unless ``generation`` says otherwise), then exact match of the
final number (``metrics.extract_final_number``: the number after the last "####", else the
last number in the text; thousands separators removed; compared as decimal numbers).
"""

from __future__ import annotations

from lamda_repro.tasks import metrics
from lamda_repro.tasks.base import HubSource, TaskConfigError, register_task
from lamda_repro.tasks.generation import (
    HUB_PARAMS_SCHEMA,
    CausalLMTask,
    generate_continuations,
    generation_kwargs,
    resolve_eval_split,
)

GSM8K_HUB_ID = "openai/gsm8k"
DEFAULT_PROMPT = "Question: {question}\nAnswer:"


@register_task
class GSM8KTask(CausalLMTask):
    type_name = "gsm8k"
    family = "reasoning"
    params_schema = {
        **HUB_PARAMS_SCHEMA,
        "prompt_template": {"type": "string", "pattern": "\\{question\\}"},
        "max_prompt_length": {"type": "integer", "minimum": 1},
    }
    default_generation = {"max_new_tokens": 256, "num_beams": 1}

    @property
    def primary_metric(self) -> str:
        return "exact_match"

    def required_columns(self) -> tuple[str, ...]:
        return ("question", "answer")

    def hub_source(self) -> HubSource:
        return HubSource(
            self.params.get("hub_id", GSM8K_HUB_ID),
            self.params.get("hub_subset", "main"),
            {"train": "train", "eval": resolve_eval_split(self, "test")},
            self.params.get("hub_revision"),
        )

    def load_splits(self):
        splits = self.load_hub_splits()
        for name, ds in splits.items():
            missing = {"question", "answer"} - set(ds.column_names)
            if missing:
                raise TaskConfigError(
                    f"task {self.name!r}: {name} split lacks column(s) "
                    f"{sorted(missing)} (has {ds.column_names})"
                )
        return splits

    def prompt(self, question: str) -> str:
        return self.params.get("prompt_template", DEFAULT_PROMPT).format(question=question)

    def prompt_and_target(self, row):
        return self.prompt(row["question"]), row["answer"]

    def evaluate(self, model, tokenizer, eval_raw, eval_tokenized, batch_size, generation=None):
        questions = list(eval_raw["question"])
        answers = list(eval_raw["answer"])
        predictions = generate_continuations(
            model,
            tokenizer,
            [self.prompt(q) for q in questions],
            batch_size,
            generation_kwargs(generation, self.default_generation),
            self.params.get("max_prompt_length", 384),
        )
        extracted = [metrics.extract_final_number(p) for p in predictions]
        return {
            "exact_match": metrics.gsm8k_exact_match(predictions, answers),
            "answered": sum(x is not None for x in extracted) / len(extracted),
        }
