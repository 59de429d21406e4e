"""Long-context suites, generated offline and deterministic from (seed, length, index, depth).

- passkey: the Landmark / LongHeads protocol (grass / sky filler, a 1..50000 key, exact match).
- niah: Kamradt-style needle at a depth, after the sentence end nearest that depth; scored by answer recall
  (the fraction of the answer's words in the output), plus the answer's log-probability.
- ruler_niah_single / _multikey / _multivalue / _multiquery, ruler_vt: RULER-style needles ("One of the special
  magic numbers for {key} is: {value}.") and variable tracking, scored by string match (fraction found).

Prompts go through the model's chat template when it has one; the question is asked before and after the text
(small instruct models answer far more reliably that way; the wording is in each suite's `intro`). Passkey adds
"Quote the number from the text." to the question: without it SmolLM2-135M at 2k tokens answers 6/20 with
"The pass key is a magical item ..."; with it, 10/10 in a first check.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass, field

from llmpatch.errors import ParameterError

from .haystack import Haystack, insert_at_depth


@dataclass
class Sample:
    suite: str
    length: int  # the requested token budget (the prompt never exceeds it)
    index: int
    text: str  # the user's message
    prompt: str  # what the model reads (chat template applied)
    answers: list[str]
    n_tokens: int
    depth: float | None = None
    answer_text: str | None = None  # the reference answer whose log-probability is reported
    meta: dict = field(default_factory=dict)
    prompt_ids: list[int] | None = None  # the prompt's tokens where they are not `prompt` tokenized whole
    max_new_tokens: int | None = None  # this sample's own limit (else the suite's)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("prompt")
        d.pop("prompt_ids")
        return d


def render(tokenizer, text: str, answer_prefix: str = "") -> str:
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": text}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return f"{text} {answer_prefix}".rstrip()


def count_tokens(tokenizer, prompt: str) -> int:
    return len(tokenizer(prompt, add_special_tokens=False).input_ids)


def fit(tokenizer, make_text, length: int, answer_prefix: str, hi: int) -> tuple[str, str, int]:
    """The longest make_text(n), n <= hi, whose rendered prompt has at most `length` tokens."""

    def size(n):
        return count_tokens(tokenizer, render(tokenizer, make_text(n), answer_prefix))

    if size(0) > length:
        raise ParameterError(f"length: {length} tokens cannot hold even the question ({size(0)} tokens)")
    lo, hi_ok = 0, hi
    while lo < hi_ok:  # binary search on the haystack size
        mid = (lo + hi_ok + 1) // 2
        if size(mid) <= length:
            lo = mid
        else:
            hi_ok = mid - 1
    text = make_text(lo)
    prompt = render(tokenizer, text, answer_prefix)
    return text, prompt, count_tokens(tokenizer, prompt)


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def first_number(text: str) -> str | None:
    m = re.search(r"\d+", text)
    return m.group(0) if m else None


class Suite:
    name = ""
    max_new_tokens = 16
    grid_depths = False  # True: the runner sweeps depths; False: a random depth per sample
    answer_prefix = ""

    def sample(self, tokenizer, length: int, index: int, *, seed=0, depth=None, haystack=None) -> Sample:
        raise NotImplementedError

    def score(self, sample: Sample, output: str) -> float:
        raise NotImplementedError

    @staticmethod
    def rng(*parts) -> random.Random:
        return random.Random("-".join(str(p) for p in parts))


class Passkey(Suite):
    name = "passkey"
    max_new_tokens = 12
    answer_prefix = "The pass key is"
    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
    intro = (
        "Read the text and answer: what is the pass key? Quote the number from the text. There is an important "
        "info hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz you about the "
        "important information there."
    )
    question = "What is the pass key? Quote the number from the text."

    def sample(self, tokenizer, length, index, *, seed=0, depth=None, haystack=None):
        rng = self.rng("passkey", seed, length, index)
        key = rng.randint(1, 50000)
        depth = rng.random() if depth is None else depth
        needle = f"The pass key is {key}. Remember it. {key} is the pass key."

        def make_text(n):
            body = [self.filler] * n
            body.insert(round(depth * n), needle)
            return " ".join([self.intro, *body]) + f"\n\n{self.question}"

        text, prompt, n_tok = fit(tokenizer, make_text, length, self.answer_prefix, hi=length // 10 + 1)
        return Sample(self.name, length, index, text, prompt, [str(key)], n_tok, depth)

    def score(self, sample, output):
        return float(first_number(output) == sample.answers[0])


CITIES = ["Lisbon", "Kyoto", "Nairobi", "Oslo", "Quito", "Hanoi", "Tallinn", "Cusco", "Dakar", "Perth",
          "Bergen", "Tbilisi", "Valparaiso", "Zanzibar", "Reykjavik", "Marrakesh"]  # fmt: skip
ACTIVITIES = [
    "eat a warm pretzel on the pier",
    "ride the red tram to the lighthouse",
    "swim in the cold lake at dawn",
    "read poetry in the botanical garden",
    "paint the fishing boats at sunset",
    "climb the bell tower at noon",
    "drink mint tea in the old market",
    "fly a green kite on the dunes",
    "listen to the choir in the chapel",
    "feed the ducks beside the mill",
    "watch the glassblowers in the harbour",
    "walk the cliff path in fog",
]


class Niah(Suite):
    name = "niah"
    max_new_tokens = 24
    grid_depths = True

    def sample(self, tokenizer, length, index, *, seed=0, depth=None, haystack=None):
        rng = self.rng("niah", seed, length, index, depth)
        city, activity = rng.choice(CITIES), rng.choice(ACTIVITIES)
        depth = rng.random() if depth is None else depth
        needle = f"The best thing to do in {city} is to {activity}."
        question = f"What is the best thing to do in {city}?"
        intro = f"Read the text below and answer this question: {question}"
        text, prompt, n_tok = _fit_haystack(tokenizer, haystack, length, intro, question, [(needle, depth)])
        answer = f"The best thing to do in {city} is to {activity}."
        return Sample(self.name, length, index, text, prompt, [activity], n_tok, depth, answer_text=answer)

    def score(self, sample, output):
        want = words(sample.answers[0])
        got = set(words(output))
        return sum(w in got for w in want) / len(want)


def _fit_haystack(tokenizer, haystack, length, intro, question, needles, answer_prefix=""):
    """Fill with haystack sentences; each (needle, depth) goes after the sentence end nearest its depth."""
    haystack = haystack or Haystack()
    pool = haystack.sentences(max(8, length // 6))  # more sentences than can fit
    lengths = [len(ids) + 1 for ids in tokenizer(pool, add_special_tokens=False).input_ids]

    def make_text(n):
        body, lens = list(pool[:n]), list(lengths[:n])
        for needle, depth in needles:
            body, at = insert_at_depth(body, lens, needle, depth)
            lens.insert(at, 0)  # needles do not shift later depths
        return f"{intro}\n\n" + " ".join(body) + f"\n\n{question}"

    return fit(tokenizer, make_text, length, answer_prefix, hi=len(pool))


ADJECTIVES = ["amber", "brisk", "calm", "dusty", "eager", "faint", "gentle", "hollow", "ivory", "jolly",
              "keen", "lunar", "mellow", "nimble", "olive", "proud", "quiet", "rusty", "silver", "tidy"]  # fmt: skip
NOUNS = ["lantern", "harbor", "falcon", "meadow", "anchor", "violin", "cedar", "compass", "pebble", "orchid",
         "glacier", "teapot", "saddle", "beacon", "walnut", "ribbon", "canyon", "thimble", "marble", "willow"]  # fmt: skip


class RulerNiah(Suite):
    """RULER needle variants: `keys` needles with distinct keys, `values` values per key, `queries` keys asked."""

    max_new_tokens = 48
    ruler_intro = (
        "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the numbers afterwards."
    )

    def __init__(self, name, keys=1, values=1, queries=1):
        self.name, self.keys, self.values, self.queries = name, keys, values, queries

    def sample(self, tokenizer, length, index, *, seed=0, depth=None, haystack=None):
        rng = self.rng(self.name, seed, length, index)
        names = rng.sample([f"{a}-{n}" for a in ADJECTIVES for n in NOUNS], self.keys)
        needles, answers = [], []
        for k, key in enumerate(names):
            for _ in range(self.values):
                value = str(rng.randint(1_000_000, 9_999_999))
                needles.append((f"One of the special magic numbers for {key} is: {value}.", rng.random()))
                if k < self.queries:
                    answers.append(value)
        asked = names[: self.queries]
        what = "numbers" if self.values > 1 or self.queries > 1 else "number"
        question = f"What {'are all the special magic numbers' if what == 'numbers' else 'is the special magic number'} for {', '.join(asked)} mentioned in the provided text?"  # noqa: E501
        intro = f"{self.ruler_intro} Question: {question}"
        text, prompt, n_tok = _fit_haystack(tokenizer, haystack, length, intro, question, needles)
        depths = [d for _, d in needles]
        return Sample(self.name, length, index, text, prompt, answers, n_tok, depths[0], meta={"keys": names})

    def score(self, sample, output):
        return sum(a in output for a in sample.answers) / len(sample.answers)


class RulerVT(Suite):
    """Variable tracking: VAR X1 = value, then X2 = X1 ... along a chain; name every variable holding the value."""

    name = "ruler_vt"
    max_new_tokens = 32
    hops = 4

    def sample(self, tokenizer, length, index, *, seed=0, depth=None, haystack=None):
        rng = self.rng(self.name, seed, length, index)
        value = str(rng.randint(10000, 99999))
        names = [
            "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(5)) for _ in range(self.hops + 1)
        ]
        lines = [f"VAR {names[0]} = {value}."] + [
            f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:], strict=False)
        ]
        depths = sorted(rng.random() for _ in lines)
        question = f"Find all variables that are assigned the value {value} in the text above."
        intro = (
            "Memorize and track the chain(s) of variable assignment hidden in the following text. "
            f"Question: {question}"
        )
        text, prompt, n_tok = _fit_haystack(
            tokenizer, haystack, length, intro, question, list(zip(lines, depths, strict=True))
        )
        return Sample(self.name, length, index, text, prompt, names, n_tok, depths[0])

    def score(self, sample, output):
        return sum(n in output for n in sample.answers) / len(sample.answers)


class Mix(Suite):
    """The held-out mix's test split (`evals/mix.py`) as an eval suite: sample i is the test split's sample i,
    prefilled whole (protocol A), with its own token ids and answer budget, scored by the mix's string match, so
    its outputs are `llmpatch bench accuracy`'s protocol-A outputs. `families` (a recipe's suite key) picks the
    families, as the mix recipes do; default: all ten. The run's seed and haystack do not apply (a split's
    samples are fixed by their seeds)."""

    name = "mix"

    def __init__(self, families: list[str] | None = None):
        self.families = families  # checked by `families_problem`

    def sample(self, tokenizer, length, index, *, seed=0, depth=None, haystack=None):
        from . import mix

        m = mix.make_sample(tokenizer, "test", index, length, self.families)
        ids, prompt = m.context_ids + m.question_ids, m.context + m.question  # (both parts chat-templated)
        return Sample(self.name, length, index, prompt, prompt, m.answers, len(ids),
                      meta={"family": m.family, "seed": m.seed, "source": m.source}, prompt_ids=ids,
                      max_new_tokens=m.max_new_tokens)  # fmt: skip

    def score(self, sample, output):
        from . import mix

        return mix.score(sample.answers, output)


SUITES: dict[str, Suite] = {
    s.name: s
    for s in (
        Passkey(),
        Niah(),
        RulerNiah("ruler_niah_single"),
        RulerNiah("ruler_niah_multikey", keys=4),
        RulerNiah("ruler_niah_multivalue", values=4),
        RulerNiah("ruler_niah_multiquery", keys=4, queries=4),
        RulerVT(),
        Mix(),
    )
}


def families_problem(name: str, families) -> str | None:
    """Why `families` cannot go with the known suite `name` (None: they can; None families always can)."""
    if families is None:
        return None
    if not isinstance(SUITES[name], Mix):
        return f"only the mix suite takes families, not {name!r}"
    from . import mix

    if not isinstance(families, list) or not families or any(f not in mix.FAMILIES for f in families):
        return f"must be a non-empty list of mix families ({', '.join(mix.FAMILIES)}), got {families!r}"
    return None


def get_suite(name: str, families: list[str] | None = None) -> Suite:
    """The suite `name`; `families` only for the mix."""
    if name not in SUITES:
        raise ParameterError(f"suite: unknown suite {name!r}; available: {', '.join(SUITES)}")
    problem = families_problem(name, families)
    if problem:
        raise ParameterError(f"families: {problem}")
    return SUITES[name] if families is None else Mix(families)
