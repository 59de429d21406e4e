"""kvpress 0.5.5 on the llmpatch mix, in its own venv (kvpress pins transformers < 5.3).

Reads the exact token ids llmpatch wrote (`<out>/samples.<split>.jsonl`, from `llmpatch bench accuracy`), runs
each press at each compression ratio under both protocols, and appends one JSON line per sample to
`<out>/kvpress-<press>-<ratio%>.<A|B>.jsonl`; `llmpatch bench accuracy RECIPE --report-only --out <out>` then
scores them with llmpatch's rule and draws them beside llmpatch's methods. Resumes by seed.

- A (question-aware): `with press(model): model.generate(context + question)`: the whole prompt is prefilled
  densely, then compressed; decoding reads the compressed cache.
- B (query-agnostic, kvpress's pipeline): the context is prefilled and compressed with the press, then the
  question runs over the compressed cache with positions that continue the context's, then greedy decoding.

KV saved is measured on the final cache (kept tokens over all layers against what the model's own cache holds:
every token, or the last window - 1 on a layer with its own sliding window); AdaKV and KVzip keep the full cache
and mask evicted entries, so their figure is the nominal one (ratio x compressed tokens on the layers the press
compresses) and the line says so. Prefill attention computed is 1.0: kvpress prefills densely.
Gemma-3 (text-only `Gemma3ForCausalLM`): kvpress applies its own Gemma-3 rule (written for
`Gemma3ForConditionalGeneration`: compress only the global layers, the sliding ones keep the model's window) and
the cache is the model's own (`DynamicCache(config=...)`, sliding layers bounded); KVzip refuses Gemma-3.

Setup and run: benchmarks/peers/run_kvpress.sh (see benchmarks/RESULTS.md).
"""

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import kvpress
import torch
import transformers
from kvpress import (
    AdaKVPress,
    ChunkKVPress,
    ExpectedAttentionPress,
    KVzipPress,
    SnapKVPress,
    StreamingLLMPress,
    TOVAPress,
)
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

PRESSES = {
    "streamingllm": lambda r: StreamingLLMPress(compression_ratio=r),
    "snapkv": lambda r: SnapKVPress(compression_ratio=r),
    "expected": lambda r: ExpectedAttentionPress(compression_ratio=r),
    "tova": lambda r: TOVAPress(compression_ratio=r),
    "adakv-expected": lambda r: AdaKVPress(ExpectedAttentionPress(compression_ratio=r)),
    "chunkkv": lambda r: ChunkKVPress(SnapKVPress(compression_ratio=r)),  # kvpress's default chunk_length 20
    "kvzip": lambda r: KVzipPress(compression_ratio=r),
}
NOMINAL = (AdaKVPress, KVzipPress)  # they mask evicted entries instead of removing them
GEMMA3_RULE = False  # set in main() for a Gemma-3 text model


def gemma3_rule(model) -> bool:
    """kvpress compresses only Gemma-3's global layers, for Gemma3ForConditionalGeneration; apply the same rule
    to the text-only model (otherwise every sliding layer is cut too, and its window mask then reads the wrong
    keys)."""
    from kvpress.presses import base_press
    from transformers import Gemma3ForCausalLM

    if not isinstance(model, Gemma3ForCausalLM):
        return False
    base_press.Gemma3ForConditionalGeneration = (base_press.Gemma3ForConditionalGeneration, Gemma3ForCausalLM)
    return True


@torch.inference_mode()
def greedy(model, first_logits, cache, pos, max_new, eos):
    ids = [int(first_logits[0, -1].argmax())]
    for i in range(max_new - 1):
        if ids[-1] in eos:
            break
        out = model(
            input_ids=torch.tensor([[ids[-1]]]), past_key_values=cache, position_ids=torch.tensor([[pos + i]])
        )
        ids.append(int(out.logits[0, -1].argmax()))
    return ids


@torch.inference_mode()
def run_one(model, tok, press, s, protocol, eos):
    ctx, q = s["context_ids"], s["question_ids"]
    cache = DynamicCache(config=model.config)
    t0 = time.perf_counter()
    if protocol == "A":
        with press(model):
            out = model(input_ids=torch.tensor([ctx + q]), past_key_values=cache, logits_to_keep=1)
        new = greedy(model, out.logits, cache, len(ctx) + len(q), s["max_new_tokens"], eos)
        compressed = len(ctx) + len(q)
    else:
        with press(model):
            model(input_ids=torch.tensor([ctx]), past_key_values=cache, logits_to_keep=1)
        out = model(
            input_ids=torch.tensor([q]),
            past_key_values=cache,
            position_ids=torch.arange(len(ctx), len(ctx) + len(q)).unsqueeze(0),
            logits_to_keep=1,
        )
        new = greedy(model, out.logits, cache, len(ctx) + len(q), s["max_new_tokens"], eos)
        compressed = len(ctx)
    seconds = time.perf_counter() - t0
    dense_len = len(ctx) + len(q) + len(new) - 1  # the last token is never written
    windows = [getattr(layer, "sliding_window", None) for layer in cache.layers]
    own = [dense_len if w is None else min(dense_len, w - 1) for w in windows]
    kept = sum(layer.keys.shape[2] for layer in cache.layers)
    nominal = isinstance(press, NOMINAL)
    pressed = sum(w is None for w in windows) if GEMMA3_RULE else len(windows)  # layers the press compresses
    saved = press.compression_ratio * compressed * pressed / sum(own) if nominal else 1 - kept / sum(own)
    return {
        "output": tok.decode(new, skip_special_tokens=True),
        "kv_saved": saved,
        "kv_saved_nominal": nominal,
        "prefill_computed": 1.0,
        "seconds": seconds,
        "new_tokens": len(new),
    }


def _commit() -> str | None:
    """The llmpatch checkout's commit, under the key llmpatch's own runs use (llmpatch.meta.git_commit)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True
        )
        return out.stdout.strip() or None
    except OSError:
        return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model-dir", required=True, help="the HF folder llmpatch converted (llmpatch models list)"
    )
    ap.add_argument(
        "--out", required=True, help="the llmpatch bench accuracy folder holding samples.<split>.jsonl"
    )
    ap.add_argument("--split", default="test")
    ap.add_argument("--samples", type=int, default=30)
    ap.add_argument("--presses", default=",".join(PRESSES))
    ap.add_argument("--ratios", default="0.5,0.67,0.75")
    ap.add_argument("--protocols", default="A,B")
    args = ap.parse_args()
    out = Path(args.out)
    samples = [json.loads(x) for x in (out / f"samples.{args.split}.jsonl").read_text().splitlines()][
        : args.samples
    ]
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(
        args.model_dir, dtype=torch.float32, attn_implementation="sdpa"
    )
    model.eval()
    global GEMMA3_RULE
    GEMMA3_RULE = gemma3_rule(model)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    meta = {
        "toolkit": "kvpress",
        "kvpress": kvpress.__version__ if hasattr(kvpress, "__version__") else "0.5.5",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git_commit": _commit(),
        "argv": sys.argv,
    }
    for name in args.presses.split(","):
        for ratio in (float(r) for r in args.ratios.split(",")):
            for proto in args.protocols.split(","):
                label = f"kvpress-{name}-{round(ratio * 100)}"
                path = out / f"{label}.{proto}.jsonl"
                have = (
                    {json.loads(x)["seed"] for x in path.read_text().splitlines()}
                    if path.is_file()
                    else set()
                )
                todo = [s for s in samples if s["seed"] not in have]
                if todo:  # a complete point keeps the metadata of the run that wrote it
                    (out / f"{label}.{proto}.meta.json").write_text(
                        json.dumps({**meta, "press": name, "ratio": ratio, "protocol": proto}, indent=2)
                        + "\n"
                    )
                for s in todo:
                    try:
                        rec = run_one(model, tok, PRESSES[name](ratio), s, proto, eos)
                    except Exception as exc:  # noqa: BLE001 - a press that does not run on this model
                        print(f"{label} {proto}: kvpress failed on this model, skipped: {exc!r}", flush=True)
                        break
                    line = {
                        "label": label,
                        "protocol": proto,
                        "toolkit": "kvpress",
                        "family": s["family"],
                        "split": s["split"],
                        "index": s["index"],
                        "seed": s["seed"],
                        "source": s["source"],
                        "n_tokens": len(s["context_ids"]) + len(s["question_ids"]),
                        "answers": s["answers"],
                        **rec,
                    }
                    with path.open("a") as f:
                        f.write(json.dumps(line) + "\n")
                    print(label, proto, s["index"], repr(rec["output"][:60]), flush=True)


if __name__ == "__main__":
    main()
