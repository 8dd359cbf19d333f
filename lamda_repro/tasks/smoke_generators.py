"""Smoke data generators for summarization, E2E data-to-text, WikiText-style LM and GSM8K.

Each is deterministic in (n_train, n_eval, seed, options), writes rows in the schema of the
Hub data set it stands in for, and is built so that a tiny model (hidden 64, 2-4 layers)
learns it in seconds to a minute on a CPU: small vocabularies, fixed templates, and targets
that are a deterministic function of the input. Text is lowercase without apostrophes or
hyphens so that the smoke models' word-level tokenizer decodes it back to the same tokens
the metrics see.
"""

from __future__ import annotations

import random
from typing import Any

from lamda_repro.tasks.smoke import Rows, register_generator


def _check_sizes(n_train: int, n_eval: int) -> None:
    if n_train < 1 or n_eval < 1:
        raise ValueError(f"n_train and n_eval must be >= 1, got {n_train} and {n_eval}")


# -- summarization (XSum / CNN-DailyMail schema) --------------------------------------------

_NAMES = [
    "anna",
    "boris",
    "carla",
    "david",
    "elena",
    "farid",
    "greta",
    "hugo",
    "irene",
    "jonas",
    "katya",
    "leon",
    "maria",
    "nikos",
    "olga",
    "pavel",
]
_ROLES = ["mayor", "coach", "singer", "doctor", "teacher", "judge", "chef", "pilot", "author", "captain"]
_TOWNS = ["leeds", "bristol", "york", "derby", "bath", "hull", "luton", "exeter", "dover", "ely"]
_ACTIONS = [
    ("opened", "a new library"),
    ("won", "the regional prize"),
    ("closed", "the old bridge"),
    ("launched", "a charity appeal"),
    ("sold", "the family farm"),
    ("signed", "a new contract"),
    ("visited", "the flood zone"),
    ("announced", "a surprise retirement"),
    ("rescued", "a stranded dog"),
    ("painted", "a huge mural"),
]
_VENUES = ["town hall", "city stadium", "harbour", "market square", "county court", "museum"]
_DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
_FILLERS = [
    "the weather in {town} was {weather} for most of the week .",
    "local officials said the {thing} would reopen in {month} .",
    "a spokesperson for the {org} declined to comment .",
    "about {number} people attended a similar event last year .",
    "residents in {town} have raised concerns about the {thing} .",
    "the {org} has not published its annual report yet .",
    "traffic near the {thing} was slower than usual .",
]
_FILL = {
    "weather": ["wet", "cold", "sunny", "windy", "mild"],
    "thing": ["car park", "swimming pool", "railway line", "bus station", "post office"],
    "month": ["march", "april", "june", "october", "december"],
    "org": ["county council", "local police", "water company", "rail operator", "health trust"],
    "number": [str(n) for n in (40, 75, 120, 300, 500)],
}


def _filler(rng: random.Random) -> str:
    slots = {k: rng.choice(v) for k, v in _FILL.items()}
    slots["town"] = rng.choice(_TOWNS)
    return rng.choice(_FILLERS).format(**slots)


def _summary_example(rng: random.Random, n_fillers: int) -> tuple[str, str, str]:
    name, role, town = rng.choice(_NAMES), rng.choice(_ROLES), rng.choice(_TOWNS)
    verb, obj = rng.choice(_ACTIONS)
    venue, day = rng.choice(_VENUES), rng.choice(_DAYS)
    key = f"{name} , the {role} from {town} , {verb} {obj} at the {venue} on {day} ."
    sentences = [_filler(rng) for _ in range(n_fillers)]
    sentences.insert(rng.randrange(n_fillers + 1), key)
    summary = f"the {role} {name} {verb} {obj} in {town} ."
    when = f"it happened at the {venue} on {day} ."
    return " ".join(sentences), summary, when


@register_generator("summary_pairs")
def summary_pairs(
    n_train: int, n_eval: int, seed: int = 0, schema: str = "xsum", min_fillers: int = 3, max_fillers: int = 5
) -> Rows:
    """Templated news documents; the summary restates the one sentence that names a person.

    ``schema: xsum`` gives document / summary / id; ``schema: cnn_dailymail`` gives article /
    highlights (two lines: the summary and when/where it happened) / id.
    """
    _check_sizes(n_train, n_eval)
    if schema not in ("xsum", "cnn_dailymail"):
        raise ValueError(f"summary_pairs: schema must be xsum or cnn_dailymail, got {schema!r}")
    if not 0 <= min_fillers <= max_fillers:
        raise ValueError(
            f"summary_pairs: need 0 <= min_fillers <= max_fillers, got {min_fillers}, {max_fillers}"
        )
    rng = random.Random(seed)
    rows = []
    for i in range(n_train + n_eval):
        document, summary, when = _summary_example(rng, rng.randint(min_fillers, max_fillers))
        if schema == "xsum":
            rows.append({"document": document, "summary": summary, "id": f"{i:06d}"})
        else:
            rows.append({"article": document, "highlights": f"{summary}\n{when}", "id": f"{i:06d}"})
    return {"train": rows[:n_train], "validation": rows[n_train:]}


# -- E2E NLG (meaning representation -> text) ----------------------------------------------

_E2E_VALUES = {
    "name": [
        "the eagle",
        "the mill",
        "blue spice",
        "the punter",
        "green man",
        "the wrestlers",
        "aromi",
        "zizzi",
        "fitzbillies",
        "the vaults",
        "loch fyne",
        "cocum",
    ],
    "eatType": ["restaurant", "coffee shop", "pub"],
    "food": ["french", "italian", "chinese", "indian", "english", "japanese"],
    "priceRange": ["cheap", "moderate", "high"],
    "customer rating": ["low", "average", "high"],
    "area": ["riverside", "city centre"],
    "familyFriendly": ["yes", "no"],
    "near": ["burger king", "the sorrento", "cafe rouge", "all bar one", "the bakers"],
}
_E2E_OPTIONAL = ["priceRange", "customer rating", "area", "familyFriendly", "near"]


def _e2e_mr(rng: random.Random) -> dict[str, str]:
    slots = ["name", "eatType", "food"] + sorted(
        rng.sample(_E2E_OPTIONAL, rng.randint(1, 3)), key=_E2E_OPTIONAL.index
    )
    return {s: rng.choice(_E2E_VALUES[s]) for s in slots}


def format_mr(mr: dict[str, str]) -> str:
    """E2E's MR syntax: 'name[the eagle], eatType[pub], ...'."""
    return ", ".join(f"{slot}[{value}]" for slot, value in mr.items())


def _e2e_extras(mr: dict[str, str], style: int) -> list[str]:
    out = []
    if "priceRange" in mr:
        out.append(
            [
                f"it has {mr['priceRange']} prices .",
                f"prices are {mr['priceRange']} .",
                f"it is {mr['priceRange']} .",
            ][style]
        )
    if "customer rating" in mr:
        out.append(
            [
                f"it has a {mr['customer rating']} customer rating .",
                f"customers rate it {mr['customer rating']} .",
                f"its rating is {mr['customer rating']} .",
            ][style]
        )
    if "familyFriendly" in mr:
        friendly = mr["familyFriendly"] == "yes"
        out.append(
            [
                f"it is {'' if friendly else 'not '}family friendly .",
                f"children are {'welcome' if friendly else 'not welcome'} .",
                f"it is {'good' if friendly else 'not good'} for families .",
            ][style]
        )
    return out


def realize_mr(mr: dict[str, str], style: int) -> str:
    """One of three templated realizations (style 0, 1, 2) of an MR."""
    where = f" in the {mr['area']} area" if "area" in mr else ""
    near = f" near {mr['near']}" if "near" in mr else ""
    first = [
        f"{mr['name']} is a {mr['food']} {mr['eatType']}{where}{near} .",
        f"there is a {mr['food']} {mr['eatType']} called {mr['name']}{where}{near} .",
        f"{mr['name']} serves {mr['food']} food{where}{near} ; it is a {mr['eatType']} .",
    ][style]
    return " ".join([first] + _e2e_extras(mr, style))


@register_generator("e2e_records")
def e2e_records(n_train: int, n_eval: int, seed: int = 0, refs_per_mr: int = 3, schema: str = "e2e") -> Rows:
    """Restaurant MRs with ``refs_per_mr`` templated references each (E2E schema).

    n_train / n_eval count rows; with ``schema: e2e`` (tuetschek/e2e_nlg) each row is one
    (meaning_representation, human_reference) pair, with ``schema: gem`` (GEM/e2e_nlg) rows
    carry gem_id, gem_parent_id, meaning_representation, target and the MR's full references list.
    Eval MRs never occur in the training split.
    """
    _check_sizes(n_train, n_eval)
    if not 1 <= refs_per_mr <= 3:
        raise ValueError(f"e2e_records: refs_per_mr must be 1..3, got {refs_per_mr}")
    if schema not in ("e2e", "gem"):
        raise ValueError(f"e2e_records: schema must be e2e or gem, got {schema!r}")
    rng = random.Random(seed)
    seen: set[str] = set()

    def split_rows(n_rows: int, split: str) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        while len(rows) < n_rows:
            mr = _e2e_mr(rng)
            text = format_mr(mr)
            if text in seen:
                continue
            seen.add(text)
            refs = [realize_mr(mr, style) for style in range(refs_per_mr)]
            for ref in refs[: n_rows - len(rows)]:
                if schema == "e2e":
                    rows.append({"meaning_representation": text, "human_reference": ref})
                else:
                    gem_id = f"e2e_nlg-{split}-{len(rows)}"
                    rows.append(
                        {
                            "gem_id": gem_id,
                            "gem_parent_id": gem_id,
                            "meaning_representation": text,
                            "target": ref,
                            "references": refs,
                        }
                    )
        return rows

    return {"train": split_rows(n_train, "train"), "validation": split_rows(n_eval, "validation")}


# -- WikiText-style corpus -----------------------------------------------------------------

_ANIMALS = {
    "otter": ("river", "fish"),
    "badger": ("forest", "worms"),
    "puffin": ("cliffs", "sand eels"),
    "hare": ("meadow", "grass"),
    "heron": ("marsh", "frogs"),
    "squirrel": ("woodland", "nuts"),
    "fox": ("hedgerow", "rabbits"),
    "seal": ("coast", "cod"),
    "owl": ("barn", "mice"),
    "deer": ("valley", "leaves"),
}
_SEASONS = ["spring", "summer", "autumn", "winter"]


def _wiki_article(rng: random.Random) -> list[str]:
    animal = rng.choice(sorted(_ANIMALS))
    habitat, food = _ANIMALS[animal]
    season = rng.choice(_SEASONS)
    count = rng.choice([2, 3, 4, 5])
    paragraphs = [
        f" the {animal} lives in the {habitat} and eats {food} . in {season} the {animal} "
        f"raises {count} young in the {habitat} . ",
        f" a young {animal} learns to find {food} near the {habitat} . the {animal} is most "
        f"active in {season} . ",
    ]
    lines = [f" = the {animal} of the {habitat} = ", ""]
    for p in paragraphs[: rng.randint(1, 2)]:
        lines += [p, ""]
    return lines


@register_generator("wiki_corpus")
def wiki_corpus(n_train: int, n_eval: int, seed: int = 0) -> Rows:
    """WikiText-style lines (schema: text): titled articles of facts that repeat across articles.

    n_train / n_eval count lines (blank lines included, as in WikiText). Each animal always
    has the same habitat and food, so a trained model's perplexity falls far below uniform.
    """
    _check_sizes(n_train, n_eval)
    rng = random.Random(seed)

    def lines(n: int) -> list[dict[str, str]]:
        out: list[str] = []
        while len(out) < n:
            out.extend(_wiki_article(rng))
        return [{"text": t} for t in out[:n]]

    return {"train": lines(n_train), "validation": lines(n_eval)}


# -- GSM8K-style arithmetic word problems --------------------------------------------------

_PEOPLE = ["tom", "mia", "sam", "lena", "omar", "zoe", "raj", "ivy"]
_ITEMS = ["apples", "marbles", "stickers", "books", "coins", "pencils", "shells", "cards"]


def _problem(rng: random.Random, max_operand: int, ops: str) -> tuple[str, str]:
    person, item, op = rng.choice(_PEOPLE), rng.choice(_ITEMS), rng.choice(ops)
    a, b = rng.randint(1, max_operand), rng.randint(1, max_operand)
    if op == "+":
        question = (
            f"{person} has {a} {item} . {person} gets {b} more {item} . "
            f"how many {item} does {person} have now ?"
        )
        result = a + b
    elif op == "-":
        a, b = max(a, b), min(a, b)
        question = (
            f"{person} has {a} {item} . {person} gives away {b} {item} . "
            f"how many {item} does {person} have left ?"
        )
        result = a - b
    else:
        question = (
            f"{person} has {a} bags with {b} {item} in each bag . "
            f"how many {item} does {person} have in total ?"
        )
        result = a * b
    answer = f"{person} has {a} {op} {b} = <<{a}{op}{b}={result}>>{result} {item} .\n#### {result}"
    return question, answer


@register_generator("arithmetic_problems")
def arithmetic_problems(
    n_train: int, n_eval: int, seed: int = 0, max_operand: int = 9, ops: str = "+-"
) -> Rows:
    """One-step word problems with a numeric answer in GSM8K format (question, answer "... #### n")."""
    _check_sizes(n_train, n_eval)
    if max_operand < 1:
        raise ValueError(f"arithmetic_problems: max_operand must be >= 1, got {max_operand}")
    if not ops or set(ops) - set("+-*"):
        raise ValueError(f"arithmetic_problems: ops must be a non-empty string of + - *, got {ops!r}")
    rng = random.Random(seed)
    rows = [
        dict(zip(("question", "answer"), _problem(rng, max_operand, ops), strict=True))
        for _ in range(n_train + n_eval)
    ]
    return {"train": rows[:n_train], "validation": rows[n_train:]}
