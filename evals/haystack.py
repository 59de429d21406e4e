"""Haystacks: generated English prose (deterministic from a seed, no numbers in it) or a user's text file.

Paul Graham's essays, the usual NIAH haystack, are copyrighted; llmpatch generates its own filler instead, and
`--haystack FILE` takes any text. Haystacks are lists of sentences so needles go in at sentence ends.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from llmpatch.errors import ParameterError

_SUBJECTS = [
    "the old miller",
    "a travelling painter",
    "the village baker",
    "my neighbour",
    "the harbour master",
    "a young gardener",
    "the schoolteacher",
    "an elderly fisherman",
    "the librarian",
    "a quiet shepherd",
    "the blacksmith's daughter",
    "a curious child",
    "the innkeeper",
    "a wandering musician",
    "the ferryman",
]
_VERBS = [
    "walked along",
    "wrote about",
    "remembered",
    "painted",
    "described",
    "repaired",
    "visited",
    "admired",
    "complained about",
    "cleaned",
    "sketched",
    "measured",
    "ignored",
    "praised",
    "sang about",
]
_OBJECTS = [
    "the stone bridge",
    "the orchard behind the chapel",
    "a narrow lane of crooked houses",
    "the river meadow",
    "the lighthouse on the cliff",
    "an abandoned windmill",
    "the market square",
    "the pine forest",
    "a field of barley",
    "the little railway station",
    "the copper roofs of the town",
    "a garden of roses",
    "the frozen pond",
    "the winding coast road",
    "the ruins of an abbey",
]
_TIMES = [
    "early in the morning",
    "after the autumn rains",
    "on a windy afternoon",
    "during the long winter",
    "at dusk",
    "before the harvest",
    "on market day",
    "late at night",
    "in the first warm week of spring",
    "while the bells were ringing",
]
_REMARKS = [
    "Nobody could say why it mattered so much.",
    "The air smelled of wood smoke and wet leaves.",
    "Everyone agreed that the light was unusually soft.",
    "It was the kind of day people forget quickly.",
    "The dogs barked at nothing in particular.",
    "Later the story was told in several different ways.",
    "A thin mist rose from the fields.",
    "The conversation turned to the price of wool.",
    "Some of the older people shook their heads.",
    "The swallows had returned to the barn.",
]


def generated_sentences(n: int, seed: int = 0) -> list[str]:
    """`n` generated sentences, deterministic from `seed`."""
    rng = random.Random(f"haystack-{seed}")
    out = []
    for _ in range(n):
        if rng.random() < 0.25:
            out.append(rng.choice(_REMARKS))
        else:
            s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TIMES)}."
            out.append(s[0].upper() + s[1:])
    return out


def split_sentences(text: str) -> list[str]:
    parts = re.split(r"(?<=[.!?])\s+", " ".join(text.split()))
    return [p for p in parts if p]


def load_haystack(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise ParameterError(f"haystack: file {str(path)!r} does not exist; pass a UTF-8 text file")
    sentences = split_sentences(path.read_text(encoding="utf-8", errors="replace"))
    if len(sentences) < 2:
        raise ParameterError(f"haystack: file {str(path)!r} holds fewer than two sentences")
    return sentences


class Haystack:
    """Sentences to fill a prompt with; a file's sentences repeat cyclically when the prompt needs more."""

    def __init__(self, path: str | Path | None = None, seed: int = 0):
        self.path = str(path) if path else None
        self.seed = seed
        self._file = load_haystack(path) if path else None

    def sentences(self, n: int, offset: int = 0) -> list[str]:
        if self._file is None:
            return generated_sentences(offset + n, self.seed)[offset:]
        src = self._file
        return [src[(offset + i) % len(src)] for i in range(n)]


def insert_at_depth(
    sentences: list[str], lengths: list[int], needle: str, depth: float
) -> tuple[list[str], int]:
    """Insert `needle` at the sentence end nearest `depth` (0..1) of the total token length.

    Returns the new list and the index of the needle. `lengths` are the sentences' token counts.
    """
    if not 0.0 <= depth <= 1.0:
        raise ParameterError(f"depth: must be between 0 and 1, got {depth!r}")
    total = sum(lengths)
    target = depth * total
    ends = [0]
    for n in lengths:
        ends.append(ends[-1] + n)  # ends[i] = tokens before sentence i (a sentence boundary)
    best = min(range(len(ends)), key=lambda i: (abs(ends[i] - target), -i))  # ties: after earlier needles
    return sentences[:best] + [needle] + sentences[best:], best
