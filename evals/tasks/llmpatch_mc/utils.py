"""Data for the llmpatch_mc lm-eval task: 40 general-knowledge questions written for llmpatch (public domain)."""

import json
from pathlib import Path

import datasets


def mc_dataset(**_):
    rows = [
        json.loads(line)
        for line in (Path(__file__).parent / "questions.jsonl").read_text().splitlines()
        if line
    ]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
