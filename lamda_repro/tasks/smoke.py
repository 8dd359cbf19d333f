"""Deterministic smoke data generators.

Each generator returns rows in the schema of the Hub data set it stands in for, so the task
code reads them exactly as it reads Hub data (``datasets.load_dataset("json", ...)``).
Generators are pure functions of (n_train, n_eval, seed, options).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Callable

Rows = dict[str, list[dict[str, Any]]]
_GENERATORS: dict[str, Callable[..., Rows]] = {}


def register_generator(name: str):
    def deco(fn: Callable[..., Rows]) -> Callable[..., Rows]:
        _GENERATORS[name] = fn
        return fn

    return deco


# The modules that register generators besides this one. Importing only these keeps
# `lamda-repro prepare-data` light: the task modules import torch (seconds per job).
GENERATOR_MODULES = ("lamda_repro.tasks.smoke_generators", "lamda_repro.tasks.general_corpus")


def _import_generators() -> None:
    import importlib

    for module in GENERATOR_MODULES:
        importlib.import_module(module)


def generator_names() -> list[str]:
    _import_generators()
    return sorted(_GENERATORS)


def generate(generator: str, n_train: int, n_eval: int, seed: int = 0, options: dict | None = None) -> Rows:
    _import_generators()
    if generator not in _GENERATORS:
        raise ValueError(f"unknown data generator {generator!r} (known: {', '.join(sorted(_GENERATORS))})")
    return _GENERATORS[generator](n_train=n_train, n_eval=n_eval, seed=seed, **(options or {}))


def write_jsonl(rows: list[dict[str, Any]], path: str | Path) -> None:
    from lamda_repro.results import write_text_atomic

    write_text_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def write_dataset(entry: dict[str, Any], out_dir: str | Path) -> dict[str, str]:
    """Generate a data set from its config entry and write one JSONL per split."""
    rows = generate(
        entry["generator"],
        entry.get("n_train", 256),
        entry.get("n_eval", 64),
        entry.get("seed", 0),
        entry.get("options", {}),
    )
    out = {}
    for split, split_rows in rows.items():
        path = Path(out_dir) / f"{split}.jsonl"
        write_jsonl(split_rows, path)
        out[split] = str(path)
    return out


def dataset_files(workdir: str, name: str, splits=("train", "validation")) -> dict[str, str]:
    return {s: f"{workdir}/data/{name}/{s}.jsonl" for s in splits}


# -- NLU generators ------------------------------------------------------------------------

_POS = [
    "good",
    "great",
    "wonderful",
    "delightful",
    "superb",
    "charming",
    "moving",
    "clever",
    "brilliant",
    "enjoyable",
    "fresh",
    "beautiful",
    "funny",
    "warm",
    "gripping",
]
_NEG = [
    "bad",
    "awful",
    "dull",
    "boring",
    "clumsy",
    "tedious",
    "weak",
    "messy",
    "bland",
    "painful",
    "stale",
    "ugly",
    "lifeless",
    "annoying",
    "forgettable",
]
_SUBJ = [
    "the film",
    "this movie",
    "the story",
    "the acting",
    "the script",
    "the ending",
    "the soundtrack",
    "the cast",
    "the direction",
    "the dialogue",
    "the plot",
    "the finale",
]
_FILLER = [
    "honestly",
    "overall",
    "to be fair",
    "from start to finish",
    "in the end",
    "as expected",
    "for the most part",
    "at times",
]


def _sentiment_row(rng: random.Random, idx: int) -> dict[str, Any]:
    label = rng.randrange(2)
    if rng.random() < 0.3:
        # Contrast: the clause after "but" decides, so the opposite word must be discounted.
        first = rng.choice(_NEG if label == 1 else _POS)
        last = rng.choice(_POS if label == 1 else _NEG)
        sentence = f"{rng.choice(_SUBJ)} is {first} but {rng.choice(_SUBJ)} is {last}"
        return {"sentence": sentence, "label": label, "idx": idx}
    negate = rng.random() < 0.25
    words = _POS if (label == 1) != negate else _NEG
    adj = rng.choice(words)
    subj = rng.choice(_SUBJ)
    verb = "is not" if negate else rng.choice(["is", "was", "feels", "seems"])
    parts = [f"{subj} {verb} {adj}"]
    if rng.random() < 0.5:
        parts.insert(0, rng.choice(_FILLER) + ",")
    if rng.random() < 0.4:
        parts.append(
            f"and {rng.choice(_SUBJ)} is {rng.choice(words)} too"
            if not negate
            else f"though {rng.choice(_SUBJ)} is fine"
        )
    return {"sentence": " ".join(parts), "label": label, "idx": idx}


@register_generator("sentiment")
def sentiment(n_train: int, n_eval: int, seed: int = 0) -> Rows:
    """Binary sentiment sentences (SST-2 schema) with negation and contrast ("x but y"),
    so that counting positive and negative words is not enough."""
    rng = random.Random(seed)
    rows = [_sentiment_row(rng, i) for i in range(n_train + n_eval)]
    return {"train": rows[:n_train], "validation": rows[n_train:]}


_NOUNS = [
    "cat",
    "dog",
    "child",
    "teacher",
    "farmer",
    "pilot",
    "doctor",
    "bird",
    "horse",
    "artist",
    "baker",
    "sailor",
    "student",
    "singer",
    "writer",
    "runner",
]
_VERBS = [
    "watches",
    "follows",
    "paints",
    "helps",
    "feeds",
    "greets",
    "visits",
    "finds",
    "carries",
    "draws",
    "calls",
    "meets",
]
_PLACES = [
    "in the park",
    "near the river",
    "at the market",
    "on the hill",
    "in the kitchen",
    "by the sea",
    "at school",
    "in the garden",
    "on the road",
    "at home",
]
_ADJS = ["old", "young", "tall", "quiet", "happy", "tired", "small", "busy"]


def _sim_sentence(rng: random.Random) -> list[str]:
    return [
        rng.choice(_ADJS),
        rng.choice(_NOUNS),
        rng.choice(_VERBS),
        rng.choice(_ADJS),
        rng.choice(_NOUNS),
        rng.choice(_PLACES),
    ]


@register_generator("similarity")
def similarity(n_train: int, n_eval: int, seed: int = 0) -> Rows:
    """Sentence pairs with a 0-5 similarity score (STS-B schema).

    The second sentence replaces k of the six slots of the first; the score is 5 * (1 - k/6).
    """
    rng = random.Random(seed)
    pools = [_ADJS, _NOUNS, _VERBS, _ADJS, _NOUNS, _PLACES]
    rows = []
    for i in range(n_train + n_eval):
        s1 = _sim_sentence(rng)
        k = rng.randrange(7)
        s2 = list(s1)
        for slot in rng.sample(range(6), k):
            choices = [w for w in pools[slot] if w != s1[slot]]
            s2[slot] = rng.choice(choices)

        def fmt(s):
            return f"the {s[0]} {s[1]} {s[2]} the {s[3]} {s[4]} {s[5]}"

        rows.append(
            {"sentence1": fmt(s1), "sentence2": fmt(s2), "label": round(5.0 * (1 - k / 6), 4), "idx": i}
        )
    return {"train": rows[:n_train], "validation": rows[n_train:]}
