"""Data and scoring for the llmpatch_passkey lm-eval task: the same samples as `llmpatch run passkey`."""

import datasets
from llmpatch.evals.suites import SUITES

PASSKEY = SUITES["passkey"]


def passkey_dataset(pretrained=None, tokenizer=None, lengths=(1024,), samples=20, seed=0, **_):
    """Generated with the evaluated model's tokenizer so the prompts have the requested token lengths."""
    from llmpatch.evals.lm_eval_bridge import resolve_pretrained
    from transformers import AutoTokenizer

    name = tokenizer or pretrained
    if not name:
        raise ValueError("llmpatch_passkey: needs model_args pretrained=... (or metadata tokenizer=...)")
    tok = AutoTokenizer.from_pretrained(resolve_pretrained(name))
    rows = []
    for n in lengths:
        for i in range(samples):
            s = PASSKEY.sample(tok, n, i, seed=seed)
            chat = bool(getattr(tok, "chat_template", None))
            rows.append({"prompt": s.text if chat else s.prompt, "answer": s.answers[0], "length": n, "index": i,
                         "depth": s.depth, "n_tokens": s.n_tokens})  # fmt: skip
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def process_results(doc, results):
    from llmpatch.evals.suites import first_number

    return {"acc": float(first_number(results[0]) == doc["answer"])}
