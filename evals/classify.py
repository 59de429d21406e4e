"""A small generated classification set for the ACT head search (docs/METHODS.md §1: SST-2 / AGNews-like prompts,
scored by the label word's log-likelihood). Deterministic from a seed; no downloads.

- sentiment: a short review built from positive or negative phrases; labels " positive" / " negative";
- topic: a news-like sentence about sports, business, science or world affairs; labels " sports" ...

Each example is a zero-shot completion prompt ("Review: ...\\nSentiment:") and the index of its label.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

_ITEMS = ["film", "restaurant", "hotel", "book", "concert", "phone", "game", "museum", "album", "play"]
_POS = ["a delight from start to finish", "warm, funny and beautifully made", "worth every penny",
        "the best I have seen in years", "charming and clever", "a real pleasure", "friendly and excellent",
        "moving and wonderfully acted", "far better than I hoped", "simply brilliant"]  # fmt: skip
_NEG = ["a waste of time and money", "dull, slow and badly made", "a complete disappointment",
        "the worst I have seen in years", "rude and careless", "painfully boring", "broken and overpriced",
        "clumsy and badly acted", "far worse than I feared", "simply awful"]  # fmt: skip
_TOPICS = {
    "sports": [
        "the home team won the cup final after extra time",
        "the striker scored twice in the derby",
        "the tennis champion retired after a knee injury",
        "the coach was sacked after five defeats",
        "the marathon record fell in the rain",
    ],  # fmt: skip
    "business": [
        "shares in the bank fell after weak profits",
        "the retailer announced a merger worth billions",
        "oil prices pushed inflation to a new high",
        "the carmaker cut jobs to reduce costs",
        "the central bank raised interest rates again",
    ],  # fmt: skip
    "science": [
        "astronomers found water vapour on a distant planet",
        "researchers mapped the genes of a rare fern",
        "a new telescope photographed a young galaxy",
        "physicists measured the mass of the neutrino",
        "biologists discovered a deep sea species of squid",
    ],  # fmt: skip
    "world": [
        "the prime minister resigned after the election",
        "leaders met to discuss the border dispute",
        "the ceasefire held for a third day",
        "thousands protested in the capital against the new law",
        "the president visited the flooded region",
    ],  # fmt: skip
}
_OPENERS = ["Reports say", "On Monday", "According to officials,", "In a surprise,", "Late last night"]


@dataclass
class Example:
    task: str
    prompt: str
    labels: list[str]  # candidate label words, each with a leading space
    answer: int


def sentiment(rng: random.Random) -> Example:
    good = rng.random() < 0.5
    item, phrase = rng.choice(_ITEMS), rng.choice(_POS if good else _NEG)
    extra = rng.choice(_POS if good else _NEG)
    text = f"The {item} was {phrase}. Honestly, {extra}."
    prompt = f"Classify the sentiment of the review as positive or negative.\nReview: {text}\nSentiment:"
    return Example("sentiment", prompt, [" positive", " negative"], 0 if good else 1)


def topic(rng: random.Random) -> Example:
    names = list(_TOPICS)
    k = rng.randrange(len(names))
    text = f"{rng.choice(_OPENERS)} {rng.choice(_TOPICS[names[k]])}."
    prompt = f"Classify the news as sports, business, science or world.\nNews: {text}\nTopic:"
    return Example("topic", prompt, [f" {n}" for n in names], k)


def examples(n: int, seed: int = 0) -> list[Example]:
    """`n` examples, alternating sentiment and topic, deterministic from `seed`."""
    rng = random.Random(f"classify-{seed}")
    return [(sentiment if i % 2 == 0 else topic)(rng) for i in range(n)]
