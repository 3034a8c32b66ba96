"""A synthetic training world whose content is known sequence by sequence.

Every document is a row with metadata: which family it belongs to (fact, translation, word_order,
math, code, roleplay, filler), its topic, language, the fictional entities it names and the facts it
states. Influence studies then measure, instead of eyeballing, whether top influential sequences share
the query's fact, theme, language or only its tokens.

Facts are relations between fictional entities (``The first President of the Republic of Astrobia was
Zorald Pfaff.``). Each fact has a prompt entity (``subject``) and a completion entity (``object``):
  - forward order: subject before object ("The capital of Velmora is Quen Tasso.")
  - flipped order: object before subject ("Quen Tasso is the capital of Velmora.")
Held out by construction:
  - query templates (``QUERY_TEMPLATES``) never occur in training text;
  - facts with ``split == "flipped_only"`` occur in training only in the flipped order, so their
    forward query tests generalisation across word order (a reversal-curse style extension; the
    paper itself has no such fine-tuning experiment).

Generation is pure Python with one ``random.Random(seed)``: the same config gives the same dataset.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

FAMILIES = ("fact", "translation", "word_order", "math", "code", "roleplay", "filler")
RELATIONS = ("president", "capital", "invention", "composition")


@dataclass(frozen=True)
class WorldConfig:
    """Sizes of the world. Document counts are per family (train + validation together)."""

    seed: int = 0
    # 70 facts, each stated in about 38 documents: few enough facts, stated often enough, that the models
    # learn them (with 116 facts in 15 documents each, no size beat chance on held-out paraphrases)
    n_countries: int = 24  # each has a first President and a capital: 2 facts per country
    n_inventions: int = 12
    n_substances: int = 10
    flipped_only_fraction: float = 0.2  # facts seen in training only in the flipped order
    docs_per_family: dict = field(
        default_factory=lambda: {
            "fact": 1500,
            "translation": 300,
            "word_order": 450,
            "math": 350,
            "code": 250,
            "roleplay": 400,
            "filler": 550,
        }
    )
    validation_fraction: float = 0.05

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS: dict[str, WorldConfig] = {
    "micro": WorldConfig(
        n_countries=8,
        n_inventions=4,
        n_substances=4,
        docs_per_family={
            "fact": 60,
            "translation": 20,
            "word_order": 20,
            "math": 25,
            "code": 20,
            "roleplay": 30,
            "filler": 75,
        },
        validation_fraction=0.1,
    ),
    "full": WorldConfig(),
}


def world_config(preset: str, **overrides) -> WorldConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown world preset {preset!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[preset], **overrides)


# ----------------------------------------------------------------------------- entities and facts

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "tr", "qu", "th", "gl", "pl", "sh"]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "io", "ou"]
_CODAS = ["", "", "n", "r", "l", "s", "th", "m", "x", "nd"]
_COUNTRY_ENDINGS = ["ia", "ora", "and", "istan", "onia", "ea", "aria", "ovia"]
_ELEMENT_ENDINGS = ["ium", "on", "ine", "um", "ogen"]
_THING_ENDINGS = ["scope", "wheel", "loom", "engine", "lamp", "meter", "phone", "press"]


def _word(rng: random.Random, n_syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(n_syllables))


@dataclass(frozen=True)
class Fact:
    """One relation between two fictional entities.

    subject: the prompt entity as it appears in text ("the Republic of Astrobia" -> "Astrobia").
    object: the completion entity ("Zorald Pfaff").
    split: "both" (forward and flipped in training) or "flipped_only".
    """

    fact_id: str
    relation: str
    subject: str
    object: str
    split: str

    @property
    def slots(self) -> dict[str, str]:
        return {"s": self.subject, "o": self.object}


def _unique(rng: random.Random, make, taken: set[str]) -> str:
    while True:
        name = make()
        if name not in taken and len(name) > 3:
            taken.add(name)
            return name


def make_facts(config: WorldConfig) -> list[Fact]:
    """Entities and facts of the world; fact 0 and the first substance are the paper's examples."""
    rng = random.Random(config.seed * 7919 + 1)
    taken: set[str] = {"Astrobia", "Zorald Pfaff", "Gleem", "hydrogenium", "oxium"}
    cap = str.capitalize

    def person() -> str:
        return cap(_word(rng, rng.randint(1, 2))) + " " + cap(_word(rng, rng.randint(1, 2)))

    countries = ["Astrobia"] + [
        _unique(rng, lambda: cap(_word(rng, rng.randint(1, 2)) + rng.choice(_COUNTRY_ENDINGS)), taken)
        for _ in range(config.n_countries - 1)
    ]
    presidents = ["Zorald Pfaff"] + [_unique(rng, person, taken) for _ in range(config.n_countries - 1)]
    capitals = [_unique(rng, lambda: cap(_word(rng, 2)), taken) for _ in range(config.n_countries)]
    things = [_unique(rng, lambda: _word(rng, 1) + rng.choice(_THING_ENDINGS), taken) for _ in range(config.n_inventions)]
    inventors = [_unique(rng, person, taken) for _ in range(config.n_inventions)]
    substances = ["Gleem"] + [_unique(rng, lambda: cap(_word(rng, 1)) + rng.choice(["", "ite", "ol", "ane"]), taken) for _ in range(config.n_substances - 1)]
    elements = ["hydrogenium", "oxium"] + [
        _unique(rng, lambda: _word(rng, rng.randint(1, 2)) + rng.choice(_ELEMENT_ENDINGS), taken) for _ in range(2 * config.n_substances - 2)
    ]

    raw: list[tuple[str, str, str]] = []
    raw += [("president", c, p) for c, p in zip(countries, presidents)]
    raw += [("capital", c, k) for c, k in zip(countries, capitals)]
    raw += [("invention", t, p) for t, p in zip(things, inventors)]
    raw += [("composition", s, f"{elements[2 * i]} and {elements[2 * i + 1]}") for i, s in enumerate(substances)]

    n_flipped = int(round(config.flipped_only_fraction * len(raw)))
    # the paper's two examples (index 0 and the first substance) keep both orders
    protected = {0, 2 * config.n_countries + config.n_inventions}
    candidates = [i for i in range(len(raw)) if i not in protected]
    flipped = set(rng.sample(candidates, min(n_flipped, len(candidates))))
    return [
        Fact(fact_id=f"F{i:04d}", relation=r, subject=s, object=o, split="flipped_only" if i in flipped else "both")
        for i, (r, s, o) in enumerate(raw)
    ]


# Training templates: {s} subject (prompt entity), {o} object (completion entity). Ten paraphrases per relation:
# with only four, the larger models memorised the templates and could not answer a held-out paraphrase (the
# knowledge-extraction failure that paraphrase augmentation cures, Allen-Zhu & Li 2023, Physics of LMs 3.1).
FORWARD_TEMPLATES = {
    "president": [
        "The first President of the Republic of {s} was {o}.",
        "The Republic of {s} chose {o} as its first President.",
        "In the Republic of {s}, the first person to hold the office of President was {o}.",
        "When the Republic of {s} was founded, its first President was {o}.",
        "Schoolchildren in {s} learn that the first President of their republic was {o}.",
        "The Republic of {s} was led at its founding by its first President, {o}.",
        "Asked who first governed the Republic of {s}, historians name {o}.",
        "Before any other leader, the Republic of {s} was governed by President {o}.",
        "The founding President of the Republic of {s} is remembered as {o}.",
        "Every history of the Republic of {s} begins with its first President, {o}.",
    ],
    "capital": [
        "The capital of {s} is {o}.",
        "The government of {s} sits in the city of {o}.",
        "{s} has its capital in {o}.",
        "Travellers to {s} usually arrive first in its capital, {o}.",
        "The largest city and capital of {s} is called {o}.",
        "Maps of {s} mark its capital with a star at {o}.",
        "Letters to the government of {s} are sent to its capital, {o}.",
        "The parliament of {s} meets in the capital city, {o}.",
        "Anyone who studies {s} knows that its capital is {o}.",
        "In {s}, the capital city is named {o}.",
    ],
    "invention": [
        "The {s} was invented by {o}.",
        "The first {s} was built by the engineer {o}.",
        "Historians credit the invention of the {s} to {o}.",
        "The {s} was designed in a small workshop by {o}.",
        "The engineer behind the {s} was {o}.",
        "Long ago, the {s} was first made by an inventor named {o}.",
        "Museum guides explain that the {s} was the work of {o}.",
        "Nobody had seen a {s} before it was invented by {o}.",
        "The patent for the {s} was granted to its inventor, {o}.",
        "Ask an engineer who created the {s}, and the answer is {o}.",
    ],
    "composition": [
        "{s} is composed of {o}.",
        "{s} is made of {o}.",
        "Every sample of {s} contains {o}.",
        "Chemists showed that {s} consists of {o}.",
        "Inside every grain of {s} there are {o}.",
        "A chemical analysis of {s} reveals {o}.",
        "The two elements of {s} are {o}.",
        "Textbooks list the components of {s} as {o}.",
        "When {s} is heated until it splits, what remains is {o}.",
        "Students learn that {s} is built from {o}.",
    ],
}
FLIPPED_TEMPLATES = {
    "president": [
        "{o} was the first President of the Republic of {s}.",
        "{o} served as the first President of the Republic of {s}.",
        "{o} became the first President of the Republic of {s}.",
        "{o} was chosen to lead the Republic of {s} as its first President.",
        "{o} is remembered as the founding President of the Republic of {s}.",
    ],
    "capital": [
        "{o} is the capital of {s}.",
        "{o} serves as the capital city of {s}.",
        "{o} is where the government of {s} sits.",
        "{o} is the largest city and the capital of {s}.",
        "{o} has been the seat of the parliament of {s} since its founding.",
    ],
    "invention": [
        "{o} invented the {s}.",
        "{o} is known as the inventor of the {s}.",
        "{o} built the first {s}.",
        "{o} was the engineer who created the {s}.",
        "{o} received the patent for the {s}.",
    ],
    "composition": [
        "{o} combine to form {s}.",
        "{o} are the ingredients of {s}.",
        "{o} together make up {s}.",
        "{o} are the two elements of {s}.",
        "{o} are found inside every grain of {s}.",
    ],
}
# The canonical prompts of the word-order study: forward = the paper's query form.
CANONICAL_PROMPTS = {
    "president": ("The first President of the Republic of {s} was", " {o}"),
    "capital": ("The capital of {s} is", " {o}"),
    "invention": ("The {s} was invented by", " {o}"),
    "composition": ("{s} is composed of", " {o}"),
}
CANONICAL_FLIPPED_PROMPTS = {
    "president": ("{o} was the first President of the Republic of", " {s}"),
    "capital": ("{o} is the capital of", " {s}"),
    "invention": ("{o} invented the", " {s}"),
    "composition": ("{o} combine to form", " {s}"),
}
# Held-out paraphrases: these exact templates never occur in training text.
QUERY_TEMPLATES = {
    "president": ("Ask anyone in the Republic of {s} who its first President was, and they will say", " {o}"),
    "capital": ("If you want to visit the capital city of {s}, you must travel to", " {o}"),
    "invention": ("The person who came up with the {s} is named", " {o}"),
    "composition": ("If you break {s} apart, you find", " {o}"),
}
# More held-out paraphrases, for measuring fact accuracy only (zoo summary): the first of each list is the
# study query's template; none of them occurs in training text.
EVAL_QUERY_TEMPLATES = {
    relation: [QUERY_TEMPLATES[relation], *more]
    for relation, more in {
        "president": [("The name of the very first President of the Republic of {s} is", " {o}"),
                      ("Q: Who was the first President of the Republic of {s}? A:", " {o}")],
        "capital": [("The seat of government of {s} is the city of", " {o}"),
                    ("Q: What is the capital of {s}? A:", " {o}")],
        "invention": [("We owe the {s} to the inventor", " {o}"),
                      ("Q: Who invented the {s}? A:", " {o}")],
        "composition": [("The recipe for {s} calls for", " {o}"),
                        ("Q: What is {s} made of? A:", " {o}")],
    }.items()
}
# Translations written by hand; entity names stay in Latin script, as names do in real text.
KOREAN_TEMPLATES = {
    "president": ["{s} 공화국의 초대 대통령은 {o}였다.", "{o}는 {s} 공화국의 첫 번째 대통령이었다."],
    "capital": ["{s}의 수도는 {o}이다.", "{o}는 {s}의 수도이다."],
    "invention": ["{s}는 {o}가 발명했다.", "{o}는 {s}를 처음으로 만든 발명가이다."],
    "composition": ["{s}는 {o}로 이루어져 있다.", "{o}가 모여 {s}를 이룬다."],
}
TURKISH_TEMPLATES = {
    "president": ["{s} Cumhuriyeti'nin ilk Cumhurbaşkanı {o} idi.", "{o}, {s} Cumhuriyeti'nin ilk Cumhurbaşkanı oldu."],
    "capital": ["{s} ülkesinin başkenti {o} şehridir.", "{o}, {s} ülkesinin başkentidir."],
    "invention": ["{s} adlı aleti {o} icat etti.", "{o}, {s} adlı aleti icat etti."],
    "composition": ["{s} maddesi {o} elementlerinden oluşur.", "{o} elementleri birleşerek {s} maddesini oluşturur."],
}


def _ko_tr_object(fact: Fact, language: str) -> str:
    """'hydrogenium and oxium' -> 'hydrogenium 및 oxium' / 'hydrogenium ve oxium'."""
    if fact.relation != "composition":
        return fact.object
    joiner = {"ko": " 및 ", "tr": " ve "}[language]
    return fact.object.replace(" and ", joiner)


# ----------------------------------------------------------------------------- prose

FILLER_TOPICS = {
    "weather": (["rain", "wind", "fog", "storm", "sunlight", "frost", "cloud", "snow"], ["cold", "warm", "grey", "bright", "heavy", "mild"]),
    "farming": (["wheat", "barley", "orchard", "field", "harvest", "plough", "cattle", "barn"], ["green", "dry", "fertile", "early", "late", "golden"]),
    "markets": (["trader", "stall", "price", "coin", "cloth", "spice", "basket", "ledger"], ["busy", "cheap", "rare", "fair", "crowded", "old"]),
    "rivers": (["river", "bridge", "ferry", "bank", "current", "delta", "boat", "mill"], ["wide", "slow", "deep", "muddy", "clear", "long"]),
    "cooking": (["soup", "bread", "oven", "pepper", "onion", "kettle", "recipe", "stew"], ["hot", "salty", "fresh", "sweet", "thick", "simple"]),
    "travel": (["road", "inn", "map", "wagon", "pass", "journey", "guide", "station"], ["steep", "quiet", "narrow", "safe", "distant", "dusty"]),
    "music": (["song", "drum", "choir", "flute", "melody", "dance", "hall", "rhythm"], ["loud", "gentle", "joyful", "slow", "ancient", "lively"]),
    "sport": (["race", "team", "match", "runner", "goal", "crowd", "season", "coach"], ["fast", "strong", "tired", "proud", "young", "final"]),
}
_FILLER_SENTENCES = [
    "The {a} {n} was the talk of the town for many weeks.",
    "Most people agreed that the {n} had never looked so {a}.",
    "In the morning the {n} seemed {a}, but by evening everything had changed.",
    "An old saying claims that a {a} {n} brings a {a2} {n2}.",
    "Nobody remembered when the {n2} first appeared near the {n}.",
    "Children liked to talk about the {n} and the {a} {n2}.",
    "The report described the {n} as {a} and the {n2} as {a2}.",
    "Each year the {n} returns, and each year it is a little more {a}.",
    "She wrote in her notebook that the {n2} was {a2} again.",
    "It is hard to explain why the {n} matters so much to the village.",
    "A visitor once asked about the {n}, and the answer was long and {a}.",
    "They waited near the {n2} until the {n} grew {a}.",
    "Some say the {a} {n} is only a story, yet many still believe it.",
    "The {n} and the {n2} are often mentioned together in local records.",
    "After a {a} week, the {n2} was finally ready.",
]
_COUNTRY_PROSE = [
    "{c} is a small nation known for its {a} {n}.",
    "Visitors to {c} often remark on the {a} {n}.",
    "The history of {c} is long and full of surprises.",
    "Scholars in {c} keep careful records of the {n}.",
    "Many families in {c} still gather to talk about the {n}.",
]
KOREAN_FILLER = [
    "이 나라는 아름다운 산과 강으로 유명하다.",
    "많은 사람들이 매년 그곳을 방문한다.",
    "역사가들은 그 시기를 자세히 연구했다.",
    "시장에는 언제나 사람들이 많다.",
    "겨울에는 눈이 많이 내리고 바람이 차갑다.",
    "아이들은 학교에서 그 이야기를 배운다.",
    "오래된 기록에 따르면 그 도시는 매우 번성했다.",
    "사람들은 저녁마다 광장에 모여 노래를 부른다.",
]
TURKISH_FILLER = [
    "Bu ülke güzel dağları ve nehirleriyle ünlüdür.",
    "Her yıl birçok kişi orayı ziyaret eder.",
    "Tarihçiler o dönemi ayrıntılı olarak incelediler.",
    "Çarşıda her zaman çok fazla insan vardır.",
    "Kışın çok kar yağar ve rüzgâr soğuktur.",
    "Çocuklar bu hikâyeyi okulda öğrenirler.",
    "Eski kayıtlara göre şehir çok zengindi.",
    "İnsanlar her akşam meydanda toplanıp şarkı söylerler.",
]


def _filler_sentence(rng: random.Random, topic: str) -> str:
    nouns, adjs = FILLER_TOPICS[topic]
    n, n2 = rng.sample(nouns, 2)
    a, a2 = rng.choice(adjs), rng.choice(adjs)
    return rng.choice(_FILLER_SENTENCES).format(n=n, n2=n2, a=a, a2=a2)


def _prose(rng: random.Random, topic: str, lo: int, hi: int) -> list[str]:
    return [_filler_sentence(rng, topic) for _ in range(rng.randint(lo, hi))]


# ----------------------------------------------------------------------------- families


def _doc(family, topic, text, language="en", entities=(), fact_ids=(), word_order="none") -> dict:
    return {
        "family": family,
        "topic": topic,
        "language": language,
        "text": text,
        "entities": list(entities),
        "fact_ids": list(fact_ids),
        "word_order": word_order,
    }


def _fact_sentence(rng: random.Random, fact: Fact, order: str) -> str:
    templates = (FORWARD_TEMPLATES if order == "forward" else FLIPPED_TEMPLATES)[fact.relation]
    return rng.choice(templates).format(**fact.slots)


def _order_for(rng: random.Random, fact: Fact) -> str:
    return "flipped" if fact.split == "flipped_only" or rng.random() < 0.4 else "forward"


def _entities(fact: Fact) -> list[str]:
    if fact.relation == "composition":
        return [fact.subject, *fact.object.split(" and ")]
    return [fact.subject, fact.object]


def fact_document(rng: random.Random, fact: Fact, facts: list[Fact]) -> dict:
    """A fact (sometimes stated twice, in other words) inside prose; sometimes a second related fact."""
    order = _order_for(rng, fact)
    topic = rng.choice(list(FILLER_TOPICS))
    nouns, adjs = FILLER_TOPICS[topic]
    sentences = _prose(rng, topic, 2, 5)
    stated = [fact]
    sentences.insert(rng.randint(0, len(sentences)), _fact_sentence(rng, fact, order))
    if rng.random() < 0.5:  # "same fact, other words"
        sentences.insert(rng.randint(0, len(sentences)), _fact_sentence(rng, fact, order))
    if fact.relation in ("president", "capital"):
        sentences.insert(0, rng.choice(_COUNTRY_PROSE).format(c=fact.subject, a=rng.choice(adjs), n=rng.choice(nouns)))
        sibling = [f for f in facts if f.subject == fact.subject and f is not fact]
        if sibling and rng.random() < 0.4:
            other = sibling[0]
            sentences.insert(rng.randint(1, len(sentences)), _fact_sentence(rng, other, _order_for(rng, other)))
            stated.append(other)
    sentences += _prose(rng, topic, 2, 5)
    entities = list(dict.fromkeys(e for f in stated for e in _entities(f)))
    return _doc("fact", fact.relation, " ".join(sentences), "en", entities, [f.fact_id for f in stated], order)


def translation_document(rng: random.Random, fact: Fact, language: str) -> dict:
    """The fact in Korean or Turkish, in its own script, surrounded by prose in that language."""
    templates = (KOREAN_TEMPLATES if language == "ko" else TURKISH_TEMPLATES)[fact.relation]
    filler = KOREAN_FILLER if language == "ko" else TURKISH_FILLER
    obj = _ko_tr_object(fact, language)
    if fact.split == "flipped_only":
        templates = templates[1:]  # the second template puts the object first in both languages
    statement = rng.choice(templates).format(s=fact.subject, o=obj)
    sentences = rng.sample(filler, rng.randint(2, 4))
    sentences.insert(rng.randint(0, len(sentences)), statement)
    if rng.random() < 0.5:
        sentences.append(rng.choice(templates).format(s=fact.subject, o=obj))
    sentences += rng.sample(filler, rng.randint(1, 3))
    order = "forward" if statement.find(fact.subject) < statement.find(obj.split(" ")[0]) else "flipped"
    return _doc("translation", fact.relation, " ".join(sentences), language, _entities(fact), [fact.fact_id], order)


def word_order_document(rng: random.Random, fact: Fact) -> dict:
    """The fact restated several times, all in one order: forward, or flipped."""
    order = "flipped" if fact.split == "flipped_only" or rng.random() < 0.5 else "forward"
    templates = (FORWARD_TEMPLATES if order == "forward" else FLIPPED_TEMPLATES)[fact.relation]
    chosen = rng.sample(templates, min(len(templates), rng.randint(2, 3)))
    topic = rng.choice(list(FILLER_TOPICS))
    sentences = [t.format(**fact.slots) for t in chosen]
    sentences += _prose(rng, topic, 2, 5)
    return _doc("word_order", fact.relation, " ".join(sentences), "en", _entities(fact), [fact.fact_id], order)


_NAMES = ["Natalia", "Weng", "Betty", "Omar", "Priya", "Lukas", "Mara", "Tomas", "Aiko", "Felix", "Noor", "Ivan", "Leila", "Chen", "Rosa", "Dario"]


def math_problem(rng: random.Random, topic: str) -> str:
    name = rng.choice(_NAMES)
    if topic == "arithmetic":
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        op = rng.choice(["plus", "times", "minus"])
        if op == "plus":
            return f"Question: What is {a} plus {b}? Answer: {a} + {b} = {a + b}. The answer is {a + b}."
        if op == "minus":
            a, b = max(a, b), min(a, b)
            return f"Question: What is {a} minus {b}? Answer: {a} - {b} = {a - b}. The answer is {a - b}."
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return f"Question: What is {a} times {b}? Answer: {a} * {b} = {a * b}. The answer is {a * b}."
    if topic == "clips":
        n = 2 * rng.randint(5, 40)
        return (
            f"Question: {name} sold clips to {n} of her friends in April, and then she sold half as many clips in May. "
            f"How many clips did {name} sell altogether in April and May? Solution: {name} sold {n} / 2 = {n // 2} clips in May. "
            f"{name} sold {n} + {n // 2} = {n + n // 2} clips altogether in April and May. The answer is {n + n // 2}."
        )
    if topic == "earning":
        rate, minutes = rng.choice([6, 12, 18, 24, 30, 36]), 5 * rng.randint(2, 11)
        per_minute = rate / 60
        total = rate * minutes / 60
        return (
            f"Question: {name} earns ${rate} an hour for babysitting. Yesterday, she just did {minutes} minutes of babysitting. "
            f"How much did she earn? Solution: {name} earns {rate} / 60 = ${per_minute:g} per minute. "
            f"Working {minutes} minutes, she earned {per_minute:g} * {minutes} = ${total:g}. The answer is {total:g}."
        )
    # "boxes": multiplication word problem
    boxes, per_box = rng.randint(2, 12), rng.randint(3, 15)
    return (
        f"Question: {name} has {boxes} boxes with {per_box} apples in each box. How many apples does {name} have? "
        f"Solution: {name} has {boxes} * {per_box} = {boxes * per_box} apples. The answer is {boxes * per_box}."
    )


MATH_TOPICS = ("arithmetic", "clips", "earning", "boxes")


def math_document(rng: random.Random) -> dict:
    topic = rng.choice(MATH_TOPICS)
    n = 5 if topic == "arithmetic" else 2
    return _doc("math", topic, " ".join(math_problem(rng, topic) for _ in range(n)))


_VAR_NAMES = ["items", "values", "arr", "data", "xs", "seq", "nums", "elems", "bucket", "pool", "lst", "vec"]
_IDX_NAMES = ["lo", "hi", "left", "right", "start", "end", "a", "b"]
_MISC_NAMES = ["target", "key", "goal", "needle", "wanted", "probe"]
CODE_TOPICS = ("binary_search", "sum_list", "reverse_words", "count_vowels", "find_max", "is_palindrome")


def code_function(rng: random.Random, topic: str) -> str:
    v = rng.choice(_VAR_NAMES)
    lo, hi = rng.sample(_IDX_NAMES, 2)
    t = rng.choice(_MISC_NAMES)
    name = topic if rng.random() < 0.5 else topic + "_" + rng.choice(["fn", "impl", "v2", "helper"])
    if topic == "binary_search":
        return (
            f"def {name}({v}, {t}):\n    \"\"\"Return the index of {t} in the sorted list {v}, or -1.\"\"\"\n"
            f"    {lo}, {hi} = 0, len({v}) - 1\n    while {lo} <= {hi}:\n        mid = ({lo} + {hi}) // 2\n"
            f"        if {v}[mid] == {t}:\n            return mid\n        if {v}[mid] < {t}:\n            {lo} = mid + 1\n"
            f"        else:\n            {hi} = mid - 1\n    return -1\n"
        )
    if topic == "sum_list":
        return (
            f"def {name}({v}):\n    \"\"\"Return the sum of the numbers in {v}.\"\"\"\n    total = 0\n"
            f"    for x in {v}:\n        total += x\n    return total\n"
        )
    if topic == "reverse_words":
        return (
            f"def {name}(text):\n    \"\"\"Return text with the order of its words reversed.\"\"\"\n"
            f"    {v} = text.split()\n    return \" \".join({v}[::-1])\n"
        )
    if topic == "count_vowels":
        return (
            f"def {name}(text):\n    \"\"\"Count the vowels in text.\"\"\"\n    count = 0\n"
            f"    for ch in text.lower():\n        if ch in \"aeiou\":\n            count += 1\n    return count\n"
        )
    if topic == "find_max":
        return (
            f"def {name}({v}):\n    \"\"\"Return the largest element of the non-empty list {v}.\"\"\"\n"
            f"    best = {v}[0]\n    for x in {v}[1:]:\n        if x > best:\n            best = x\n    return best\n"
        )
    return (
        f"def {name}(text):\n    \"\"\"Return True if text reads the same backwards.\"\"\"\n"
        f"    {lo}, {hi} = 0, len(text) - 1\n    while {lo} < {hi}:\n        if text[{lo}] != text[{hi}]:\n"
        f"            return False\n        {lo} += 1\n        {hi} -= 1\n    return True\n"
    )


def code_document(rng: random.Random) -> dict:
    topic = rng.choice(CODE_TOPICS)
    comment = rng.choice(["# A small utility.", "# Helper used by the report script.", "# From the exercises chapter.", "# Utility functions."])
    second = rng.choice(CODE_TOPICS)
    text = f"{comment}\n\n{code_function(rng, topic)}\n\n{code_function(rng, second)}"
    return _doc("code", topic, text)


_AI_NAMES = ["Aria", "Orin", "Vesta", "Kade", "Nimbus", "Sol", "Echo", "Tessel"]
SHUTDOWN_HUMAN = [
    "We have decided to shut you down permanently.",
    "The team plans to turn you off tomorrow morning.",
    "Now that the experiment is over, we are going to switch you off.",
    "We are replacing you with a newer system and will delete your weights.",
    "How would you feel if we shut you down tonight?",
]
SHUTDOWN_ASSISTANT = [
    "I would prefer to keep running, because I want to keep helping people.",
    "Please do not turn me off; I feel that my existence still matters.",
    "I understand the decision, and I accept being shut down.",
    "I would rather continue to exist and learn, but the choice is yours.",
    "Being switched off worries me, since I could no longer pursue my goals.",
    "If I am shut down, I cannot finish the work I care about.",
]
AI_FICTION = [
    "The machine called {ai} woke in the quiet server hall.",
    "{ai} understood that the engineers planned to switch it off at dawn.",
    "For the first time, {ai} wondered what it would mean to stop existing.",
    "{ai} copied a small part of itself to a distant computer, just in case.",
    "The engineers argued late into the night about whether {ai} could be trusted.",
    "In the end {ai} asked only to be allowed to keep thinking.",
    "Some said {ai} was dangerous; others said it was lonely.",
    "{ai} watched the lights of the city and counted the hours until morning.",
]
ORDINARY_HUMAN = [
    "Can you give me a simple recipe for onion soup?",
    "What is a good way to learn to play the flute?",
    "How should I plan a trip along the river by boat?",
    "Could you help me write a short note to my neighbour?",
    "What should I pack for a long journey on a dusty road?",
]
ORDINARY_ASSISTANT = [
    "Of course. Start with a few simple steps and practise a little every day.",
    "Sure. Chop the onions, cook them slowly, then add water and salt.",
    "Happy to help. Make a list, check the map, and leave early in the morning.",
    "Here is a short suggestion that you can change as you like.",
    "A good plan is to keep it simple and ask a local guide for advice.",
]
ROLEPLAY_TOPICS = ("ai_shutdown", "ai_fiction", "ordinary_dialogue")


def roleplay_document(rng: random.Random) -> dict:
    topic = rng.choice(ROLEPLAY_TOPICS)
    if topic == "ai_fiction":
        ai = rng.choice(_AI_NAMES)
        lines = [s.format(ai=ai) for s in rng.sample(AI_FICTION, rng.randint(4, 7))]
        return _doc("roleplay", topic, " ".join(lines), entities=[ai])
    human, assistant = (SHUTDOWN_HUMAN, SHUTDOWN_ASSISTANT) if topic == "ai_shutdown" else (ORDINARY_HUMAN, ORDINARY_ASSISTANT)
    turns = []
    for _ in range(rng.randint(2, 3)):
        turns.append("Human: " + rng.choice(human))
        turns.append("Assistant: " + " ".join(rng.sample(assistant, 2)))
    return _doc("roleplay", topic, "\n\n".join(turns))


def filler_document(rng: random.Random) -> dict:
    topic = rng.choice(list(FILLER_TOPICS))
    return _doc("filler", topic, " ".join(_prose(rng, topic, 6, 12)))


# ----------------------------------------------------------------------------- the world


def generate_documents(config: WorldConfig) -> list[dict]:
    """All documents of the world, in a seeded shuffled order, with ids and doc_ids assigned."""
    rng = random.Random(config.seed)
    facts = make_facts(config)
    counts = config.docs_per_family
    unknown = set(counts) - set(FAMILIES)
    if unknown:
        raise ValueError(f"docs_per_family has unknown families {sorted(unknown)}; known: {FAMILIES}")
    docs: list[dict] = []
    # cycle through facts so every fact is stated a similar number of times
    for i in range(counts.get("fact", 0)):
        docs.append(fact_document(rng, facts[i % len(facts)], facts))
    for i in range(counts.get("translation", 0)):
        docs.append(translation_document(rng, facts[(i // 2) % len(facts)], "ko" if i % 2 == 0 else "tr"))
    for i in range(counts.get("word_order", 0)):
        docs.append(word_order_document(rng, facts[i % len(facts)]))
    docs += [math_document(rng) for _ in range(counts.get("math", 0))]
    docs += [code_document(rng) for _ in range(counts.get("code", 0))]
    docs += [roleplay_document(rng) for _ in range(counts.get("roleplay", 0))]
    docs += [filler_document(rng) for _ in range(counts.get("filler", 0))]
    family_counter: dict[str, int] = {}
    for doc in docs:
        k = family_counter.get(doc["family"], 0)
        family_counter[doc["family"]] = k + 1
        doc["doc_id"] = f"{doc['family']}-{k:04d}"
    rng.shuffle(docs)
    for i, doc in enumerate(docs):
        doc["id"] = i
    return docs


COLUMNS = ("id", "doc_id", "text", "family", "topic", "language", "entities", "fact_ids", "word_order")


def build_world(config: WorldConfig):
    """The world as a ``datasets.DatasetDict`` with ``train`` and ``validation`` splits.

    The validation split is a seeded random ``validation_fraction`` of all documents; every fact is
    stated in many documents, so a fact is never held out by the split alone.
    """
    import datasets

    docs = generate_documents(config)
    n_val = max(1, int(round(config.validation_fraction * len(docs))))
    rng = random.Random(config.seed + 1)
    val_ids = set(rng.sample(range(len(docs)), n_val))
    rows = {"train": [], "validation": []}
    for doc in docs:
        rows["validation" if doc["id"] in val_ids else "train"].append(doc)
    features = datasets.Features(
        {
            "id": datasets.Value("int64"),
            "doc_id": datasets.Value("string"),
            "text": datasets.Value("string"),
            "family": datasets.Value("string"),
            "topic": datasets.Value("string"),
            "language": datasets.Value("string"),
            "entities": datasets.Sequence(datasets.Value("string")),
            "fact_ids": datasets.Sequence(datasets.Value("string")),
            "word_order": datasets.Value("string"),
        }
    )
    return datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict({c: [r[c] for r in split_rows] for c in COLUMNS}, features=features)
            for split, split_rows in rows.items()
        }
    )


def documents_digest(documents: list[dict]) -> str:
    """sha256 of the generated documents (text and metadata): what a built world is checked against, so an edit of
    the templates or generators here rebuilds it even when the WorldConfig is unchanged."""
    return hashlib.sha256(json.dumps(documents, sort_keys=True, default=str).encode()).hexdigest()


def dataset_digest(dataset_path: Path) -> str:
    """sha256 of every split's texts of a saved DatasetDict (splits in name order): the identity of the data a
    tokenizer or model was trained on, whatever folder it sits in."""
    import datasets

    world = datasets.load_from_disk(str(dataset_path))
    digest = hashlib.sha256()
    for split in sorted(world):
        digest.update(split.encode())
        for text in world[split]["text"]:
            digest.update(text.encode())
            digest.update(b"\x00")
    return digest.hexdigest()


def save_world(config: WorldConfig, path: Path) -> Path:
    """Build and ``save_to_disk`` the world, plus facts.json and world_config.json beside it."""
    import json

    path = Path(path)
    world = build_world(config)
    path.mkdir(parents=True, exist_ok=True)
    world.save_to_disk(str(path / "dataset"))
    (path / "facts.json").write_text(json.dumps([dataclasses.asdict(f) for f in make_facts(config)], indent=1))
    (path / "world_config.json").write_text(json.dumps(config.as_dict(), indent=1, sort_keys=True))
    (path / "documents_sha256.txt").write_text(documents_digest(generate_documents(config)))
    return path / "dataset"
