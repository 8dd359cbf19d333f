"""Text corpora for (up)training: a deterministic synthetic smoke corpus with learnable structure,
its word-level tokenizer and few-shot multiple-choice tasks, plus Hub/local corpora and packing.

The smoke corpus mixes three kinds of sentences a small model can learn:
  facts     "the red cat eats fish ."      (each animal always eats the same food)
  counting  "count : three four five six ." (number words in order)
  copying   "copy : b d a | b d a ."        (a short letter sequence repeated)
The multiple-choice tasks ask for the next word of held-out sentences of each kind. The
lexicon and the sentences live with the general smoke corpus (``tasks/general_corpus.py``), which
holds these sentences among others: the smoke config pretrains the stage's model on it
(``corpus.data``) and keeps these tasks.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from lamda_repro.tasks import general_corpus as gc

ANIMALS, FOODS, COLORS, NUMBERS, LETTERS = gc.ANIMALS, gc.FOODS, gc.COLORS, gc.NUMBERS, gc.LETTERS
food_of = gc.food_of
SPECIAL_TOKENS = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}
SMOKE_TASKS = ("smoke_facts", "smoke_count", "smoke_copy")


class CorpusConfigError(ValueError):
    """A corpus setting in the config is invalid."""


_KINDS = {"smoke_facts": gc.fact_prompt, "smoke_count": gc.count_prompt, "smoke_copy": gc.copy_prompt}
_sentence = gc.skill_sentence


def smoke_documents(num_documents: int, seed: int, sentences: tuple[int, int] = (4, 10)) -> list[str]:
    """``num_documents`` synthetic documents, identical for identical arguments."""
    rng = random.Random(seed)
    return [" ".join(_sentence(rng) for _ in range(rng.randint(*sentences))) for _ in range(num_documents)]


def smoke_vocabulary() -> list[str]:
    """Every word the smoke corpus and tasks can produce."""
    words = ["the", "eats", ".", "count", "copy", ":", "|"] + ANIMALS + FOODS + COLORS + NUMBERS + LETTERS
    return list(dict.fromkeys(words))


def build_word_tokenizer(vocabulary: Iterable[str]):
    """A word-level PreTrainedTokenizerFast over ``vocabulary`` that prepends <s> to each text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(list(SPECIAL_TOKENS.values()) + list(vocabulary))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    bos = SPECIAL_TOKENS["bos_token"]
    core.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, vocab[bos])]
    )
    return PreTrainedTokenizerFast(tokenizer_object=core, model_max_length=1024, **SPECIAL_TOKENS)


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    tmp.replace(path)


def task_examples(task: str, count: int, seed: int, num_choices: int = 4) -> list[dict[str, Any]]:
    """Multiple-choice examples: context, choices (one correct, the rest distinct distractors), label."""
    rng = random.Random(f"{task}-{seed}")
    rows = []
    for _ in range(count):
        context, answer, pool = _KINDS[task](rng)
        distractors = rng.sample([w for w in pool if w != answer], num_choices - 1)
        label = rng.randrange(num_choices)
        choices = distractors[:label] + [answer] + distractors[label:]
        rows.append({"context": context, "choices": choices, "label": label})
    return rows


TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    train: {train}
    test: {test}
  cache_dir: {cache}
training_split: train
fewshot_split: train
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: choices
doc_to_target: label
target_delimiter: " "
fewshot_delimiter: " . "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_smoke_tasks(directory: Path, seed: int, test_size: int, train_size: int = 32) -> list[str]:
    """Write lm-eval YAML tasks (and their JSONL data) for the smoke corpus into ``directory``."""
    directory = Path(directory).resolve()
    for task in SMOKE_TASKS:
        train, test = directory / f"{task}_train.jsonl", directory / f"{task}_test.jsonl"
        write_jsonl(train, task_examples(task, train_size, seed + 1))
        write_jsonl(test, task_examples(task, test_size, seed + 2))
        (directory / f"{task}.yaml").write_text(
            TASK_YAML.format(task=task, train=train, test=test, cache=directory / "hf_cache")
        )
    return list(SMOKE_TASKS)


def write_smoke_corpus(
    directory: Path, num_documents: int, num_validation: int, seed: int, task_test_size: int = 100
) -> dict[str, Any]:
    """Write the smoke corpus (train/validation JSONL), its tokenizer and its lm-eval tasks."""
    directory = Path(directory)
    write_jsonl(directory / "train.jsonl", ({"text": t} for t in smoke_documents(num_documents, seed)))
    write_jsonl(
        directory / "validation.jsonl", ({"text": t} for t in smoke_documents(num_validation, seed + 1000))
    )
    build_word_tokenizer(smoke_vocabulary()).save_pretrained(directory / "tokenizer")
    tasks = write_smoke_tasks(directory / "tasks", seed, task_test_size)
    info = {"num_documents": num_documents, "num_validation": num_validation, "seed": seed, "tasks": tasks}
    (directory / "corpus.json").write_text(json.dumps(info, indent=2))
    return info


def _split_files(corpus: dict[str, Any], base_dir: Path | None = None) -> dict[str, str]:
    files = corpus.get("data_files")
    if files is None:
        root = Path(corpus["path"]) if "path" in corpus else base_dir
        if root is None:
            raise CorpusConfigError(
                f"corpus of kind {corpus.get('kind', 'smoke')!r} needs 'path' or 'data_files'"
            )
        files = {s: str(Path(root) / f"{s}.jsonl") for s in ("train", "validation")}
    return files


def source_description(corpus: dict[str, Any]) -> dict[str, Any]:
    """What a corpus entry reads, for a token manifest: local files with their SHA-256, or the
    Hub data set, subset, split names and revision (``unpinned`` when the config names none)."""
    import hashlib

    if corpus.get("kind", "smoke") == "hub":
        return {
            "hub": corpus["name"],
            "subset": corpus.get("subset"),
            "splits": {s: corpus.get("splits", {}).get(s, s) for s in ("train", "validation")},
            "revision": corpus.get("revision") or "unpinned (the Hub's default branch when read)",
        }
    files = {}
    for split, path in sorted(_split_files(corpus).items()):
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest() if Path(path).is_file() else None
        files[split] = {"path": str(path), "sha256": digest}
    return {"files": files}


def iter_texts(corpus: dict[str, Any], split: str, base_dir: Path | None = None) -> Iterator[str]:
    """Texts of a corpus split. ``corpus`` is the config entry:

    - kind "smoke" or "files": JSONL files with a text field (``path``: folder with train.jsonl and
      validation.jsonl, or ``data_files``: {split: file});
    - kind "hub": ``name`` (e.g. cerebras/SlimPajama-627B), optional ``subset``, streamed.
    """
    from datasets import load_dataset

    kind = corpus.get("kind", "smoke")
    field = corpus.get("text_field", "text")
    if kind in ("smoke", "files"):
        files = _split_files(corpus, base_dir)
        if split not in files:
            raise CorpusConfigError(f"corpus has no {split!r} split (has {sorted(files)})")
        data = load_dataset("json", data_files={split: files[split]}, split=split)
    elif kind == "hub":
        split_name = corpus.get("splits", {}).get(split, split)
        data = load_dataset(
            corpus["name"],
            corpus.get("subset"),
            split=split_name,
            streaming=True,
            revision=corpus.get("revision"),
        )
    else:
        raise CorpusConfigError(f"corpus kind must be smoke, files or hub, got {kind!r}")
    for row in data:
        yield row[field]


def packed_sequences(texts: Iterable[str], tokenizer, seq_len: int) -> Iterator[torch.Tensor]:
    """Concatenate tokenized texts (each ended by EOS) and cut them into ``seq_len`` token rows."""
    buffer: list[int] = []
    eos = tokenizer.eos_token_id
    for text in texts:
        buffer.extend(tokenizer(text, add_special_tokens=True)["input_ids"])
        if eos is not None:
            buffer.append(eos)
        while len(buffer) >= seq_len:
            yield torch.tensor(buffer[:seq_len], dtype=torch.long)
            buffer = buffer[seq_len:]


def batches(
    texts: Iterable[str], tokenizer, seq_len: int, batch_size: int, repeat: bool = False, text_factory=None
) -> Iterator[torch.Tensor]:
    """(batch_size, seq_len) token batches; with ``repeat`` the corpus is re-read from
    ``text_factory()`` when exhausted (small corpora, several epochs)."""
    while True:
        rows: list[torch.Tensor] = []
        for row in packed_sequences(texts, tokenizer, seq_len):
            rows.append(row)
            if len(rows) == batch_size:
                yield torch.stack(rows)
                rows = []
        if not repeat or text_factory is None:
            return
        texts = text_factory()
