"""reform on the Gemma-3 dev samples beside the unpatched model given only the tokens reform gathered (packed
positions 0..K-1): `python gathered_alone.py RATIO WINDOW` (observe = window). Prints, per sample, whether each
answers, then the two counts."""

import json
import sys
from pathlib import Path

import torch

import llmpatch


def main(ratio: float, window: int) -> None:
    torch.set_num_threads(1)
    model, tok = llmpatch.load_model("gemma3-270m")
    lines = (Path(__file__).parent / "global" / "samples.dev.jsonl").read_text().splitlines()
    right = {"reform": 0, "gathered alone": 0}
    for sample in map(json.loads, lines):
        ids = torch.tensor([sample["context_ids"] + sample["question_ids"]])
        new = sample["max_new_tokens"]
        picked = {}
        with llmpatch.patched(model, "reform", ratio=ratio, window=window, observe=window) as patch:
            method = patch.methods[0]
            choose = method._choose
            method._choose = lambda scores, choose=choose, picked=picked: picked.setdefault(
                "kept", choose(scores)
            )
            out = model.generate(ids, max_new_tokens=new, do_sample=False)
        gathered = ids[:, torch.cat([torch.arange(16), picked["kept"]])]
        alone = model.generate(gathered, max_new_tokens=new, do_sample=False)
        texts = {"reform": tok.decode(out[0, ids.shape[1] :]),
                 "gathered alone": tok.decode(alone[0, gathered.shape[1] :])}  # fmt: skip
        for key, text in texts.items():
            right[key] += sample["answers"][0] in text
        print(sample["family"], {k: sample["answers"][0] in t for k, t in texts.items()}, flush=True)
    print(right)


if __name__ == "__main__":
    main(float(sys.argv[1]), int(sys.argv[2]))
