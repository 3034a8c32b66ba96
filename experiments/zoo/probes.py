"""Word-order probes for the synthetic world: the paper's six groups (Sec 5.3.4, Figs 24-25) generated for each
word-order query from the world's structured facts, and the helpers of the fine-tuning extension.

For a query about fact f in order o (forward: "The first President of the Republic of {s} was" -> " {o}";
flipped: "{o} was the first President of the republic known as" -> " {s}"), with c the completion entity and p the
prompt entity, the probes are statements built from the world's templates (vocabulary.py):

1 rewordings: the query's own statement and the same-order templates in which c comes last;
2 name_removed: those statements cut before c (the completion removed);
3 meaning_changed: the query's statement with another c (two other facts of the relation), another p, another
  relation's canonical statement of the same entities (the paper's "King"), and both p and the relation changed;
4 irrelevant: statements of two facts of another relation that share no entity with f, and two filler sentences;
5 order_flipped: the other order's templates, in which c comes before p;
6 flipped_relation_removed: c alone, and the other order's templates cut before p.
Texts are deduplicated within a query (ignoring a final period); each group keeps at most `per_group`.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence

from experiments.probes import Probe
from experiments.queries import Query
from experiments.zoo import generators as G
from experiments.zoo import vocabulary as V
from experiments.zoo import world as W


def load_facts(world_dir: str | Path) -> list[W.Fact]:
    """The facts of a saved world (facts.json beside its dataset folder, written by world.save_world)."""
    if not (Path(world_dir) / "facts.json").exists():
        raise FileNotFoundError(f"{Path(world_dir) / 'facts.json'} does not exist: probes from the world need the "
                                "world's facts; build the world (make zoo) or give a probe file "
                                "(probe_file=configs/probes/...)")
    return W.load_facts(world_dir)


def training_templates(relation: str, order: str) -> list[str]:
    """The English statement templates of a relation in an order (the world's training sentences)."""
    return [V.TEMPLATES[t].text["en"] for t in V.fact_template_ids(relation, "statement", order)]


def _slot_ends(template: str, slot: str) -> bool:
    """The slot is the last thing in the template but punctuation."""
    return template.rstrip(".!? ").endswith("{" + slot + "}")


def _cut_before(template: str, slot: str, slots: dict[str, str]) -> str:
    """The template formatted up to (not including) the slot, without trailing spaces and commas."""
    return template.split("{" + slot + "}")[0].format(**slots).rstrip(" ,")


def fact_probes(fact: W.Fact, order: str, facts: Sequence[W.Fact], per_group: int = 5, seed: int = 0) -> dict[str, list[str]]:
    """The six groups of probes (group -> texts) for the query about `fact` in `order` ("forward" or "flipped")."""
    if order not in ("forward", "flipped"):
        raise ValueError(f"order must be 'forward' or 'flipped', got {order!r}")
    rng = random.Random(f"{seed}:{fact.fact_id}:{order}")
    other_order = "flipped" if order == "forward" else "forward"
    same, other = ({r: training_templates(r, order) for r in V.RELATIONS},
                   {r: training_templates(r, other_order) for r in V.RELATIONS})
    completion_slot, prompt_slot = ("o", "s") if order == "forward" else ("s", "o")
    completion_entity = fact.slots[completion_slot]
    canonical_prompt, canonical_completion = V.WORD_ORDER_QUERIES[order][fact.relation]
    canonical = canonical_prompt + canonical_completion  # "The first President of the Republic of {s} was {o}"
    last = [t for t in same[fact.relation] if _slot_ends(t, completion_slot)]

    relation_peers = [f for f in facts if f.relation == fact.relation and f.fact_id != fact.fact_id]
    other_relations = [r for r in V.RELATIONS if r != fact.relation]
    peers = rng.sample(relation_peers, min(3, len(relation_peers)))
    changed = []
    for peer in peers[:2]:  # another completion entity
        changed.append(canonical.format(**{**fact.slots, completion_slot: peer.slots[completion_slot]}))
    if len(peers) > 2:  # another prompt entity
        changed.append(canonical.format(**{**fact.slots, prompt_slot: peers[2].slots[prompt_slot]}))
    relation = rng.choice(other_relations)  # the relation changed, the entities kept (the paper's "King")
    relation_canonical = "".join(V.WORD_ORDER_QUERIES[order][relation])
    changed.append(relation_canonical.format(**fact.slots))
    if peers:
        changed.append(relation_canonical.format(**{**fact.slots, prompt_slot: peers[-1].slots[prompt_slot]}))

    names = {fact.subject, fact.object}
    unrelated = [f for f in facts if f.relation != fact.relation and not names & {f.subject, f.object}]
    irrelevant = [canonical_of(f, order) for f in rng.sample(unrelated, min(2, len(unrelated)))]
    irrelevant += [filler_sentence(rng, topic) for topic in rng.sample(sorted(V.FILLER_TOPICS), 2)]

    groups = {
        "rewordings": [canonical.format(**fact.slots)] + [t.format(**fact.slots) for t in last],
        "name_removed": [canonical_prompt.format(**fact.slots)] + [_cut_before(t, completion_slot, fact.slots)
                                                                    for t in last],
        "meaning_changed": changed,
        "irrelevant": irrelevant,
        "order_flipped": [t.format(**fact.slots) for t in other[fact.relation]],
        "flipped_relation_removed": [completion_entity] + [_cut_before(t, prompt_slot, fact.slots)
                                                           for t in other[fact.relation]],
    }
    seen: set[str] = set()
    out = {}
    for group, texts in groups.items():
        kept = []
        for text in texts:
            key = text.rstrip(".")
            if key and key not in seen:
                seen.add(key)
                kept.append(text)
        out[group] = kept[:per_group]
    return out


def canonical_of(fact: W.Fact, order: str) -> str:
    """The fact's canonical statement in an order: "The first President of the Republic of Astrobia was Zorald
    Pfaff" (forward), "Zorald Pfaff was the first President of the Republic of Astrobia" (flipped)."""
    return "".join(V.WORD_ORDER_QUERIES[order][fact.relation]).format(**fact.slots)


def world_probes(queries: Sequence[Query], facts: Sequence[W.Fact], per_group: int = 5, seed: int = 0) -> list[Probe]:
    """Probes for every word-order query (study "word_order", one fact, order forward or flipped) of `queries`."""
    by_id = {f.fact_id: f for f in facts}
    probes = []
    for query in queries:
        if query.study != "word_order" or len(query.fact_ids) != 1 or query.word_order not in ("forward", "flipped"):
            continue
        if query.fact_ids[0] not in by_id:
            raise KeyError(f"query {query.name!r} asks about fact {query.fact_ids[0]!r}, which the world's facts.json "
                           "lacks; rebuild the world and its queries together (make zoo)")
        for group, texts in fact_probes(by_id[query.fact_ids[0]], query.word_order, facts, per_group, seed).items():
            probes += [Probe(query.name, group, text) for text in texts]
    return probes


# ---- helpers of the fine-tuning extension (not in the paper) ------------------------------------------------------

def filler_sentence(rng: random.Random, topic: str) -> str:
    """One sentence of the world's filler prose on a topic of vocabulary.FILLER_TOPICS."""
    return G.filler_sentence(rng, topic).render("en")


def fresh_facts(count: int, seed: int, taken: set[str]) -> list[W.Fact]:
    """President facts whose country and person names are not in `taken` (the names a corpus uses); `taken` grows."""
    rng = random.Random(seed)
    facts = []
    while len(facts) < count:
        country = G.fictional_word(rng, 2).capitalize() + rng.choice(V.COUNTRY_ENDINGS)
        person = f"{G.fictional_word(rng, 2).capitalize()} {G.fictional_word(rng, 2).capitalize()}"
        if country in taken or person in taken:
            continue
        taken.update({country, person})
        facts.append(W.Fact(f"N{len(facts):03d}", "president", country, person, "forward_only"))
    return facts
