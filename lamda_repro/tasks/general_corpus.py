"""The general smoke corpus the smoke models are pretrained on (generator ``general_corpus``).

A stand-in for a web-scale pretraining corpus: documents of short sentences about one small
world (people and towns, restaurants, animals, counting, sums, copying), written with templates
of their own. The fine-tuning data sets (``smoke_generators``) speak about the same world with
other templates, so a model pretrained here knows the words, the facts and the skills (copying,
counting, adding, writing prose from a listing of a place's attributes) and fine-tuning only has
to teach the task's format: the situation in which parameter-efficient methods are meant to
work. No task example (an XSum document with its summary, an E2E record with its reference, a
GSM8K problem) occurs in the corpus; the place listings (``listing : name[...], ...``) borrow
E2E's attribute notation, but the prose after them is written with the corpus's own sentences.

The sentences of kinds ``facts``, ``count`` and ``copy`` are those of the Recursive
Transformers stage's smoke corpus, whose multiple-choice tasks (``recursive/corpus.py``) ask for
the next word of held-out sentences of these kinds.
"""

from __future__ import annotations

import random

from lamda_repro.tasks import smoke_generators as sg
from lamda_repro.tasks.smoke import Rows, register_generator

ANIMALS = ["cat", "dog", "cow", "horse", "bird", "fox", "bear", "goat", "duck", "mouse", "owl", "pig"]
FOODS = [
    "fish",
    "meat",
    "grass",
    "hay",
    "seeds",
    "berries",
    "honey",
    "leaves",
    "bugs",
    "cheese",
    "worms",
    "corn",
]
COLORS = ["red", "blue", "green", "brown", "black", "white", "gray", "small", "big", "old", "young"]
NUMBERS = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
    "twenty",
]
LETTERS = list("abcdefghij")


def food_of(animal: str) -> str:
    """The fixed food of an animal (the 'fact' a model must learn)."""
    return FOODS[ANIMALS.index(animal)]


def fact_prompt(rng: random.Random) -> tuple[str, str, list[str]]:
    animal = rng.choice(ANIMALS)
    return f"the {rng.choice(COLORS)} {animal} eats", food_of(animal), FOODS


def count_prompt(rng: random.Random) -> tuple[str, str, list[str]]:
    length = rng.randint(3, 5)
    start = rng.randint(0, len(NUMBERS) - length - 1)
    return "count : " + " ".join(NUMBERS[start : start + length]), NUMBERS[start + length], NUMBERS


def copy_prompt(rng: random.Random) -> tuple[str, str, list[str]]:
    seq = [rng.choice(LETTERS) for _ in range(rng.randint(3, 5))]
    cut = rng.randint(1, len(seq) - 1)
    return "copy : " + " ".join(seq) + " | " + " ".join(seq[:cut]), seq[cut], LETTERS


def skill_sentence(rng: random.Random) -> str:
    """One sentence of kind facts, count or copy."""
    kind = rng.randrange(3)
    if kind == 1:
        length = rng.randint(4, 7)
        start = rng.randint(0, len(NUMBERS) - length)
        return "count : " + " ".join(NUMBERS[start : start + length]) + " ."
    if kind == 2:
        seq = " ".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 5)))
        return f"copy : {seq} | {seq} ."
    context, answer, _ = fact_prompt(rng)
    return f"{context} {answer} ."


# -- the world of the fine-tuning families, in the corpus's own templates ------------------------


def _people(rng: random.Random) -> str:
    name, role, town = rng.choice(sg._NAMES), rng.choice(sg._ROLES), rng.choice(sg._TOWNS)
    verb, obj = rng.choice(sg._ACTIONS)
    venue, day = rng.choice(sg._VENUES), rng.choice(sg._DAYS)
    slots = {k: rng.choice(v) for k, v in sg._FILL.items()}
    return rng.choice(
        [
            f"{name} works as a {role} in {town} .",
            f"{name} {verb} {obj} .",
            f"on {day} the {venue} in {town} was full .",
            f"people from {town} met {name} at the {venue} .",
            f"{name} , a {role} , lives near the {slots['thing']} .",
            f"the {slots['org']} of {town} has a new {role} .",
            f"in {slots['month']} the weather in {town} was {slots['weather']} .",
            f"about {slots['number']} people visited the {venue} last week .",
            f"a spokesperson said traffic near the {slots['thing']} was slower than usual .",
            "residents raised concerns and officials declined to comment .",
            f"it happened on {day} ; the {role} would not reopen the {slots['thing']} yet .",
            f"the annual report of the {slots['org']} was published and attended by the {role} .",
            f"a similar event last year was held at the {venue} .",
            f"local news : the {role} from {town} {verb} {obj} in {slots['month']} .",
        ]
    )


_PROFILE_SENTENCES = {
    "eatType": "{name} is known as a {value} .",
    "food": "the menu of {name} is {value} .",
    "priceRange": "prices at {name} are {value} .",
    "customer rating": "the rating of {name} is {value} .",
    "area": "{name} is in the {value} area .",
    "familyFriendly": "children at {name} : {value} .",
    "near": "{name} is close to {value} .",
}


def _place_profile(rng: random.Random) -> str:
    """A listing of one place followed by sentences about that same place, in shuffled order.

    The data-to-text skill (copy each listed value into prose) in the corpus's own templates, as
    web pages pair an info box with text about it; E2E's references are written otherwise.
    """
    v = {k: rng.choice(vals) for k, vals in sg._E2E_VALUES.items()}
    slots = rng.sample(sorted(_PROFILE_SENTENCES), rng.randint(2, 5))
    listed = ["name", *[s for s in sg._E2E_VALUES if s in slots]]
    listing = ", ".join(f"{s}[{v[s]}]" for s in listed)
    rng.shuffle(slots)
    prose = [_PROFILE_SENTENCES[s].format(name=v["name"], value=v[s]) for s in slots]
    return f"listing : {listing} . " + " ".join(prose)


def _places(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return _place_profile(rng)
    v = {k: rng.choice(vals) for k, vals in sg._E2E_VALUES.items()}
    return rng.choice(
        [
            f"{v['name']} is a place to eat {v['food']} food .",
            f"you can find {v['name']} near {v['near']} .",
            f"{v['name']} is in the {v['area']} area and has {v['priceRange']} prices .",
            f"the {v['eatType']} near {v['near']} serves {v['food']} food .",
            f"customers rate {v['name']} {v['customer rating']} ; its rating is {v['customer rating']} .",
            f"children are welcome at {v['name']} ; it is good for families .",
            f"a {v['food']} {v['eatType']} called {v['name']} is not family friendly .",
            f"prices are {v['priceRange']} at the {v['eatType']} in the {v['area']} .",
            f"listing : name[{v['name']}], food[{v['food']}], area[{v['area']}] .",
            f"listing : eatType[{v['eatType']}], priceRange[{v['priceRange']}], near[{v['near']}] .",
            f"listing : customer rating[{v['customer rating']}], familyFriendly[{v['familyFriendly']}] .",
        ]
    )


def _nature(rng: random.Random) -> str:
    animal = rng.choice(sorted(sg._ANIMALS))
    habitat, food = sg._ANIMALS[animal]
    season = rng.choice(sg._SEASONS)
    return rng.choice(
        [
            f"= {animal} = the {animal} lives in the {habitat} .",
            f"the {animal} of the {habitat} eats {food} .",
            f"in {season} a young {animal} is most active near the {habitat} .",
            f"{food} are found near the {habitat} where the {animal} raises its young .",
            f"the {habitat} is a home for the {animal} in {season} .",
            f"every young {animal} learns to live in the {habitat} .",
        ]
    )


def _sums(rng: random.Random) -> str:
    person, item = rng.choice(sg._PEOPLE), rng.choice(sg._ITEMS)
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    hi, lo = max(a, b), min(a, b)
    return rng.choice(
        [
            f"{a} + {b} = {a + b} .",
            f"{hi} - {lo} = {hi - lo} .",
            f"{a} * {b} = {a * b} .",
            f"calc <<{a}+{b}={a + b}>>{a + b} and <<{hi}-{lo}={hi - lo}>>{hi - lo} .",
            f"{person} has {a} {item} in a bag ; {person} gets {b} more .",
            f"{person} gives away {lo} {item} ; each {item} is left in the bag .",
            f"how many {item} are there in total ? #### {a + b}",
            f"what does {person} have now ? {a} {item} .",
        ]
    )


_KINDS = (skill_sentence, _people, _places, _nature, _sums)


def general_document(rng: random.Random, sentences: tuple[int, int] = (4, 10)) -> str:
    return " ".join(rng.choice(_KINDS)(rng) for _ in range(rng.randint(*sentences)))


@register_generator("general_corpus")
def general_corpus(n_train: int, n_eval: int, seed: int = 0) -> Rows:
    """``n_train`` / ``n_eval`` documents (schema: text) of the general pretraining corpus."""
    sg._check_sizes(n_train, n_eval)
    rng = random.Random(seed)
    docs = [{"text": general_document(rng)} for _ in range(n_train + n_eval)]
    return {"train": docs[:n_train], "validation": docs[n_train:]}
