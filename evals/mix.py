"""The held-out RULER-style mix: ten task families in natural prose, a fixed dev split and a disjoint test split.

Every sample is (split, index) -> seed = SEED_BASE[split] + index, and everything in it (family, haystack source,
passages, needles, depths) is drawn from that seed. Haystacks are whole passages of the split's own prose
(`haystacks.py`), so dev and test share no sample seed and no passage.

The prompt is a query-agnostic context (a generic task intro, then the prose with the needles) followed by the
question, as in RULER and kvpress's pipeline: protocol A prefills both, protocol B compresses the context before
the question arrives. Scores are RULER's string match: the fraction of the expected strings in the output.

Families: niah_number, niah_word, niah_uuid (single needles: one number, one word, a 20-character key), multikey
(4 keys, one asked), multivalue (one key, 3 values), multiquery (3 keys asked), vt (a 4-hop variable chain
beside a distractor chain), mqar (a block of 12 name -> locker pairs, 2 asked), cwe (which of 6 recorded birds
occurs most often: 4 times vs 1), qa (two-hop: person -> workplace -> city).
"""

from __future__ import annotations

import random
import string
from dataclasses import asdict, dataclass, field

from llmpatch.errors import ParameterError

from .haystack import insert_at_depth
from .haystacks import SOURCES, SPLITS, haystack_sentences
from .suites import ADJECTIVES, NOUNS

SEED_BASE = {"dev": 1_000_000, "test": 2_000_000}
MAX_SAMPLES = 1_000_000  # per split: the seed ranges never overlap
WORDS = ["saffron", "turbine", "glacier", "mandolin", "obsidian", "pelican", "quasar", "tundra", "zeppelin",
         "lantern", "marigold", "cobalt", "harpoon", "juniper", "kestrel", "nebula", "paprika", "sequoia"]  # fmt: skip
NAMES = ["Alice", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ingrid", "Jonas", "Keiko",
         "Lars", "Marta", "Nadia", "Omar", "Priya", "Quentin", "Rosa", "Stefan", "Tomas", "Ulla", "Viktor"]  # fmt: skip
BIRDS = [
    "heron",
    "sparrow",
    "falcon",
    "magpie",
    "puffin",
    "osprey",
    "wren",
    "kingfisher",
    "albatross",
    "lapwing",
]
PLACES = [
    "bakery",
    "observatory",
    "shipyard",
    "museum",
    "pharmacy",
    "library",
    "brewery",
    "aquarium",
    "foundry",
]
CITIES = ["Lisbon", "Kyoto", "Nairobi", "Oslo", "Quito", "Hanoi", "Tallinn", "Dakar", "Perth", "Tbilisi"]


@dataclass
class MixSample:
    family: str
    split: str
    index: int
    seed: int
    length: int
    source: str  # haystack source
    passages: list[str]  # passage keys used
    context: str  # user message part before the question (task intro + prose with needles)
    question: str
    answers: list[str]
    max_new_tokens: int
    context_ids: list[int] = field(default_factory=list)  # the rendered prompt, tokenized in two parts
    question_ids: list[int] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return len(self.context_ids) + len(self.question_ids)

    def to_dict(self) -> dict:
        return asdict(self)


def score(answers: list[str], output: str) -> float:
    """RULER's string match: the fraction of expected strings found in the output (case-insensitive)."""
    out = output.lower()
    return sum(a.lower() in out for a in answers) / len(answers)


def _key(rng) -> str:
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def _keys(rng, n) -> list[str]:
    return rng.sample([f"{a}-{b}" for a in ADJECTIVES for b in NOUNS], n)


def _number(rng) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _intro(noun: str) -> str:
    return (f"Some special magic {noun}s are hidden within the following text. Make sure to memorize them. "
            f"I will quiz you about the {noun}s afterwards.")  # fmt: skip


NUM_INTRO = _intro("number")


def _single(noun: str, key: str, value: str, max_new: int):
    """One needle of a kind (number, word, code), asked by its key."""
    return (_intro(noun), [f"One of the special magic {noun}s for {key} is: {value}."],
            f"What is the special magic {noun} for {key} mentioned in the provided text?", [value], max_new,
            f"The special magic {noun} for {key} mentioned in the provided text is")  # fmt: skip


def niah_number(rng):
    key = _key(rng)
    return _single("number", key, _number(rng), 16)


def niah_word(rng):
    key = _key(rng)
    return _single("word", key, rng.choice(WORDS), 12)


def niah_uuid(rng):
    key = _key(rng)
    value = "-".join("".join(rng.choice("0123456789abcdef") for _ in range(n)) for n in (8, 4, 6))
    return _single("code", key, value, 32)


def multikey(rng):
    keys = _keys(rng, 4)
    values = [_number(rng) for _ in keys]
    needles = [
        f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, values, strict=True)
    ]
    asked = rng.randrange(4)
    return (NUM_INTRO, needles,
            f"What is the special magic number for {keys[asked]} mentioned in the provided text?",
            [values[asked]], 16, f"The special magic number for {keys[asked]} mentioned in the provided text is")  # fmt: skip


def multivalue(rng):
    key = _key(rng)
    values = [_number(rng) for _ in range(3)]
    return (NUM_INTRO, [f"One of the special magic numbers for {key} is: {v}." for v in values],
            f"What are all the special magic numbers for {key} mentioned in the provided text?", values, 40,
            f"The special magic numbers for {key} mentioned in the provided text are")  # fmt: skip


def multiquery(rng):
    keys = _keys(rng, 3)
    values = [_number(rng) for _ in keys]
    needles = [
        f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, values, strict=True)
    ]
    return (NUM_INTRO, needles,
            f"What are the special magic numbers for {', '.join(keys)} mentioned in the provided text?",
            values, 40, f"The special magic numbers for {', '.join(keys)} mentioned in the provided text are")  # fmt: skip


def vt(rng):
    letters = string.ascii_uppercase
    names = ["".join(rng.choice(letters) for _ in range(5)) for _ in range(8)]
    value, other = rng.randint(10000, 99999), rng.randint(10000, 99999)
    chain, noise = names[:4], names[4:]
    lines = [f"VAR {chain[0]} = {value}."] + [
        f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:], strict=False)
    ]
    lines += [f"VAR {noise[0]} = {other}."] + [
        f"VAR {b} = VAR {a}." for a, b in zip(noise, noise[1:], strict=False)
    ]
    intro = "Memorize and track the chains of variable assignments hidden in the following text."
    return (intro, lines,
            f"Find all variables that are assigned the value {value} in the text above.", chain, 32,
            f"According to the chain of variable assignments in the text above, the variables assigned the value "
            f"{value} are:")  # fmt: skip


def mqar(rng):
    names = rng.sample(NAMES, 12)
    lockers = rng.sample(range(100, 1000), 12)
    block = (
        "The locker numbers are: " + ", ".join(f"{n} {x}" for n, x in zip(names, lockers, strict=True)) + "."
    )
    asked = rng.sample(range(12), 2)
    intro = "A list of people and their locker numbers is hidden within the following text. Memorize it."
    q = f"What are the locker numbers of {names[asked[0]]} and {names[asked[1]]}?"
    return (
        intro,
        [block],
        q,
        [str(lockers[i]) for i in asked],
        16,
        f"The locker numbers of {names[asked[0]]} and {names[asked[1]]} are",
    )


def cwe(rng):
    birds = rng.sample(BIRDS, 6)
    seen = [birds[0]] * 4 + birds[1:]
    rng.shuffle(seen)
    intro = "Birds seen by an observer are recorded throughout the following text. Keep count of them."
    needles = [f"The observer recorded a {b} at this point." for b in seen]
    return (
        intro,
        needles,
        "Which bird did the observer record most often?",
        [birds[0]],
        8,
        "The bird the observer recorded most often is the",
    )


def qa(rng):
    people = rng.sample(NAMES, 3)
    places = rng.sample(PLACES, 3)
    cities = rng.sample(CITIES, 3)
    facts = [f"{p} works at the {w}." for p, w in zip(people, places, strict=True)]
    facts += [f"The {w} is in {c}." for w, c in zip(places, cities, strict=True)]
    intro = "Facts about some people, their workplaces and the cities of those workplaces are in the text."
    return intro, facts, f"In which city does {people[0]} work?", [cities[0]], 8, f"{people[0]} works in"


FAMILIES = {f.__name__: f for f in (niah_number, niah_word, niah_uuid, multikey, multivalue, multiquery, vt,
                                    mqar, cwe, qa)}  # fmt: skip


def _render(tokenizer, context: str, question: str, prefix: str) -> tuple[str, str]:
    """The chat-templated prompt split at the question: (context part, question part + RULER's answer prefix
    at the start of the assistant's turn)."""
    text = f"{context}\n\n{question}"
    if getattr(tokenizer, "chat_template", None):
        full = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=False)  # fmt: skip
    else:
        full = text + "\nAnswer:"
    at = full.rindex(question)
    return full[:at], full[at:] + prefix


def make_sample(tokenizer, split: str, index: int, length: int, families=None) -> MixSample:
    """Sample `index` of `split`: its family is families[index % len(families)], everything else comes from its
    seed. The prompt (context + question, tokenized) has at most `length` tokens."""
    if split not in SPLITS:
        raise ParameterError(f"split: must be one of {', '.join(SPLITS)}, got {split!r}")
    if not isinstance(index, int) or not 0 <= index < MAX_SAMPLES:
        raise ParameterError(f"index: must be an int in 0..{MAX_SAMPLES - 1}, got {index!r}")
    families = list(families or FAMILIES)
    bad = [f for f in families if f not in FAMILIES]
    if bad:
        raise ParameterError(f"families: unknown {bad}; available: {', '.join(FAMILIES)}")
    family = families[index % len(families)]
    seed = SEED_BASE[split] + index
    rng = random.Random(f"mix-{seed}")
    source = rng.choice(SOURCES)
    intro, needles, question, answers, max_new, prefix = FAMILIES[family](rng)
    depths = sorted(rng.uniform(0.05, 0.95) for _ in needles)
    pool, owners = haystack_sentences(split, source, rng, max(64, length // 12))
    lens = [len(ids) + 1 for ids in tokenizer(pool, add_special_tokens=False).input_ids]

    def build(n):
        body, ln = list(pool[:n]), list(lens[:n])
        for needle, depth in zip(needles, depths, strict=True):
            body, at = insert_at_depth(body, ln, needle, depth)
            ln.insert(at, 0)
        ctx, q = _render(tokenizer, f"{intro}\n\n" + " ".join(body), question, prefix)
        return ctx, q

    def tokens(n):
        ctx, q = build(n)
        return tokenizer(ctx, add_special_tokens=False).input_ids, tokenizer(
            q, add_special_tokens=False
        ).input_ids

    lo, hi = 0, len(pool)
    c0, q0 = tokens(0)
    if len(c0) + len(q0) > length:
        raise ParameterError(
            f"length: {length} tokens cannot hold the task alone ({len(c0) + len(q0)} tokens)"
        )
    while lo < hi:  # the most haystack sentences that fit
        mid = (lo + hi + 1) // 2
        c, q = tokens(mid)
        lo, hi = (mid, hi) if len(c) + len(q) <= length else (lo, mid - 1)
    ctx, q = build(lo)
    cids, qids = (tokenizer(t, add_special_tokens=False).input_ids for t in (ctx, q))
    keys = list(dict.fromkeys(owners[:lo]))  # the passages the prompt holds sentences of
    return MixSample(family, split, index, seed, length, source, keys, ctx, q, answers, max_new, cids, qids)


def make_samples(
    tokenizer, split: str, n: int, length: int, families=None, start: int = 0
) -> list[MixSample]:
    return [make_sample(tokenizer, split, start + i, length, families) for i in range(n)]
