"""Passkey retrieval prompts (the Landmark / LongHeads protocol; METHODS.md, last section).

An instruction, filler sentences repeated, "The pass key is N. Remember it. N is the pass key." at a depth,
then the question. Deterministic from (seed, length). The full suite with scoring and reports is built on this.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

INSTRUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about the important information there."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = "What is the pass key?"
ANSWER_PREFIX = "The pass key is"


@dataclass
class PasskeySample:
    prompt: str  # ready for the tokenizer (chat template applied when the tokenizer has one)
    text: str  # the user's words before any template: haystack, needle and question
    passkey: int
    depth: float
    n_tokens: int


def _body(n_filler: int, depth: float, passkey: int) -> str:
    fillers = [FILLER] * n_filler
    needle = f"The pass key is {passkey}. Remember it. {passkey} is the pass key."
    fillers.insert(round(depth * n_filler), needle)
    return " ".join([INSTRUCTION, *fillers])


def render(tokenizer, body: str) -> str:
    """The question as a user turn in the model's chat template; without one, followed by the answer prefix.

    (SmolLM2-Instruct answers the plain question best: given the prefix it often repeats "the pass key".)
    """
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": f"{body}\n\n{QUESTION}"}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return f"{body}\n\n{QUESTION} {ANSWER_PREFIX}"


def make_sample(tokenizer, n_tokens: int, *, seed: int = 0, depth: float | None = None) -> PasskeySample:
    """A passkey prompt of about `n_tokens` tokens (never more), with a random key and depth from `seed`."""
    rng = random.Random(f"passkey-{seed}-{n_tokens}")
    passkey = rng.randint(1, 50000)
    depth = rng.random() if depth is None else depth

    def count(n: int) -> int:
        return len(tokenizer(render(tokenizer, _body(n, depth, passkey)), add_special_tokens=False).input_ids)

    per = max(1, count(2) - count(1))
    n = max(0, (n_tokens - count(0)) // per)
    while n > 0 and count(n) > n_tokens:
        n -= 1
    body = _body(n, depth, passkey)
    return PasskeySample(render(tokenizer, body), f"{body}\n\n{QUESTION}", passkey, depth, count(n))


def is_correct(sample: PasskeySample, generated: str) -> bool:
    """Exact match: the first number in the answer is the pass key."""
    digits = "".join(c if c.isdigit() else " " for c in generated).split()
    return bool(digits) and digits[0] == str(sample.passkey)
