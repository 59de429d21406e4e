"""The MoA plan search (Fu et al., 2024; docs/METHODS.md §3), as `llmpatch calibrate moa`.

1. Data: long prompts built offline (a RULER-style needle question, and a one-sentence summary of haystack
   text, alternating), each answered greedily by the dense model itself (up to ANSWER_TOKENS tokens). The
   evaluation suites (passkey, niah) are not used for calibration.
2. Profiling: loss = cross-entropy of those answers. A custom autograd attention (one KV group and 256 query rows at a
   time, causal keys only: ROWS x N temporaries, never N x N) gives A and dL/dA per head, and E_ij = -A_ij (dL/dA_ij - sum_k A_ik dL/dA_ik) /
   (1 - A_ij), which is -dS_ij / (1 - A_ij) with dS the softmax backward. |E| is summed over 64 x 64 blocks
   (per block diagonal: a sink + window config keeps or drops whole diagonals) and averaged over samples.
3. Configs: (alpha, beta) with alpha in s x {-2048, -1024, ..., 8192}, beta in {0, 1/8, ..., 1}, keeping pairs with
   S(2048 s) > 0, S(8192 s) <= 8192 s, S(16384 s) <= 16384 s. Scaling: s = (longest profiled length) / 8192,
   the paper's longest profile, so alpha keeps the same share of the profiled context (profiling lengths are set
   from the model's context and the CPU budget; s = 1/4 at 2k). A config's loss at length n is the influence
   of the blocks it drops (a block at distance d keeps the share of its 64 x 64 pairs inside the window).
4. MILP (scipy.optimize.milp, HiGHS): one config per unit, at most 2 distinct configs per layer, MoA density
   (mean over heads of min(S, n) / n) <= budget at every profiled length. Ties the profiled lengths cannot break
   (e.g. (2048, 0) and (0, 1), both dense at 1k and 2k) go to the larger beta (the elastic config). Units are KV groups (GQA): the query
   heads of a group share a config, so the ring cache holds exactly what they read; `gqa="head"` makes units of
   query heads (the cache then keeps each group's union). Objectives: each length alone and their normalised
   sum give the Pareto candidates; the validation length picks the one with the lowest answer loss, measured
   with the plan applied.
Layers with the model's own sliding window are not searched (dense in the plan; their cache is bounded), but
their heads count in the budget at their window's density (min(window, n) / n), so a budget is the whole
model's: on Gemma-3 (5 of 6 layers sliding at 512) the global layers get what the sliding ones leave.
`sliding=True` searches them too: a config there costs min(span, window, n) / n (spans past the window are
dense for that layer), so budgets below the sliding layers' own share become reachable.
Departure: each sample's influence is normalised to sum 1 before averaging. The first-order influence scales
with the answer's loss, so without it the summaries (answer loss ~1) outweigh the retrieval prompts, which the
dense model answers confidently (loss ~0.05), about 10 to 1 (measured on SmolLM2).
"""

from __future__ import annotations

import math
import random
import time

import numpy as np
import torch

from ..errors import ParameterError
from ..kernels import rules
from ..methods import shared

BLOCK = 64
SINK = 64
MIN_SPAN = 128  # moa's default min_span: the plans are searched for it
PAPER_LONGEST = 8192
ANSWER_TOKENS = 24
PAPER_ALPHAS = range(-2048, 8193, 1024)
BETAS = [i / 8 for i in range(9)]
DENSE = (0.0, 1.0)  # the config of a head that keeps every key (an unsearched layer's, in a plan)


def search_space(lengths: list[int]) -> tuple[list[tuple[float, float]], float]:
    s = max(lengths) / PAPER_LONGEST
    configs = [(a * s, b) for a in PAPER_ALPHAS for b in BETAS]
    ok = [
        c
        for c in configs
        if c[0] + c[1] * 2048 * s > 0 and all(c[0] + c[1] * n * s <= n * s for n in (8192, 16384))
    ]
    return ok, s


def span(config, n: int, min_span: int = MIN_SPAN) -> int:
    return shared.span(config[0], config[1], n, min_span)


def kept_keys(config, n: int, window: int | None = None) -> int:
    """Keys a head sees at length n under a config, on a layer with the model's own `window` (or none)."""
    return shared.kept(config[0], config[1], n, MIN_SPAN, window)


def density(config, n: int, window: int | None = None) -> float:
    return kept_keys(config, n, window) / n


# --- calibration data -----------------------------------------------------------------------------------------


def prompts(tokenizer, length: int, n: int, seed: int = 0, haystack=None, data: str = "suites") -> list[str]:
    """n prompts of at most length - ANSWER_TOKENS tokens. data="suites": alternating a RULER-style needle
    question (retrieval) and a one-sentence summary of haystack text (generated unless `haystack` is given);
    data="mix": the held-out mix's dev split, every family in turn (never its test split)."""
    from ..evals.haystack import Haystack
    from ..evals.suites import fit, get_suite

    if data == "mix":
        from ..evals.mix import make_samples

        start = 1000 * (seed % 1000)  # validation (seed + 1) reads other dev samples
        return [s.context + s.question for s in make_samples(tokenizer, "dev", n, length - ANSWER_TOKENS,
                                                              start=start)]  # fmt: skip

    hay = haystack or Haystack(seed=seed)
    needle = get_suite("ruler_niah_single")
    out = []
    for i in range(n):
        if i % 2 == 0:
            out.append(
                needle.sample(tokenizer, length - ANSWER_TOKENS, i, seed=f"moa-{seed}", haystack=hay).prompt
            )
            continue
        pool = hay.sentences(length // 4, offset=random.Random(f"moa-{seed}-{length}-{i}").randrange(1000))

        def make(k, pool=pool):
            return "Read this story.\n\n" + " ".join(pool[:k]) + "\n\nSummarise the story in one sentence."

        out.append(fit(tokenizer, make, length - ANSWER_TOKENS, "", len(pool))[1])
    return out


@torch.no_grad()  # (not inference_mode: the profiler backpropagates through these ids)
def dense_answers(model, tokenizer, texts: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(prompt ids, answer ids) with the answer generated greedily by the dense model itself."""
    out = []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids.to(model.device)
        gen = model.generate(ids, max_new_tokens=ANSWER_TOKENS, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)  # fmt: skip
        out.append((ids[0], gen[0, ids.shape[1] :]))
    return out


# --- gradient profiling ----------------------------------------------------------------------------------------


ROWS = 256  # query rows per profiling chunk (a multiple of BLOCK): temporaries are ROWS x N, never N x N


def _probs(q, k, scale, softcap, sliding_window, rows=None, keys=None):
    """Probabilities [B, G, R, K] (fp32) of query rows `rows` over key positions `keys`, and the pre-softcap
    scores (for the backward)."""
    s0 = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    s = rules.soft_cap(s0, softcap)
    rows = torch.arange(q.shape[-2], device=q.device) if rows is None else rows
    keys = torch.arange(k.shape[-2], device=q.device) if keys is None else keys
    allowed = rules.visible(rows[:, None], keys[None, :], sliding_window)
    return torch.softmax(s.masked_fill(~allowed, float("-inf")), -1), s0


def block_diagonals(e: torch.Tensor, qb0: int, kb0: int, nb: int) -> torch.Tensor:
    """|E| [G, R, K] for query blocks from qb0 and key blocks from kb0 -> per head, the sum over its 64 x 64
    blocks on each block diagonal d = query block - key block, [G, nb] (key block 0, the sink, excluded)."""
    g, r, c = e.shape
    rb, cb = math.ceil(r / BLOCK), math.ceil(c / BLOCK)
    e = torch.nn.functional.pad(e, (0, cb * BLOCK - c, 0, rb * BLOCK - r))
    blocks = e.view(g, rb, BLOCK, cb, BLOCK).sum((2, 4))
    qb = torch.arange(qb0, qb0 + rb, device=e.device)[:, None]
    kb = torch.arange(kb0, kb0 + cb, device=e.device)[None, :]
    d = (qb - kb).expand(rb, cb)
    keep = (d >= 0) & (kb >= 1)
    out = torch.zeros(g, nb, dtype=e.dtype, device=e.device)
    return out.index_add_(1, d[keep], blocks[:, keep])


def diagonal_sums(e: torch.Tensor) -> torch.Tensor:
    """|E| [G, N, N] -> per head, the sum over 64 x 64 blocks on each block diagonal d (sink block excluded)."""
    return block_diagonals(e, 0, 0, math.ceil(e.shape[-1] / BLOCK))


def _chunks(n: int, sliding_window):
    """(query rows, key range) per chunk: causal, so keys stop at the chunk's last row, and start at the block
    holding the first key the chunk's first row sees."""
    for r0 in range(0, n, ROWS):
        r1 = min(n, r0 + ROWS)
        k0 = 0 if sliding_window is None else max(0, r0 - sliding_window + 1) // BLOCK * BLOCK
        yield slice(r0, r1), slice(k0, r1)


class _Profiled(torch.autograd.Function):
    """Exact attention whose backward also accumulates MoA's influence |E| per head and block diagonal, one KV
    group and ROWS query rows at a time."""

    @staticmethod
    def forward(ctx, q, k, v, scale, softcap, sliding_window, sink):
        ctx.save_for_backward(q, k, v)
        ctx.args = (scale, softcap, sliding_window, sink)
        g = q.shape[1] // k.shape[1]
        pos = torch.arange(q.shape[-2], device=q.device)
        out = torch.empty_like(q)
        for kv in range(k.shape[1]):
            sl = slice(kv * g, (kv + 1) * g)
            for r, c in _chunks(q.shape[-2], sliding_window):
                p, _ = _probs(
                    q[:, sl, r], k[:, kv : kv + 1, c], scale, softcap, sliding_window, pos[r], pos[c]
                )
                out[:, sl, r] = torch.matmul(p, v[:, kv : kv + 1, c].float()).to(q.dtype)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v = ctx.saved_tensors
        scale, softcap, sliding_window, sink = ctx.args
        n, g = q.shape[-2], q.shape[1] // k.shape[1]
        nb = math.ceil(n / BLOCK)
        pos = torch.arange(n, device=q.device)
        dq = torch.zeros_like(q)
        dk, dv = torch.zeros_like(k, dtype=torch.float32), torch.zeros_like(v, dtype=torch.float32)
        for kv in range(k.shape[1]):
            sl = slice(kv * g, (kv + 1) * g)
            ks, vs = k[:, kv : kv + 1].float(), v[:, kv : kv + 1].float()
            diag = torch.zeros(g, nb, dtype=torch.float32, device=q.device)
            for r, c in _chunks(n, sliding_window):
                qs, do = q[:, sl, r].float(), dout[:, sl, r].float()
                p, s0 = _probs(qs, ks[:, :, c], scale, softcap, sliding_window, pos[r], pos[c])
                da = torch.matmul(do, vs[:, :, c].transpose(-1, -2))
                ds = p * (da - (p * da).sum(-1, keepdim=True))
                one_minus = 1 - p
                e = torch.where(one_minus > 1e-6, ds.abs() / one_minus.clamp(min=1e-6), 0.0)
                diag += block_diagonals(e.sum(0), r.start // BLOCK, c.start // BLOCK, nb)  # batch summed
                if softcap is not None:
                    ds = ds * (1 - torch.tanh(s0 / softcap) ** 2)
                dq[:, sl, r] = (torch.matmul(ds, ks[:, :, c]) * scale).to(q.dtype)
                dk[:, kv, c] += (torch.matmul(ds.transpose(-1, -2), qs) * scale).sum(1)
                dv[:, kv, c] += torch.matmul(p.transpose(-1, -2), do).sum(1)
            sink(sl, diag)
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def profile(model, samples, *, progress=None) -> torch.Tensor:
    """Mean influence per (layer, query head, block diagonal) over samples of one length: [L, H, nb]. Each
    sample's influence is normalised to sum 1 first, so every sample weighs the same (departure, see above)."""
    import llmpatch

    spec = llmpatch.detect(model)
    n = max(len(p) + len(a) for p, a in samples)
    acc = torch.zeros(spec.num_layers, spec.num_heads, math.ceil(n / BLOCK), dtype=torch.float64)
    total = torch.zeros_like(acc)
    grads = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with llmpatch.patched(model, "dense") as patch:
            for layer in patch.layers:

                def run(decision, q, k, v, scale, softcap, li=layer.layer):
                    def sink(sl, d):
                        acc[li, sl, : d.shape[-1]] += d.double()

                    sw = decision.sliding_window
                    return _Profiled.apply(q, k, v, scale or q.shape[-1] ** -0.5, softcap, sw, sink)

                layer.taps.profiler = run
            for i, (prompt, answer) in enumerate(samples):
                t0 = time.perf_counter()
                ids = torch.cat([prompt, answer]).unsqueeze(0)
                emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
                logits = model(inputs_embeds=emb, use_cache=False, logits_to_keep=len(answer) + 1).logits[
                    0, :-1
                ]
                loss = torch.nn.functional.cross_entropy(logits.float(), answer)
                acc.zero_()
                loss.backward()
                total.add_(acc / acc.sum().clamp(min=1e-30))
                if progress:
                    progress(
                        {
                            "sample": i,
                            "tokens": ids.shape[1],
                            "loss": float(loss.detach()),
                            "s": time.perf_counter() - t0,
                        }
                    )
    finally:
        for p, g in zip(model.parameters(), grads, strict=True):
            p.requires_grad_(g)
    return (total / len(samples)).float()


# --- configs and the MILP --------------------------------------------------------------------------------------


def keep_share(d: int, window: int) -> float:
    """Share of the 64 x 64 (query, key) pairs of a block at block distance d that lie inside the window."""
    t = window - BLOCK * d  # kept pairs: a - b < t, with a, b in [0, 64)
    x = np.arange(-(BLOCK - 1), BLOCK)
    return float(((BLOCK - np.abs(x)) * (x < t)).sum() / BLOCK**2)


def config_losses(diag: torch.Tensor, configs, n: int) -> np.ndarray:
    """[L, H, C]: the influence each config drops at length n (0 for a config that is dense there)."""
    nb = diag.shape[-1]
    drop = np.zeros((len(configs), nb))
    for c, cfg in enumerate(configs):
        s = span(cfg, n)
        if s < n:
            drop[c] = [1 - keep_share(d, s - SINK) for d in range(nb)]
    return np.einsum("lhd,cd->lhc", diag.double().numpy(), drop)


def solve(losses: dict, configs, units: list[tuple[int, list[int]]], budget: float, weights: dict,
          max_per_layer: int = 2, time_limit: float = 60.0, fixed: dict | None = None,
          windows: list | None = None) -> list[int]:  # fmt: skip
    """One config index per unit (layer, heads), minimising sum_n weights[n] * loss_n under the density budget
    at every n and at most `max_per_layer` distinct configs per layer. `fixed[n]` = (heads, summed density) of
    heads outside the search that count in the budget (sliding-window layers); `windows[layer]`: the model's own
    window of a searched layer (None: global)."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import lil_matrix

    nu, nc = len(units), len(configs)
    layers = sorted({u[0] for u in units})
    nx, ny = nu * nc, len(layers) * nc
    cost = np.zeros(nx + ny)
    for n, w in weights.items():
        cost[:nx] += w * np.concatenate([losses[n][li, heads].sum(0) for li, heads in units])
    rows, lo, hi = lil_matrix((nu + nx + len(layers) + len(losses), nx + ny)), [], []
    r = 0
    for u in range(nu):  # one config per unit
        rows[r, u * nc : (u + 1) * nc] = 1
        lo.append(1), hi.append(1)
        r += 1
    for u, (li, _) in enumerate(units):  # x[u, c] <= y[layer, c]
        yi = nx + layers.index(li) * nc
        for c in range(nc):
            rows[r, u * nc + c], rows[r, yi + c] = 1, -1
            lo.append(-np.inf), hi.append(0)
            r += 1
    for j in range(len(layers)):  # at most max_per_layer configs per layer
        rows[r, nx + j * nc : nx + (j + 1) * nc] = 1
        lo.append(0), hi.append(max_per_layer)
        r += 1
    total_heads = sum(len(h) for _, h in units)
    win = lambda li: windows[li] if windows else None  # noqa: E731
    for n in losses:  # mean density over heads (searched and fixed) <= budget
        heads, used = (fixed or {}).get(n, (0, 0.0))
        dens = {w: np.array([density(c, n, w) for c in configs]) for w in {win(li) for li, _ in units}}
        rows[r, :nx] = np.concatenate([len(h) * dens[win(li)] for li, h in units])
        lo.append(0), hi.append(budget * (total_heads + heads) - used)
        r += 1
    res = milp(cost, constraints=LinearConstraint(rows.tocsr(), lo, hi), integrality=np.ones(nx + ny),
               bounds=Bounds(0, 1), options={"time_limit": time_limit, "mip_rel_gap": 1e-4})  # fmt: skip
    if res.x is None:
        raise ParameterError(f"density: no plan meets a density budget of {budget} ({res.message})")
    choice = [int(np.argmax(res.x[u * nc : (u + 1) * nc])) for u in range(nu)]
    return _most_elastic(choice, configs, losses, units, windows)


def _most_elastic(choice: list[int], configs, losses: dict, units, windows: list | None = None) -> list[int]:
    """Ties the profiled lengths cannot break: the units of a layer that share config c move together to the
    config with the largest beta that has, for each of them, the same loss and density as c at every profiled
    length (e.g. (2048, 0) -> (0, 1), both dense at 1k and 2k). Objective, budget and configs per layer hold."""

    def ties(c, li, heads):
        w = windows[li] if windows else None
        return {j for j in range(len(configs))
                if all(abs(float(losses[n][li, heads, j].sum() - losses[n][li, heads, c].sum())) <= 1e-12
                       and density(configs[j], n, w) == density(configs[c], n, w) for n in losses)}  # fmt: skip

    out = list(choice)
    for li, c in {(u[0], c) for u, c in zip(units, choice, strict=True)}:
        members = [i for i, (u, cc) in enumerate(zip(units, choice, strict=True)) if u[0] == li and cc == c]
        common = set.intersection(*(ties(c, li, units[i][1]) for i in members))
        best = max(common, key=lambda j: (configs[j][1], configs[j][0]))
        for i in members:
            out[i] = best
    return out


# --- the search ------------------------------------------------------------------------------------------------


def plan_params(choice: list[int], configs, units, spec) -> dict:
    alphas = [[DENSE[0]] * spec.num_heads for _ in range(spec.num_layers)]
    betas = [[DENSE[1]] * spec.num_heads for _ in range(spec.num_layers)]  # unsearched layers stay dense
    for (li, heads), c in zip(units, choice, strict=True):
        for h in heads:
            alphas[li][h], betas[li][h] = float(configs[c][0]), float(configs[c][1])
    return {"alphas": alphas, "betas": betas, "sink": SINK}


@torch.inference_mode()
@torch.no_grad()
def answer_loss(model, samples, params: dict | None) -> float:
    """Mean cross-entropy of the dense model's answers, with the plan applied (None: dense)."""
    import llmpatch

    def run():
        total = 0.0
        for prompt, answer in samples:
            ids = torch.cat([prompt, answer]).unsqueeze(0)
            logits = model(ids, use_cache=False, logits_to_keep=len(answer) + 1).logits[0, :-1]
            total += float(torch.nn.functional.cross_entropy(logits.float(), answer))
        return total / len(samples)

    if params is None:
        return run()
    with llmpatch.patched(model, "moa", **params, ring=False):
        return run()


def check_search(density, lengths, validate_length, gqa, data, context=None) -> list[float]:
    """The search's arguments, checked (the CLI calls it before loading the model, without the context)."""
    budgets = list(density) if isinstance(density, (list, tuple)) else [density]
    if not budgets or any(not isinstance(d, (int, float)) or not 0 < d <= 1 for d in budgets):
        raise ParameterError(f"density: must be a number in (0, 1] (or a list of them), got {density}")
    if data not in ("suites", "mix"):
        raise ParameterError(f"data: must be 'suites' or 'mix', got {data!r}")
    if gqa not in ("group", "head"):
        raise ParameterError(f"gqa: must be 'group' or 'head', got {gqa!r}")
    for n in [*lengths, *([validate_length] if validate_length else [])]:
        if not isinstance(n, int) or n < 2 * BLOCK or (context is not None and n > context):
            upto = f"..{context} (the model's context)" if context else " or more, up to the model's context"
            raise ParameterError(
                f"lengths: profiling and validation lengths must be ints in {2 * BLOCK}{upto}, got {n}"
            )
    return budgets


def search(model, tokenizer, *, density, lengths: list[int], validate_length: int | None = None,
           samples: int = 8, seed: int = 0, haystack=None, gqa: str = "head", progress=None,
           data: str = "suites", sliding: bool = False) -> dict | list[dict]:  # fmt: skip
    """One plan search; `density` a list gives one result per budget from the same profile; `sliding` also
    searches the layers with the model's own sliding window."""
    import llmpatch

    from ..methods.base import compressed_layers

    spec = llmpatch.detect(model)
    budgets = check_search(density, lengths, validate_length, gqa, data, spec.max_position_embeddings)
    t0 = time.perf_counter()
    configs, scale = search_space(lengths)
    searched = compressed_layers(spec, sliding)  # the model's own sliding-window layers only if `sliding`
    losses, profiles = {}, {}
    for n in lengths:
        answered = dense_answers(model, tokenizer, prompts(tokenizer, n, samples, seed, haystack, data))
        diag = profile(model, answered, progress=lambda r, n=n: progress and progress({"length": n, **r}))
        true_n = max(len(p) + len(a) for p, a in answered)
        losses[n] = config_losses(diag, configs, true_n)
        profiles[n] = true_n
    val = None
    if validate_length:
        val = dense_answers(
            model, tokenizer, prompts(tokenizer, validate_length, samples, seed + 1, haystack, data)
        )
    profile_s = time.perf_counter() - t0
    results = [_choose(model, spec, configs, scale, searched, losses, profiles, lengths, d, gqa, val,
                       validate_length, dict(samples=samples, seed=seed, data=data, sliding=sliding,
                                             profile_s=profile_s))
               for d in budgets]  # fmt: skip
    return results if isinstance(density, (list, tuple)) else results[0]


def _choose(model, spec, configs, scale, searched, losses, profiles, lengths, density, gqa, val, validate_length,
            extra) -> dict:  # fmt: skip
    """The MILP candidates for one density budget on a shared profile, and the one the validation picks."""
    t0 = time.perf_counter()
    norm = {n: 1.0 / max(float(losses[n].max(-1).sum()), 1e-30) for n in lengths}
    objectives = {f"length {n}": {n: norm[n]} for n in lengths}
    if len(lengths) > 1:
        objectives["all lengths"] = norm
    candidates = []
    for label, weights in objectives.items():
        c = _candidate(label, losses, configs, _units(spec, searched, gqa), density, weights, spec)
        if all(c["params"] != o["params"] for o in candidates):
            candidates.append(c)
    other = "head" if gqa == "group" else "group"  # GQA: the other granularity, same profile and objective
    alt = _candidate(list(objectives)[-1], losses, configs, _units(spec, searched, other), density,
                     objectives[list(objectives)[-1]], spec)  # fmt: skip
    chosen = candidates[-1]
    if validate_length:
        dense_loss = answer_loss(model, val, None)
        for c in [*candidates, alt]:
            c["validation_loss"] = answer_loss(model, val, c["params"])
            c["validation_density"] = _plan_density(c["params"], spec, validate_length)
            c["validation_kv_fraction"] = _kv_fraction(c["params"], spec, validate_length)
        chosen = min(candidates, key=lambda c: c["validation_loss"])
    alt = {"units": other, **alt}  # its params too: a plan for the other choice without a second search
    return {"params": chosen["params"], "chosen": chosen["objective"], "candidates": candidates,
            "configs": len(configs), "alpha_scale": scale, "units": gqa, "other_units": alt,
            "searched_layers": searched, "lengths": lengths, "profiled_tokens": profiles,
            "validate_length": validate_length, "dense_validation_loss": dense_loss if validate_length else None,
            **extra, "density_budget": density,
            "total_s": extra["profile_s"] + time.perf_counter() - t0}  # fmt: skip


def _units(spec, searched, gqa):
    g = spec.num_heads // spec.num_kv_heads
    if gqa == "group":  # the query heads of a KV group share one config
        return [(li, list(range(kv * g, (kv + 1) * g))) for li in searched for kv in range(spec.num_kv_heads)]
    return [(li, [h]) for li in searched for h in range(spec.num_heads)]


def _candidate(label, losses, configs, units, budget, weights, spec) -> dict:
    searched = sorted({li for li, _ in units})
    fixed = {n: _fixed(spec, n, searched) for n in losses}
    choice = solve(losses, configs, units, budget, weights, fixed=fixed, windows=spec.sliding_window)
    params = plan_params(choice, configs, units, spec)
    loss = {n: float(sum(losses[n][li, h].sum(0)[c] for (li, h), c in zip(units, choice, strict=True)))
            for n in losses}  # fmt: skip
    return {"objective": label, "params": params, "profiled_loss": loss,
            "density": {n: _plan_density(params, spec, n) for n in losses},
            "kv_fraction": {n: _kv_fraction(params, spec, n) for n in losses}}  # fmt: skip


def _fixed(spec, n, searched=None) -> tuple[int, float]:
    """Heads of the sliding-window layers outside the search and their summed density at length n."""
    sliding = [w for li, w in enumerate(spec.sliding_window) if w is not None and li not in (searched or ())]
    return len(sliding) * spec.num_heads, sum(density(DENSE, n, w) for w in sliding) * spec.num_heads


def _kv_fraction(params, spec, n) -> float:
    """Ring-cache size against the dense cache at length n, every layer: each KV head keeps its query heads'
    largest span, capped at the layer's own sliding window if it has one."""
    g = spec.num_heads // spec.num_kv_heads

    def kept(li, kv):  # an unsearched sliding layer's (0, 1) spans give its window
        return max(_head_keys(params, spec, li, h, n) for h in range(kv * g, (kv + 1) * g))

    sizes = [kept(li, kv) for li in range(spec.num_layers) for kv in range(spec.num_kv_heads)]
    return sum(sizes) / (n * len(sizes))


def _plan_density(params, spec, n) -> float:
    """MoA density over every head at length n (a sliding-window layer's heads capped at its window)."""
    keys = [
        _head_keys(params, spec, li, h, n) for li in range(spec.num_layers) for h in range(spec.num_heads)
    ]
    return sum(keys) / (n * len(keys))


def _head_keys(params, spec, li, h, n) -> int:
    """Keys a head of layer li sees at length n under the plan: its span, capped at the layer's own window."""
    return kept_keys((params["alphas"][li][h], params["betas"][li][h]), n, spec.sliding_window[li])


def to_plan(result: dict, spec):
    from ..plan import Plan, provenance

    meta = {k: v for k, v in result.items() if k != "params"}
    meta["candidates"] = [{k: v for k, v in c.items() if k != "params"} for c in result["candidates"]]
    return Plan(model=spec.fingerprint(), methods=[{"name": "moa", "params": result["params"]}],
                provenance=provenance(calibration_data={"tasks": TASKS[result.get("data", "suites")], **meta}))  # fmt: skip


TASKS = {"suites": "ruler_niah_single + summaries, answers by the dense model",
         "mix": "the held-out mix's dev split (every family), answers by the dense model"}  # fmt: skip
