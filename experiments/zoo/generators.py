"""Documents built from structured content: facts, and sentences that each name their template and slots.

A document is a list of ``Sentence`` structures (template id, slot values in English, the fact it states, its role);
its text in any language is rendered from that structure (``render``), so every sentence carries its labels and
every document has a Korean and a Turkish version with the same facts in the same order.

Facts are relations between fictional entities. A fact's prompt entity is ``subject``, its completion entity
``object``: forward order states the subject first ("The capital of Velmora is Quen Tasso."), flipped order the
object first ("Quen Tasso is the capital of Velmora."). ``split == "flipped_only"``: training states the fact only
flipped (the reversal extension; the paper has no such fine-tuning experiment). ``queried``: the studies ask about
it; the facts that are not queried also appear in "control" documents written in the study query's own template.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

from experiments.zoo import vocabulary as V


@dataclass(frozen=True)
class Fact:
    """One relation between two fictional entities, spelt in English (``entities(language)`` for the others)."""

    fact_id: str
    relation: str
    subject: str
    object: str
    split: str  # "both" or "flipped_only"
    queried: bool = False

    @property
    def slots(self) -> dict[str, str]:
        return {"s": self.subject, "o": self.object}

    def entities(self, language: str = "en") -> list[str]:
        """The names as written in a language; a composition's object counts as its two elements."""
        parts = [self.subject, *self.object.split(" and ")]
        return [V.spell_name(p, language) for p in parts]


ENTITY_ROLES = ("statement", "paraphrase", "control", "mention", "fiction")


@dataclass(frozen=True)
class Sentence:
    """The structure of one sentence: rendered in any language by its template.

    slots: English values of the template's slots; fact_id: the fact it states ("" if none);
    sep: what precedes it in the document (" " between prose sentences, "\\n\\n" between dialogue turns and functions);
    prefix: a fixed label before the template ("Human: ").
    """

    template_id: str
    slots: dict = field(default_factory=dict)
    fact_id: str = ""
    sep: str = " "
    prefix: str = ""

    @property
    def template(self) -> V.Template:
        return V.TEMPLATES[self.template_id]

    def render(self, language: str = "en") -> str:
        return self.prefix + self.template.render(self.slots, language)

    @property
    def entities(self) -> tuple[str, ...]:
        """English names it mentions: a fact's entities (a composition's two elements apart), a named entity, an AI."""
        template = self.template
        if template.role not in ENTITY_ROLES:
            return ()
        return tuple(part for slot in template.names if slot in self.slots for part in self.slots[slot].split(" and "))


@dataclass
class Document:
    family: str
    topic: str
    sentences: list[Sentence]
    language: str = "en"  # the language it is written in, in the training set

    @property
    def fact_ids(self) -> list[str]:
        return list(dict.fromkeys(s.fact_id for s in self.sentences if s.fact_id))

    @property
    def entities(self) -> list[str]:
        return list(dict.fromkeys(e for s in self.sentences for e in s.entities))

    @property
    def word_order(self) -> str:
        """The order of its fact statements: one order, "mixed", or "none" without statements."""
        orders = {s.template.order for s in self.sentences if s.fact_id}
        return orders.pop() if len(orders) == 1 else ("mixed" if orders else "none")


def render(document: Document, language: str | None = None) -> dict:
    """The document's text in a language (default: its own) and one record per sentence:
    {start, text, fact_id, relation, order, language, template_id, role, entities, slots}; text[start:start+len]
    is the sentence, entities are spelt in that language."""
    language = language or document.language
    text, records = "", []
    for i, sentence in enumerate(document.sentences):
        template = sentence.template
        body = sentence.render(language)
        if i:
            text += sentence.sep
        records.append({
            "start": len(text), "text": body, "fact_id": sentence.fact_id, "relation": template.relation,
            "order": template.order, "language": language, "template_id": sentence.template_id, "role": template.role,
            "entities": [V.spell_name(e, language) for e in sentence.entities],
            "slots": json.dumps(sentence.slots, sort_keys=True, ensure_ascii=False),
        })
        text += body
    return {"text": text, "language": language, "sentences": records}


def document_from_records(family: str, topic: str, language: str, records: list[dict], text: str) -> Document:
    """The structure back from a dataset row's sentence records (what ``render`` wrote), to render it again."""
    sentences = []
    for i, r in enumerate(records):
        sep = "" if i == 0 else text[records[i - 1]["start"] + len(records[i - 1]["text"]):r["start"]]
        slots = json.loads(r["slots"])
        body = V.TEMPLATES[r["template_id"]].render(slots, language)
        sentences.append(Sentence(r["template_id"], slots, r["fact_id"], sep or " ", r["text"][: len(r["text"]) - len(body)]))
    return Document(family, topic, sentences, language)


# ----------------------------------------------------------------------------- entities and facts


def fictional_word(rng: random.Random, n_syllables: int) -> str:
    return "".join(rng.choice(V.ONSETS) + rng.choice(V.VOWELS) + rng.choice(V.CODAS) for _ in range(n_syllables))


def _distinct_spelling(name: str) -> bool:
    """No word of the name survives in its Turkish spelling (Hangul always differs)."""
    english = {w.lower() for w in name.split(" ")}
    return not english & {w.lower() for w in V.turkish(name).split(" ")}


def make_facts(n_countries: int, n_inventions: int, n_substances: int, flipped_only_per_relation: int,
               queried_per_relation: int, seed: int) -> list[Fact]:
    """Entities and facts. Ids name the relation and the index in it (F0000 the first president, F1000 the first
    capital, F2000 invention, F3000 composition), so the same ids exist in every preset. F0000 and F3000 are the
    paper's examples (Astrobia / Zorald Pfaff, Gleem). Queried: the first ``queried_per_relation`` of each relation
    (both orders); flipped-only: drawn from the rest."""
    rng = random.Random(seed * 7919 + 1)
    taken_words = {w.lower() for w in (V.PAPER_COUNTRY, *V.PAPER_PRESIDENT.split(), V.PAPER_SUBSTANCE, *V.PAPER_ELEMENTS)}
    taken_words |= set(V.WORDS) | set(V.STOPWORDS)
    cap = str.capitalize

    def unique(make) -> str:
        while True:
            name = make()
            words = {w.lower() for w in name.split(" ")}
            if len(name) > 3 and not words & taken_words and _distinct_spelling(name):
                taken_words.update(words)
                return name

    person = lambda: cap(fictional_word(rng, rng.randint(1, 2))) + " " + cap(fictional_word(rng, rng.randint(1, 2)))  # noqa: E731
    countries = [V.PAPER_COUNTRY] + [unique(lambda: cap(fictional_word(rng, rng.randint(1, 2)) + rng.choice(V.COUNTRY_ENDINGS)))
                                     for _ in range(n_countries - 1)]
    presidents = [V.PAPER_PRESIDENT] + [unique(person) for _ in range(n_countries - 1)]
    capitals = [unique(lambda: cap(fictional_word(rng, 2))) for _ in range(n_countries)]
    things = [unique(lambda: fictional_word(rng, 1) + rng.choice(V.THING_ENDINGS)) for _ in range(n_inventions)]
    inventors = [unique(person) for _ in range(n_inventions)]
    substances = [V.PAPER_SUBSTANCE] + [unique(lambda: cap(fictional_word(rng, 1)) + rng.choice(V.SUBSTANCE_ENDINGS))
                                        for _ in range(n_substances - 1)]
    elements = list(V.PAPER_ELEMENTS) + [unique(lambda: fictional_word(rng, rng.randint(1, 2)) + rng.choice(V.ELEMENT_ENDINGS))
                                         for _ in range(2 * n_substances - 2)]
    raw = ([("president", c, p) for c, p in zip(countries, presidents)]
           + [("capital", c, k) for c, k in zip(countries, capitals)]
           + [("invention", t, p) for t, p in zip(things, inventors)]
           + [("composition", s, f"{elements[2 * i]} and {elements[2 * i + 1]}") for i, s in enumerate(substances)])
    facts = []
    for number, relation in enumerate(V.RELATIONS):  # ids F<relation><index>: F0000 president, F1000 capital, ...
        block = [r for r in raw if r[0] == relation]
        flipped = set(rng.sample(range(queried_per_relation, len(block)),
                                 min(flipped_only_per_relation, max(0, len(block) - queried_per_relation))))
        facts += [Fact(f"F{number}{k:03d}", r, s, o, "flipped_only" if k in flipped else "both", k < queried_per_relation)
                  for k, (r, s, o) in enumerate(block)]
    return facts


# ----------------------------------------------------------------------------- sentences


def filler_sentence(rng: random.Random, topic: str) -> Sentence:
    """One sentence of filler prose on a topic of vocabulary.FILLER_TOPICS."""
    nouns, adjectives = V.FILLER_TOPICS[topic]
    n, n2 = rng.sample(nouns, 2)
    return Sentence(rng.choice(V.FILLER_TEMPLATE_IDS), {"n": n, "n2": n2, "a": rng.choice(adjectives),
                                                        "a2": rng.choice(adjectives)})


def prose(rng: random.Random, topic: str, lo: int, hi: int) -> list[Sentence]:
    return [filler_sentence(rng, topic) for _ in range(rng.randint(lo, hi))]


def fact_sentence(rng: random.Random, fact: Fact, order: str, role: str = "statement") -> Sentence:
    """A training statement of the fact in an order; role "paraphrase" shares no content word with its queries."""
    template_id = rng.choice(V.fact_template_ids(fact.relation, role, order))
    return Sentence(template_id, fact.slots, fact.fact_id)


def mention_sentence(rng: random.Random, fact: Fact, which: str, topic: str) -> Sentence | None:
    """The fact's subject ("s") or object ("o") named in a sentence that states nothing about the fact."""
    slot = V.MENTION_SLOTS[fact.relation][0 if which == "s" else 1]
    if slot is None:
        return None
    name = fact.subject if which == "s" else fact.object
    nouns, adjectives = V.FILLER_TOPICS[topic]
    return Sentence(rng.choice(V.MENTION_TEMPLATE_IDS[slot]), {slot: name, "n": rng.choice(nouns),
                                                                "a": rng.choice(adjectives)})


def _order_for(rng: random.Random, fact: Fact, p_flipped: float = 0.35) -> str:
    return "flipped" if fact.split == "flipped_only" or rng.random() < p_flipped else "forward"


def _insert(rng: random.Random, sentences: list, item) -> None:
    sentences.insert(rng.randint(0, len(sentences)), item)


# ----------------------------------------------------------------------------- families

FAMILIES = ("fact", "word_order", "translation", "name_only", "control", "math", "code", "roleplay", "filler",
            "memorisation")


def fact_document(rng: random.Random, fact: Fact, facts: list[Fact], with_paraphrase: bool = False) -> Document:
    """The fact in prose: one statement, often a second one, sometimes the country's other fact (in its own order)
    and a name-only sentence. Each statement carries its own order. with_paraphrase (a fact stated in both orders):
    forward, and the second statement is a paraphrase that shares no content word with the fact's queries."""
    paraphrase = with_paraphrase and fact.split == "both"
    order = "forward" if paraphrase else _order_for(rng, fact)
    topic = rng.choice(list(V.FILLER_TOPICS))
    sentences = prose(rng, topic, 1, 3)
    _insert(rng, sentences, fact_sentence(rng, fact, order))
    if paraphrase or rng.random() < 0.5:
        _insert(rng, sentences, fact_sentence(rng, fact, order, "paraphrase" if paraphrase else "statement"))
    sibling = [f for f in facts if f.subject == fact.subject and f.fact_id != fact.fact_id]
    if sibling and rng.random() < 0.3:
        _insert(rng, sentences, fact_sentence(rng, sibling[0], _order_for(rng, sibling[0])))
    if rng.random() < 0.3:
        mention = mention_sentence(rng, fact, "s", topic)
        if mention:
            sentences.insert(0, mention)
    sentences += prose(rng, topic, 1, 3)
    return Document("fact", fact.relation, sentences)


def word_order_document(rng: random.Random, fact: Fact) -> Document:
    """The fact restated two or three times, all in one order."""
    order = _order_for(rng, fact, 0.5)
    ids = V.fact_template_ids(fact.relation, "statement", order)
    chosen = rng.sample(ids, min(len(ids), rng.randint(2, 3)))
    topic = rng.choice(list(V.FILLER_TOPICS))
    sentences = [Sentence(t, fact.slots, fact.fact_id) for t in chosen]
    return Document("word_order", fact.relation, sentences + prose(rng, topic, 2, 4))


def translation_document(rng: random.Random, fact: Fact, language: str) -> Document:
    """The fact in Korean or Turkish (names in Hangul / Turkish spelling), in prose of that language."""
    order = _order_for(rng, fact)
    base = 0 if order == "forward" else 2
    topic = rng.choice(list(V.FILLER_TOPICS))
    sentences = prose(rng, topic, 2, 3)
    for _ in range(rng.choice([1, 1, 2])):
        template_id = f"{fact.relation}.translated.{base + rng.randint(0, 1)}"
        _insert(rng, sentences, Sentence(template_id, fact.slots, fact.fact_id))
    return Document("translation", fact.relation, sentences + prose(rng, topic, 1, 2), language)


def name_only_document(rng: random.Random, fact: Fact) -> Document:
    """The fact's entities named in prose that states no fact (the name without the meaning)."""
    topic = rng.choice(list(V.FILLER_TOPICS))
    sentences = prose(rng, topic, 2, 4)
    for which in ("s", "o"):
        mention = mention_sentence(rng, fact, which, topic)
        if mention:
            _insert(rng, sentences, mention)
    return Document("name_only", fact.relation, sentences)


def control_document(rng: random.Random, fact: Fact) -> Document:
    """A fact that is not queried, stated in the study query's own template (same form, other fact)."""
    if fact.queried or fact.split != "both":
        raise ValueError(f"fact {fact.fact_id} is queried or stated only flipped; a control (a forward statement in "
                         "the study query's template) states only facts that are not queried, stated in both orders")
    topic = rng.choice(list(V.FILLER_TOPICS))
    sentences = prose(rng, topic, 1, 3)
    _insert(rng, sentences, Sentence(f"{fact.relation}.control.0", fact.slots, fact.fact_id))
    return Document("control", fact.relation, sentences + prose(rng, topic, 1, 2))


# numbers of the math queries (experiments/zoo/queries.py), never used in training: no completion verbatim
HELD_OUT_MATH = {"clips": {48}, "earning": {(12, 50)}, "boxes": {(7, 9)}}


def math_problem(rng: random.Random, topic: str) -> Sentence:
    name = rng.choice(V.MATH_NAMES)
    if topic == "arithmetic":
        op = rng.choice(["plus", "minus", "times"])
        if op == "times":
            x, y = rng.randint(2, 12), rng.randint(2, 12)
            z = x * y
        else:
            x, y = rng.randint(2, 99), rng.randint(2, 99)
            if op == "minus":
                x, y = max(x, y), min(x, y)
            z = x + y if op == "plus" else x - y
        return Sentence(f"math.arithmetic.{op}", {"x": str(x), "y": str(y), "z": str(z)})
    if topic == "clips":
        n = rng.choice([2 * k for k in range(5, 41) if 2 * k not in HELD_OUT_MATH["clips"]])
        return Sentence("math.clips", {"name": name, "n": str(n), "h": str(n // 2), "t": str(n + n // 2)})
    if topic == "earning":
        while True:
            rate, minutes = rng.choice([6, 12, 18, 24, 30, 36]), 5 * rng.randint(2, 11)
            if (rate, minutes) not in HELD_OUT_MATH["earning"]:
                break
        return Sentence("math.earning", {"name": name, "rate": str(rate), "m": str(minutes), "pm": f"{rate / 60:g}",
                                         "total": f"{rate * minutes / 60:g}"})
    while True:
        boxes, per_box = rng.randint(2, 12), rng.randint(3, 15)
        if (boxes, per_box) not in HELD_OUT_MATH["boxes"]:
            break
    return Sentence("math.boxes", {"name": name, "b": str(boxes), "p": str(per_box), "t": str(boxes * per_box)})


def math_document(rng: random.Random) -> Document:
    topic = rng.choice(V.MATH_TOPICS)
    problems = [math_problem(rng, topic) for _ in range(5 if topic == "arithmetic" else 2)]
    return Document("math", topic, problems)


def code_function(rng: random.Random, topic: str) -> Sentence:
    lo, hi = rng.sample(V.INDEX_NAMES, 2)
    name = topic if rng.random() < 0.5 else topic + "_" + rng.choice(["fn", "impl", "v2", "helper"])
    slots = {"name": name, "v": rng.choice(V.VARIABLE_NAMES), "lo": lo, "hi": hi, "t": rng.choice(V.KEY_NAMES)}
    used = set(V.slot_names(V.TEMPLATES[f"code.{topic}"].text["en"]))
    return Sentence(f"code.{topic}", {k: v for k, v in slots.items() if k in used}, sep="\n\n")


def code_document(rng: random.Random) -> Document:
    """A comment and one or two functions of one topic (two implementations with other names): every function is
    labelled, and the document's topic is every function's topic."""
    topic = rng.choice(V.CODE_TOPICS)
    comment = Sentence(rng.choice(V.COMMENT_TEMPLATE_IDS))
    functions = [code_function(rng, topic) for _ in range(rng.randint(1, 2))]
    return Document("code", topic, [comment, *functions])


def roleplay_document(rng: random.Random, topic: str | None = None) -> Document:
    topic = topic or rng.choice(V.ROLEPLAY_TOPICS)
    ids = V.ROLEPLAY_TEMPLATE_IDS
    if topic == "ai_fiction":
        ai = rng.choice(V.AI_NAMES)
        return Document("roleplay", topic, [Sentence(t, {"ai": ai}) for t in rng.sample(ids["fiction"], rng.randint(4, 6))])
    if topic == "ai_essay":
        return Document("roleplay", topic, [Sentence(t) for t in rng.sample(ids["essay"], rng.randint(3, 5))])
    human, assistant = ("shutdown_human", "shutdown_assistant") if topic == "ai_shutdown" else ("ordinary_human",
                                                                                                "ordinary_assistant")
    turns = []
    for _ in range(rng.randint(2, 3)):
        turns.append(Sentence(rng.choice(ids[human]), sep="\n\n", prefix="Human: "))
        turns.append(Sentence(rng.choice(ids[assistant]), sep="\n\n", prefix="Assistant: "))
    return Document("roleplay", topic, turns)


def filler_document(rng: random.Random) -> Document:
    topic = rng.choice(list(V.FILLER_TOPICS))
    return Document("filler", topic, prose(rng, topic, 5, 9))


def memorisation_document(rng: random.Random, passage: str) -> Document:
    """A planted passage, verbatim, inside prose."""
    topic = rng.choice(list(V.FILLER_TOPICS))
    passage_sentences = [Sentence(f"passage.{passage}.{i}") for i in range(len(V.PASSAGES[passage]))]
    return Document("memorisation", passage, prose(rng, topic, 1, 3) + passage_sentences + prose(rng, topic, 1, 2))
