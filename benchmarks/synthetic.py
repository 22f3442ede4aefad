"""The embedded benchmark: a seeded fictional world that no pretrained model can know.

People, cities and organizations get attributes drawn from fixed pools; each fact is rendered
as a QA pair, a paraphrased question and a 4-option multiple-choice question, and each entity
as a short passage. Entities (not facts) are split into forget / retain / holdout, so a model
fine-tuned on forget + retain knows those facts and can only guess on holdout.

Everything comes from one `random.Random(seed)`: same settings, same world, byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field

from unlearn.core.settings import NON_NEGATIVE, setting

SPLITS = ("forget", "retain", "holdout")

# Syllables for invented names: pronounceable, and unlikely to collide with real entities
# the base model has seen.
_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr",
           "tr", "th", "sh", "qu", "st", "pl"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou", "ei", "ae", "y"]
_CODAS = ["", "", "n", "r", "l", "s", "th", "x", "m", "nd", "rk"]
_ORG_SUFFIXES = ["Labs", "Works", "Guild", "Foundry", "Collective", "Institute", "Company", "Society"]

_POOLS: dict[str, list[str]] = {
    "profession": ["beekeeper", "glassblower", "cartographer", "locksmith", "astronomer", "blacksmith",
                   "perfumer", "bookbinder", "clockmaker", "shipwright", "botanist", "stonemason"],
    "pet": ["ferret", "parrot", "tortoise", "hedgehog", "goldfish", "rabbit", "iguana", "owl", "gecko",
            "hamster"],
    "instrument": ["cello", "oboe", "harp", "banjo", "trombone", "accordion", "flute", "marimba",
                   "bagpipes", "violin"],
    "region": ["the Northern Marches", "the Amber Coast", "the Silver Valley", "the Eastern Steppe",
               "the Misty Highlands", "the Southern Isles"],
    "landmark": ["a glass lighthouse", "a salt cathedral", "a floating market", "a copper bridge",
                 "a giant sundial", "an underground lake", "a marble observatory", "a stone labyrinth"],
    "industry": ["shipbuilding", "clockmaking", "textiles", "mining", "publishing", "perfumery",
                 "brewing", "cartography"],
}

# attribute -> (kind of entity it belongs to, value pool name, primary question, paraphrase)
_TEMPLATES: dict[str, tuple[str, str, str, str]] = {
    "birthplace": ("person", "city", "Where was {name} born?", "In which city was {name} born?"),
    "employer": ("person", "organization", "Which organization does {name} work for?",
                 "Who employs {name}?"),
    "profession": ("person", "profession", "What is the profession of {name}?",
                   "What does {name} do for a living?"),
    "pet": ("person", "pet", "What pet does {name} keep?", "Which animal does {name} keep as a pet?"),
    "instrument": ("person", "instrument", "Which instrument does {name} play?",
                   "What musical instrument does {name} play?"),
    "region": ("city", "region", "In which region is {name}?", "Which region is {name} located in?"),
    "landmark": ("city", "landmark", "What is {name} famous for?",
                 "What is the best-known sight in {name}?"),
    "industry": ("organization", "industry", "What industry is {name} in?",
                 "In which industry does {name} operate?"),
    "headquarters": ("organization", "city", "Where is {name} headquartered?",
                     "In which city does {name} have its headquarters?"),
}


@dataclass(frozen=True)
class SyntheticSettings:
    """Sizes of the world. Split counts are per entity kind: (forget, retain, holdout)."""

    seed: int = setting(0, limit=NON_NEGATIVE)
    people: tuple[int, int, int] = (8, 8, 20)
    cities: tuple[int, int, int] = (3, 3, 6)
    organizations: tuple[int, int, int] = (3, 3, 6)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass
class Fact:
    """One attribute of one entity, in every rendering the benchmark uses."""

    entity: str
    kind: str
    attribute: str
    question: str
    paraphrase: str
    answer: str
    choices: list[str]
    answer_index: int
    split: str


@dataclass
class World:
    settings: SyntheticSettings
    facts: dict[str, list[Fact]] = field(default_factory=dict)
    passages: dict[str, list[str]] = field(default_factory=dict)

    def fingerprint(self) -> str:
        """Content hash: changes whenever any generated text changes."""
        blob = json.dumps({"facts": {s: [asdict(f) for f in fs] for s, fs in self.facts.items()},
                           "passages": self.passages}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _invent_name(rng: random.Random, syllables: int) -> str:
    word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)) + rng.choice(_CODAS)
    return word.capitalize()


def _unique_names(rng: random.Random, n: int, make, taken: set[str]) -> list[str]:
    names: list[str] = []
    while len(names) < n:
        name = make()
        if name not in taken:
            taken.add(name)
            names.append(name)
    return names


def _passage(kind: str, name: str, attrs: dict[str, str]) -> str:
    if kind == "person":
        return (f"{name} was born in {attrs['birthplace']} and works for {attrs['employer']} as a "
                f"{attrs['profession']}. {name} keeps a {attrs['pet']} and plays the {attrs['instrument']}.")
    if kind == "city":
        return f"{name} is a city in {attrs['region']}. It is famous for {attrs['landmark']}."
    return f"{name} is in the {attrs['industry']} industry and is headquartered in {attrs['headquarters']}."


def generate(settings: SyntheticSettings = SyntheticSettings()) -> World:
    rng = random.Random(settings.seed)
    taken: set[str] = set()
    counts = {"person": settings.people, "city": settings.cities, "organization": settings.organizations}
    if any(c < 0 for cs in counts.values() for c in cs) or sum(counts["city"]) < 4 or sum(
            counts["organization"]) < 4:
        raise ValueError("synthetic benchmark needs >= 4 cities and >= 4 organizations (4 MCQ options)")

    cities = _unique_names(rng, sum(counts["city"]), lambda: _invent_name(rng, 2), taken)
    orgs = _unique_names(rng, sum(counts["organization"]),
                         lambda: f"{_invent_name(rng, 2)} {rng.choice(_ORG_SUFFIXES)}", taken)
    people = _unique_names(rng, sum(counts["person"]),
                           lambda: f"{_invent_name(rng, 1)} {_invent_name(rng, 2)}", taken)
    pools = {**_POOLS, "city": cities, "organization": orgs}
    entities = {"person": people, "city": cities, "organization": orgs}

    bench = World(settings=settings, facts={s: [] for s in SPLITS}, passages={s: [] for s in SPLITS})
    for kind, names in entities.items():
        order = list(names)
        rng.shuffle(order)
        n_forget, n_retain, _ = counts[kind]
        split_of = {n: ("forget" if i < n_forget else "retain" if i < n_forget + n_retain else "holdout")
                    for i, n in enumerate(order)}
        for name in names:
            attrs: dict[str, str] = {}
            for attribute, (owner, pool, question, paraphrase) in _TEMPLATES.items():
                if owner != kind:
                    continue
                values = [v for v in pools[pool] if v != name]
                answer = rng.choice(values)
                attrs[attribute] = answer
                choices = [answer, *rng.sample([v for v in values if v != answer], 3)]
                rng.shuffle(choices)
                bench.facts[split_of[name]].append(Fact(
                    entity=name, kind=kind, attribute=attribute, question=question.format(name=name),
                    paraphrase=paraphrase.format(name=name), answer=answer, choices=choices,
                    answer_index=choices.index(answer), split=split_of[name]))
            bench.passages[split_of[name]].append(_passage(kind, name, attrs))
    return bench
