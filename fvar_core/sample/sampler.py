"""Sampling: scale-by-scale autoregressive generation with the KV cache (docs/design.md §8, docs/var-compat.md §2.8).

The sampler is a function over a VAR (the student) and a tokenizer, not a method grown inside the
model. Per scale si = 0..K−1 (patch number pn, l = pn² tokens):

    logits   = VAR.forward_step(cond, x_si, cache)           (2B or B, l, V) float32
    guided   = CFG(cond half, null half, si)                  (B, l, V)        see `guide`
    idx      = top-k / top-p filtered sample                  (B, l)           see `pick_tokens`
    h        = E[idx]   (or VAR's gumbel-softmax mix with more_smooth)
    idx, h   = the given tokens where a known-token mask is True (inpainting)
    f̂, x_next = tokenizer.quantize.next_ar_input(si, f̂, h)    VAR's get_next_autoregressive_input

and the image is `tokenizer.fhat_to_img(f̂)·½ + ½` in [0, 1].

Guidance (`SampleConfig.cfg_mode`), with r = si/(K−1) (cfg_schedule 'linear', VAR's ramp) or r = 1
('constant'):
    var:      logits = (1 + t)·cond − t·uncond,  t = cfg·r        (VAR: no guidance at the first
              scale, full cfg at the last; cfg 0 = off)
    standard: logits = uncond + w·(cond − uncond),  w = 1 + (cfg − 1)·r   (the DiT/diffusers guidance
              scale: 1 = off; 'standard' cfg w is VAR's cfg w − 1)
When guidance is off (var cfg 0, standard cfg 1) the null half is not run at all.

Seeds: every image has its own seed. Its random numbers — one uniform per token per scale — come
from a CPU `torch.Generator` seeded with it, and tokens are drawn by inverse CDF from those
uniforms, so an image does not depend on the batch it shares, on chunking or on the device (up to
float rounding of the logits). VAR's gumbel noise with more_smooth (V numbers per token) is drawn
on the model's device, from the image's generator on the CPU and from a device generator seeded
with the same seed elsewhere: batch-independent too, but a more_smooth image differs between CPU
and GPU. The null-class half uses no
randomness. This is not the official RNG stream, so stochastic samples differ from the official
code's for the same seed; greedy (top_k 1) and teacher-forced runs match it either way.

`rng="official"` instead consumes randomness exactly as VAR's `autoregressive_infer_cfg(g_seed=…)`:
one generator on the model's device, seeded with the batch's first seed, drawn by one
`torch.multinomial` over the batch's B·l rows per scale on VAR's in-place-filtered logits
(`official_filter_`), then, with more_smooth, one gumbel draw of the logits' shape. An official
checkpoint then gives the official demo's tokens for the same seed, labels, batch and settings
(the fixture's top-k 900 / top-p 0.96 runs, with and without more_smooth, match token for token:
tests/test_sampler.py). Its images depend on the batch they are drawn in, as the official ones do.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from fvar_core.checks import check_labels
from fvar_core.config import SampleConfig
from fvar_core.cpualloc import keep_freed_memory
from fvar_core.errors import UserError
from fvar_core.sample.speedups import check_speedups, fill_pruned, kept_tokens, kv_capacity, kv_keeps

PathLike = Union[str, Path]
# observe(si, guided logits (B, l, V) float32, sampled idx before known-token forcing (B, l))
Observer = Callable[[int, torch.Tensor, torch.Tensor], None]


# ------------------------------------------------------------------------------------------------
# Guidance and token choice (pure functions of tensors)
# ------------------------------------------------------------------------------------------------

def settings_from(base: SampleConfig, **overrides: Any) -> SampleConfig:
    """`base` (a preset's `sample` section) with the given non-None fields replaced, validated;
    a value out of range is a one-line UserError naming the field."""
    from pydantic import ValidationError

    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return SampleConfig.model_validate({**base.model_dump(), **given})
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err.get("loc", ())) or "sample settings"
        raise UserError(f"{where.replace('_', '-')}: {err.get('msg', 'invalid value')} "
                        f"(got {err.get('input')!r})") from None


def guidance_off(s: SampleConfig) -> bool:
    """True when the guided logits equal the conditional ones at every scale (no null half needed)."""
    return s.cfg == (0.0 if s.cfg_mode == "var" else 1.0)


def guidance_weight(si: int, num_scales: int, s: SampleConfig) -> float:
    """t of VAR's form (1+t)·cond − t·uncond at scale si, for either cfg_mode."""
    r = 1.0 if s.cfg_schedule == "constant" else si / max(num_scales - 1, 1)
    return s.cfg * r if s.cfg_mode == "var" else (s.cfg - 1.0) * r


def guide(cond: torch.Tensor, uncond: torch.Tensor, si: int, num_scales: int, s: SampleConfig) -> torch.Tensor:
    """Guided logits (B, l, V) from the conditional and null-class logits (B, l, V), float32."""
    t = guidance_weight(si, num_scales, s)
    if s.cfg_mode == "var":
        return (1 + t) * cond - t * uncond  # VAR's expression, term for term (var.py:172-173)
    return uncond + (1 + t) * (cond - uncond)


def candidates(logits: torch.Tensor, top_k: int, top_p: float):
    """The tokens top-k / top-p leave, in candidate space.

    logits (B, l, V) → (values (B, l, n), ids (B, l, n) or None = identity, keep (B, l, n) bool).
    Same rule as VAR's `sample_with_top_k_top_p_`, without modifying `logits`: top-k keeps the k
    largest; top-p then drops, in ascending order, tokens whose cumulative probability is ≤ 1 − p
    (the largest is always kept). With top-k only the k candidates are sorted, not the vocabulary.
    (Exact ties at the k-th value, which VAR keeps too, are cut to k.)
    """
    V = logits.shape[-1]
    k = top_k if 0 < top_k < V else 0
    if k == 0 and top_p <= 0:
        return logits, None, None
    if k:
        vals, ids = logits.topk(k, dim=-1, largest=True, sorted=True)  # descending
    else:
        vals, ids = logits.sort(dim=-1, descending=True)
    if top_p <= 0:
        return vals, ids, None
    probs = vals.softmax(dim=-1)
    # VAR's ascending cumsum, read back in descending order: the mass of every token ≤ this one
    mass_at_or_below = probs.flip(-1).cumsum(-1).flip(-1)
    keep = mass_at_or_below > (1 - top_p)
    keep[..., 0] = True
    return vals, ids, keep


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index drawn from unnormalised probabilities (B, l, n) with uniforms u (B, l) in [0, 1) → (B, l).

    The first index whose cumulative mass exceeds u·total: always a token of positive probability
    (the cdf only rises at those), never past the end."""
    cdf = probs.cumsum(dim=-1)
    total = cdf[..., -1:]
    target = torch.minimum(u.unsqueeze(-1).to(cdf.dtype) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target.contiguous(), right=True).squeeze(-1).clamp_max_(probs.shape[-1] - 1)


def pick_tokens(logits: torch.Tensor, u: torch.Tensor, top_k: int, top_p: float, want_filtered: bool = False):
    """Sample one token per position. logits (B, l, V) float32, u (B, l) uniforms.

    Returns (idx (B, l) long, filtered logits (B, l, V) with −inf outside the kept set, or None
    unless want_filtered — VAR's more_smooth mixes the code vectors by the filtered logits)."""
    vals, ids, keep = candidates(logits, top_k, top_p)
    if vals.shape[-1] == 1:  # greedy: no randomness needed
        j = torch.zeros(vals.shape[:-1], dtype=torch.long, device=vals.device)
    else:
        probs = (vals - vals.amax(-1, keepdim=True)).exp()  # softmax up to the normaliser
        if keep is not None:
            probs = probs.masked_fill(~keep, 0.0)
        j = inverse_cdf(probs, u)
    idx = j if ids is None else ids.gather(-1, j.unsqueeze(-1)).squeeze(-1)
    filtered = None
    if want_filtered:
        if ids is None:
            filtered = logits
        else:
            kept = vals if keep is None else vals.masked_fill(~keep, -math.inf)
            filtered = torch.full_like(logits, -math.inf).scatter_(-1, ids, kept)
    return idx, filtered


def official_filter_(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """VAR's `sample_with_top_k_top_p_` filter, in place on logits (B, l, V): −inf below the k-th
    largest (ties kept), then, in ascending order, on tokens whose cumulative probability is
    ≤ 1 − p (the largest always kept). Written op for op as the official code, so that
    `rng="official"` hands torch.multinomial the official probabilities."""
    V = logits.shape[-1]
    if top_k > 0:
        kth = logits.topk(min(top_k, V), largest=True, sorted=False, dim=-1)[0].amin(dim=-1, keepdim=True)
        logits.masked_fill_(logits < kth, -math.inf)
    if top_p > 0:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
        remove = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        remove[..., -1:] = False
        logits.masked_fill_(remove.scatter(sorted_idx.ndim - 1, sorted_idx, remove), -math.inf)
    return logits


def official_draw(logits: torch.Tensor, gen: torch.Generator, top_k: int, top_p: float):
    """VAR's token draw for a whole batch from ONE generator: logits (B, l, V) float32 →
    (idx (B, l), the filtered logits). One torch.multinomial over the B·l rows per scale, as
    `autoregressive_infer_cfg` calls it; the batch's images share the stream."""
    B, l, V = logits.shape
    filtered = official_filter_(logits.clone(), top_k, top_p)
    idx = torch.multinomial(filtered.softmax(dim=-1).view(-1, V), num_samples=1, replacement=True, generator=gen)
    return idx.view(B, l), filtered


def smooth_ratio_tau(si: int, num_scales: int) -> tuple[float, float]:
    """VAR's more_smooth: logits × (1 + ratio), gumbel temperature max(0.27(1 − 0.95 ratio), 0.005)."""
    ratio = si / max(num_scales - 1, 1)
    return ratio, max(0.27 * (1 - ratio * 0.95), 0.005)


# ------------------------------------------------------------------------------------------------
# One batch
# ------------------------------------------------------------------------------------------------

@dataclass
class SampleResult:
    """tokens: K tensors (N, pn_k²) long (CPU); images: (N, 3, H, W) float32 in [0, 1] (CPU) or None;
    f_hat: (N, Cv, P, P) float32 on the model's device (from `sample_batch` only); kv_bytes: the KV
    caches one batch allocated (every model's; the largest batch's from `sample`)."""

    tokens: List[torch.Tensor]
    images: Optional[torch.Tensor] = None
    f_hat: Optional[torch.Tensor] = None
    kv_bytes: int = 0


def decode_images(tokenizer, f_hat: torch.Tensor, precision: str = "auto") -> torch.Tensor:
    """f̂ (B, Cv, P, P) → images (B, 3, H, W) float32 in [0, 1] on f̂'s device. precision 'auto':
    bf16 autocast on CUDA (VAR decodes under its sampling autocast too), float32 elsewhere; 'fp32'
    / 'bf16' force one (bf16 on the CPU uses its bf16 matrix units where it has them)."""
    dev = f_hat.device.type
    bf16 = precision == "bf16" or (precision == "auto" and dev == "cuda")
    if dev == "cpu":
        keep_freed_memory()
    with torch.no_grad(), torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
        return (tokenizer.fhat_to_img(f_hat).float() * 0.5 + 0.5).clamp_(0, 1)


def _generators(seeds: Sequence[int]) -> List[torch.Generator]:
    out = []
    for s in seeds:
        s = int(s)
        if not 0 <= s < 2 ** 63:
            raise UserError(f"seed {s} out of range (0 ≤ seed < 2^63)")
        out.append(torch.Generator("cpu").manual_seed(s))
    return out


def _uniforms(gens: Sequence[torch.Generator], n: int, device) -> torch.Tensor:
    """(B, n) uniforms, row b from generator b (a row never sees another row's draws); one copy
    to the device (pinned and asynchronous on CUDA, so the sampling loop does not wait on it)."""
    u = torch.stack([torch.rand(n, generator=g) for g in gens])
    if torch.device(device).type == "cuda":
        return u.pin_memory().to(device, non_blocking=True)
    return u.to(device)


class _Stream:
    """One model's side of the sampling loop: its class condition, KV cache and position
    embeddings, and (for token pruning) its last scale's full hidden map. The draft model and the
    refiner of draft-and-refine are two streams over the same tokens."""

    def __init__(self, var, lab: torch.Tensor, settings: SampleConfig, cache_dtype):
        self.var = var
        self.cond = var.class_condition(lab)  # (2B or B, C)
        self.cache = var.new_kv_cache(lab.numel(), lab.device, cache_dtype,
                                      capacity=kv_capacity(var.patch_nums, settings.kv_budget))
        self.lvl_pos = var.lvl_pos()  # (1, L, C), once per batch
        self.step = step_function(var, settings.compile)
        self.hidden: Optional[torch.Tensor] = None  # (R, l, C) of the last scale, when kept

    def inputs(self, si: int, x_next: Optional[torch.Tensor]) -> torch.Tensor:
        """The scale's input tokens (R, l, C), R = the rows of the condition."""
        if si == 0:
            return self.var.first_scale_input(self.cond, self.lvl_pos)
        x = self.var.scale_input(x_next, si, self.lvl_pos)  # (B, l, C)
        return x if x.shape[0] == self.cond.shape[0] else x.repeat(self.cond.shape[0] // x.shape[0], 1, 1)

    def unguide(self, B: int) -> None:
        """Drop the null-class half: condition, KV cache, kept hidden map."""
        self.cond = self.cond[:B]
        self.cache.keep_rows(B)
        self.hidden = None if self.hidden is None else self.hidden[:B]

    def run(self, si: int, x: torch.Tensor, keep: Optional[torch.Tensor], keep_hidden: bool,
            logits: bool = True) -> Optional[torch.Tensor]:
        """One scale through the model: x (R, l, C) → logits (R, l, V) float32 (or None).
        keep (R, n): the positions run when the scale is pruned, the rest filled from `hidden`."""
        if keep is None and not keep_hidden and logits:  # the default path, op for op
            return self.step(self.cond, x, self.cache, si)
        pn = self.var.patch_nums[si]
        if keep is not None:
            x = x.gather(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        h = self.step(self.cond, x, self.cache, si, head=False)
        if keep is not None:
            h = fill_pruned(h, keep, self.hidden, pn)
        self.hidden = h
        return self.var.get_logits(h, self.cond) if logits else None


@torch.no_grad()
def sample_batch(var, tokenizer, labels: torch.Tensor, seeds: Sequence[int], settings: SampleConfig, *,
                 known: Optional[Sequence[torch.Tensor]] = None, known_mask: Optional[Sequence[torch.Tensor]] = None,
                 decode: bool = True, observe: Optional[Observer] = None, refiner=None,
                 on_scale: Optional[Callable[[int, torch.Tensor], None]] = None) -> SampleResult:
    """Sample B images in one pass (no chunking). Both models on the same device, in eval mode.

    labels: (B,) int64, num_classes = unconditional; seeds: B ints.
    known / known_mask: K tensors (B, pn_k²) long / bool (masks may be (1, pn_k²)): where the mask
    is True the given token replaces the sampled one at that scale, in the tokens and in f̂ (and so
    in every later scale's input) — VAR's zero-shot editing (docs/var-compat.md §5).
    observe: called per scale with the guided logits and the sampled tokens (before forcing).
    refiner: a second VAR over the same tokenizer that samples from scale settings.refine_from on
    (draft and refine); the speed-up settings are checked by `speedups.check_speedups`.
    on_scale: called after every scale with (si, f̂ so far (B, Cv, P, P)) — the image coming into
    focus (the studio decodes and streams it).
    """
    device = var.pos_1LC.device
    quant = tokenizer.quantize
    pns, K = var.patch_nums, len(var.patch_nums)
    if tuple(quant.patch_nums) != tuple(pns):
        raise UserError(f"tokenizer patch numbers {list(quant.patch_nums)} differ from the model's {list(pns)}")
    check_speedups(settings, var, refiner)
    labels = labels.to(device=device, dtype=torch.long).view(-1)
    B = labels.numel()
    if len(seeds) != B:
        raise ValueError(f"{len(seeds)} seeds for {B} labels")
    check_labels(labels.tolist(), var.num_classes, "labels", allow_null=True)
    gens = _generators(seeds)
    official = settings.rng == "official"
    # the official code seeds one generator on the model's device with g_seed (here: the batch's first seed)
    batch_gen = torch.Generator(device).manual_seed(int(seeds[0])) if official else None
    # an all-unconditional batch (inpainting's default) has nothing to guide: its null half would
    # repeat the conditional one
    guided = not guidance_off(settings) and bool((labels != var.num_classes).any())
    E = quant.embedding.weight  # (V, Cv)
    Cv, P = E.shape[1], pns[-1]
    cuda = device.type == "cuda"
    # bf16 transformer on CUDA (VAR samples under autocast); CFG, softmax and sampling stay float32
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    lab = torch.cat((labels, torch.full_like(labels, var.num_classes))) if guided else labels
    cache_dtype = torch.bfloat16 if cuda else torch.float32
    f_hat = torch.zeros(B, Cv, P, P, device=device, dtype=torch.float32)
    tokens: List[torch.Tensor] = []
    # every image's uniforms for all scales drawn up front (the same numbers as per-scale draws
    # from its generator) and moved once; with more_smooth the gumbel noise follows them
    u_all = None if official else _uniforms(gens, var.seq_len, device)  # (B, L)
    if known is not None:
        known = [k.to(device) for k in known]
        known_mask = [m.to(device) for m in known_mask]
    # more_smooth's gumbel noise: per image, on the model's device (on the CPU: the image's generator,
    # continuing after its uniforms; elsewhere a device generator seeded with the same seed)
    noise_gens = gens if device.type == "cpu" else [torch.Generator(device).manual_seed(int(s)) for s in seeds]
    with amp:
        draft = _Stream(var, lab, settings, cache_dtype)
        streams = [draft] if refiner is None else [draft, _Stream(refiner, lab, settings, cache_dtype)]
        kv_bytes = sum(st.cache.nbytes for st in streams)
        x_next = None  # (B, l, Cv): the next scale's input from f̂
        for si, pn in enumerate(pns):
            if settings.kv_budget is not None:
                for st in streams:
                    st.cache.keep_scales(kv_keeps(*settings.kv_budget, si))
            pruned = settings.prune.get(pn, 0.0) if si else 0.0
            keep = kept_tokens(x_next, pruned) if pruned else None  # (B, n)
            if keep is not None and guided:
                keep = keep.repeat(2, 1)
            # the pruned positions of the next scale are filled from this one's hidden states
            keep_hidden = si + 1 < K and settings.prune.get(pns[si + 1], 0.0) > 0
            # while drafting, the refiner reads each scale too (its KV cache); then it alone runs
            running = streams if len(streams) == 1 or si < settings.refine_from else streams[1:]
            for st in running:
                out = st.run(si, st.inputs(si, x_next), keep, keep_hidden, logits=st is running[0])
                if st is running[0]:
                    logits = out.float()  # (R, l, V)
            if guided:
                logits = guide(logits[:B], logits[B:], si, K, settings)
            if official:
                idx, filtered = official_draw(logits, batch_gen, settings.top_k, settings.top_p)
            else:
                u = u_all[:, slice(*var.begin_ends[si])]
                idx, filtered = pick_tokens(logits, u, settings.top_k, settings.top_p,
                                            want_filtered=settings.more_smooth)
            if observe is not None:
                observe(si, logits, idx)
            if settings.more_smooth:  # VAR's soft code mix (visualisation only, docs/var-compat.md §2.8)
                ratio, tau = smooth_ratio_tau(si, K)
                if official:  # one draw of the logits' shape from the batch's generator, after the tokens
                    gumbel = -torch.empty_like(filtered).exponential_(generator=batch_gen).log()
                else:
                    expo = torch.stack([torch.empty(pn * pn, E.shape[0], device=device).exponential_(generator=g)
                                        for g in noise_gens])
                    gumbel = -expo.log()
                h = ((filtered * (1 + ratio) + gumbel) / tau).softmax(-1) @ E  # (B, l, Cv)
            else:
                h = F.embedding(idx, E)  # (B, l, Cv)
            if known is not None:
                m = known_mask[si].expand(B, -1)
                gt = known[si]
                idx = torch.where(m, gt, idx)
                h = torch.where(m.unsqueeze(-1), F.embedding(gt, E), h)
            tokens.append(idx)
            h_BChw = h.transpose(1, 2).reshape(B, Cv, pn, pn).float()
            with torch.autocast(device.type, enabled=False):  # the VQ side in float32 (cheap: Cv × P²)
                f_hat, nxt = quant.next_ar_input(si, f_hat, h_BChw)
            if on_scale is not None:
                on_scale(si, f_hat)
            if si < K - 1:
                x_next = nxt.flatten(2).transpose(1, 2)  # (B, l', Cv)
                if guided and settings.cfg_scales and si + 1 == settings.cfg_scales:
                    guided = False  # guidance stops here: the null half is dropped from every stream
                    for st in streams:
                        st.unguide(B)
    images = decode_images(tokenizer, f_hat, settings.decode_precision).cpu() if decode else None
    return SampleResult([t.cpu() for t in tokens], images, f_hat, kv_bytes)


def step_function(var, mode: str) -> Callable:
    """var.forward_step, or (mode 'default' / 'reduce-overhead') its torch.compile, made once per
    model and mode. Every scale has static shapes — its token count, the prefix it attends to, the
    preallocated cache — so each scale compiles to one graph on first use and never again; the
    compile cache is raised to hold one entry per scale (and both batch halves)."""
    if mode == "off":
        return var.forward_step
    cached = var.__dict__.setdefault("_compiled_steps", {})
    if mode not in cached:
        import torch._dynamo

        need = 4 * len(var.patch_nums)  # one graph per scale, with headroom for two batch sizes
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, need)
        cached[mode] = torch.compile(var.forward_step, mode=mode, dynamic=False)
    return cached[mode]


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def sample(var, tokenizer, labels: Sequence[int], seeds: Sequence[int], settings: SampleConfig, *,
           batch_size: Optional[int] = None, known: Optional[Sequence[torch.Tensor]] = None,
           known_mask: Optional[Sequence[torch.Tensor]] = None, decode: bool = True,
           progress: Optional[Callable[[int, int], None]] = None, refiner=None) -> SampleResult:
    """Sample N images in chunks of `batch_size` (default settings.batch_size).

    A chunk that runs out of GPU memory is retried at half the size; because every image has its
    own seed, chunking never changes an image. known / known_mask as in `sample_batch`, with N rows
    (masks may have 1). progress(done, N) after every chunk. refiner: as in `sample_batch`."""
    lab = torch.as_tensor(list(labels), dtype=torch.long)
    N = lab.numel()
    if len(seeds) != N:
        raise ValueError(f"{len(seeds)} seeds for {N} labels")
    chunk = max(1, int(batch_size or settings.batch_size))
    toks: List[List[torch.Tensor]] = []
    imgs: List[torch.Tensor] = []
    done, kv = 0, 0
    while done < N:
        end = min(N, done + chunk)
        rows = slice(done, end)
        kn = [k[rows] for k in known] if known is not None else None
        km = ([m if m.shape[0] == 1 else m[rows] for m in known_mask] if known_mask is not None else None)
        try:
            out = sample_batch(var, tokenizer, lab[rows], list(seeds[done:end]), settings, known=kn,
                               known_mask=km, decode=decode, refiner=refiner)
        except RuntimeError as e:
            if not _is_oom(e) or var.pos_1LC.device.type != "cuda":
                raise
            torch.cuda.empty_cache()
            if settings.rng == "official":  # a smaller chunk would draw other samples: say so instead
                raise UserError(f"out of GPU memory at batch {chunk} with --rng official, whose samples depend "
                                f"on the batch: choose a smaller --batch (and seed) yourself") from None
            if chunk == 1:
                raise UserError("out of GPU memory even at batch 1: use a smaller model or --device cpu") from None
            chunk = max(1, chunk // 2)
            continue
        toks.append(out.tokens)
        kv = max(kv, out.kv_bytes)
        if out.images is not None:
            imgs.append(out.images)
        done = end
        if progress is not None:
            progress(done, N)
    K = len(var.patch_nums)
    tokens = [torch.cat([t[k] for t in toks]) for k in range(K)] if toks else \
        [torch.zeros(0, p * p, dtype=torch.long) for p in var.patch_nums]
    return SampleResult(tokens, torch.cat(imgs) if imgs else None, kv_bytes=kv)
