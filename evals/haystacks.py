"""Natural-prose haystacks from text that ships with Python, split into passages with a fixed dev / test split.

Sources (each a list of titled passages of plain sentences; code, grammar and tables are dropped):
- `pydoc`: the Python language reference topics (`pydoc_data.topics`), one passage per topic;
- `stdlib`: the docstrings of standard-library modules (`STDLIB_MODULES`), one passage per module;
- `idle`: IDLE's help page (`idlelib/help.html`), one passage per section.

A passage belongs to the dev split when the first byte of sha256("source/title") is below 86 (about a third),
else to test: calibration and tuning read dev passages only, reports use test passages only. The texts differ
between Python versions; `source_digest()` goes into every run's metadata so a result names the text it used.
"""

from __future__ import annotations

import hashlib
import html
import importlib
import inspect
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from llmpatch.errors import ParameterError

from .haystack import split_sentences

SOURCES = ("pydoc", "stdlib", "idle")
SPLITS = ("dev", "test")
STDLIB_MODULES = (
    "argparse", "asyncio", "base64", "bisect", "calendar", "cmd", "codecs", "collections",
    "concurrent.futures", "configparser", "contextlib", "copy", "csv", "ctypes", "dataclasses", "datetime",
    "decimal", "difflib", "doctest", "email", "enum", "fractions", "ftplib", "functools", "getopt", "gettext",
    "glob", "gzip", "heapq", "hmac", "http.client", "http.cookiejar", "imaplib", "inspect", "io", "ipaddress",
    "json", "locale", "logging", "mailbox", "mimetypes", "multiprocessing", "netrc", "numbers",
    "optparse", "pdb", "pickle", "pickletools", "platform", "poplib", "pprint", "profile", "pydoc", "queue",
    "random", "re", "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "smtplib", "socket",
    "socketserver", "sqlite3", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "timeit", "tokenize", "trace", "traceback", "turtle", "typing", "unittest", "urllib.parse",
    "urllib.request", "uuid", "warnings", "wave", "weakref", "webbrowser", "xml.dom.minidom", "zipfile",
    "zipimport",
)  # fmt: skip
MIN_WORDS = 6  # shorter sentences (headings, fragments) are dropped


@dataclass(frozen=True)
class Passage:
    source: str
    title: str
    sentences: tuple[str, ...]

    @property
    def key(self) -> str:
        return f"{self.source}/{self.title}"

    @property
    def split(self) -> str:
        return "dev" if hashlib.sha256(self.key.encode()).digest()[0] < 86 else "test"


def _prose(paragraphs) -> list[str]:
    """The sentences of the prose paragraphs: no indented code, grammar rules, tables or doctest lines."""
    out = []
    for para in paragraphs:
        lines = [ln for ln in para.splitlines() if ln.strip()]
        if not lines or any(ln.startswith((" ", "\t")) for ln in lines):
            continue
        text = " ".join(ln.strip() for ln in lines)
        if re.search(r"::=|>>>|\*\*\*|===|---|\+--|\|", text):
            continue
        for s in split_sentences(text):
            if len(s.split()) >= MIN_WORDS and s[0].isupper() and s[-1] in ".!?":
                out.append(s)
    return out


def _pydoc() -> list[Passage]:
    from pydoc_data.topics import topics

    return [Passage("pydoc", t, tuple(_prose(topics[t].split("\n\n")))) for t in sorted(topics)]


def _stdlib() -> list[Passage]:
    out = []
    for name in STDLIB_MODULES:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                doc = inspect.getdoc(importlib.import_module(name)) or ""
        except Exception:  # a module missing on this platform or Python version
            continue
        out.append(Passage("stdlib", name, tuple(_prose(doc.split("\n\n")))))
    return out


def _idle() -> list[Passage]:
    path = Path(importlib.import_module("idlelib").__file__).parent / "help.html"
    if not path.is_file():
        return []
    page = path.read_text(encoding="utf-8", errors="replace")
    out = []
    for part in re.split(r"<h[23][^>]*>", page)[1:]:
        title = html.unescape(re.sub(r"<[^>]+>", "", part.split("</h", 1)[0])).strip(" ¶\n")
        paras = [html.unescape(re.sub(r"<[^>]+>", "", p)) for p in re.findall(r"<p>(.*?)</p>", part, re.S)]
        out.append(Passage("idle", title, tuple(_prose(["\n".join(p.split()) for p in paras]))))
    return out


@lru_cache(maxsize=1)
def passages() -> tuple[Passage, ...]:
    """Every passage with at least 3 prose sentences, in a fixed order. A sentence found in more than one passage
    (the reference repeats itself) is dropped from all of them, so no sentence can cross the split."""
    found = [*_pydoc(), *_stdlib(), *_idle()]
    count = Counter(s for p in found for s in set(p.sentences))
    found = [Passage(p.source, p.title, tuple(s for s in p.sentences if count[s] == 1)) for p in found]
    return tuple(p for p in found if len(p.sentences) >= 3)


def split_passages(split: str, source: str | None = None) -> list[Passage]:
    if split not in SPLITS:
        raise ParameterError(f"split: must be one of {', '.join(SPLITS)}, got {split!r}")
    if source is not None and source not in SOURCES:
        raise ParameterError(f"haystack: must be one of {', '.join(SOURCES)}, got {source!r}")
    return [p for p in passages() if p.split == split and (source is None or p.source == source)]


def haystack_sentences(split: str, source: str, rng, n: int) -> tuple[list[str], list[str]]:
    """About `n` sentences of whole passages of `split` from `source`, in an order drawn from `rng`; returns
    (sentences, the key of the passage each sentence comes from)."""
    pool = split_passages(split, source)
    if not pool:
        raise ParameterError(f"haystack: source {source!r} has no {split} passages on this Python")
    order = rng.sample(pool, len(pool))
    sentences, owners = [], []
    while len(sentences) < n:
        for p in order:
            sentences.extend(p.sentences)
            owners.extend([p.key] * len(p.sentences))
            if len(sentences) >= n:
                break
    return sentences, owners


def source_digest() -> dict:
    """sha256 of every source's passages (they change with the Python version), for run metadata."""
    out = {}
    for source in SOURCES:
        h = hashlib.sha256()
        for p in passages():
            if p.source == source:
                h.update(p.key.encode())
                h.update("\n".join(p.sentences).encode())
        out[source] = h.hexdigest()[:16]
    return out
