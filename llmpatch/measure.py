"""Honest measurements: timed greedy generation (time to first token, decode tokens/s) and peak memory."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


class PeakMemory:
    """Peak memory of a block: CUDA allocator peak on GPUs; on Linux CPUs the process's peak RSS (VmHWM),
    reset at entry through /proc/self/clear_refs. `mb` is None where neither is available."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.mb: float | None = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            try:
                for line in Path("/proc/self/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        self.mb = int(line.split()[1]) / 1024
            except OSError:
                self.mb = None


class _Clock:
    """A generate() streamer that timestamps the prompt and every new token."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


class _PrefillTimer:
    """Times the first forward call of a model (the prefill) through forward hooks."""

    def __init__(self, model):
        self.start = self.seconds = None
        self._handles = [
            model.register_forward_pre_hook(self._pre),
            model.register_forward_hook(self._post),
        ]

    def _pre(self, *_):
        if self.start is None:
            self.start = time.perf_counter()

    def _post(self, *_):
        if self.seconds is None:
            self.seconds = time.perf_counter() - self.start

    def close(self):
        for h in self._handles:
            h.remove()


@dataclass
class GenerationResult:
    text: str
    new_tokens: int
    prompt_tokens: int
    ttft_s: float
    prefill_s: float
    decode_tokens_per_s: float | None
    peak_memory_mb: float | None
    kv_bytes: int | None = None  # what the KV cache held at the end
    dense_kv_bytes: int | None = None  # what the model's own cache would hold for the same tokens
    attention_computed: float = 1.0  # computed / causal attention scores over the run (1.0: dense)

    def to_dict(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def generate_timed(
    model, tokenizer, prompt: str | list[int], max_new_tokens: int = 32, tracker=None, min_new_tokens: int = 0
) -> GenerationResult:
    """Greedy generation of one prompt (already templated, or its token ids) with timings; `tracker`
    (Patch.track_sparsity()) gives the share of the causal attention computed; `min_new_tokens` holds off the
    end-of-sequence token."""
    if tracker is not None:
        tracker.reset()
    if isinstance(prompt, str):
        enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
    else:
        ids = torch.tensor([prompt], device=model.device)
        enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    clock = _Clock()
    timer = _PrefillTimer(model)
    try:
        with PeakMemory(model.device) as mem:
            t0 = time.perf_counter()
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                min_new_tokens=min_new_tokens,
                do_sample=False,
                streamer=clock,
                pad_token_id=tokenizer.pad_token_id,
                return_dict_in_generate=True,
            )
    finally:
        timer.close()
    from .caches import dense_kv_bytes, kv_bytes, output_cache

    cache = output_cache(out)
    kv = (kv_bytes(cache), dense_kv_bytes(cache)) if cache is not None else (None, None)
    new = out.sequences[0, enc["input_ids"].shape[1] :]
    stamps = clock.times[1:]  # the first put() is the prompt
    ttft = stamps[0] - t0 if stamps else float("nan")
    rate = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else None
    return GenerationResult(
        text=tokenizer.decode(new, skip_special_tokens=True),
        new_tokens=int(new.numel()),
        prompt_tokens=int(enc["input_ids"].shape[1]),
        ttft_s=ttft,
        prefill_s=timer.seconds,
        decode_tokens_per_s=rate,
        peak_memory_mb=mem.mb,
        kv_bytes=kv[0],
        dense_kv_bytes=kv[1],
        attention_computed=tracker.density if tracker is not None else 1.0,
    )


@torch.inference_mode()
def answer_logprob(model, tokenizer, prompt: str, answer: str) -> float:
    """Sum of log-probabilities of `answer`'s tokens after `prompt` (teacher forced)."""
    p = tokenizer(prompt, add_special_tokens=False).input_ids
    a = tokenizer(answer, add_special_tokens=False).input_ids
    ids = torch.tensor([p + a], device=model.device)
    logits = model(ids).logits[0, len(p) - 1 : -1].float()
    logp = torch.log_softmax(logits, dim=-1)
    return float(logp.gather(-1, torch.tensor(a, device=model.device).unsqueeze(-1)).sum())
