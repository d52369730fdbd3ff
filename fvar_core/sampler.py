"""Sampling: scale-by-scale autoregressive generation with the KV cache (DESIGN §8, var-facts §2.8).

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

Seeds: every image has its own seed. Its random numbers — one uniform per token per scale, plus
VAR's gumbel noise with more_smooth — come from a CPU `torch.Generator` seeded with it, and tokens
are drawn by inverse CDF from those uniforms, so an image does not depend on the batch it shares,
on chunking or on the device (up to float rounding of the logits). The null-class half uses no
randomness. This is not the official RNG stream (one `torch.multinomial` over the whole batch), so
stochastic samples differ from the official code's for the same seed; greedy (top_k 1) and
teacher-forced runs match it (tests/test_sampler.py).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .config import SampleConfig
from .errors import UserError
from .interrupt import mark_interrupt

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
    f_hat: (N, Cv, P, P) float32 on the model's device (from `sample_batch` only)."""

    tokens: List[torch.Tensor]
    images: Optional[torch.Tensor] = None
    f_hat: Optional[torch.Tensor] = None


def decode_images(tokenizer, f_hat: torch.Tensor) -> torch.Tensor:
    """f̂ (B, Cv, P, P) → images (B, 3, H, W) float32 in [0, 1] on f̂'s device; bf16 autocast on CUDA
    (VAR decodes under its sampling autocast too)."""
    cuda = f_hat.device.type == "cuda"
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
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


def _check_labels(labels: torch.Tensor, num_classes: int) -> None:
    bad = labels[(labels < 0) | (labels > num_classes)]
    if bad.numel():
        raise UserError(f"class {int(bad[0])} out of range: the model has {num_classes} classes "
                        f"(0-{num_classes - 1}, or {num_classes} = unconditional)")


@torch.no_grad()
def sample_batch(var, tokenizer, labels: torch.Tensor, seeds: Sequence[int], settings: SampleConfig, *,
                 known: Optional[Sequence[torch.Tensor]] = None, known_mask: Optional[Sequence[torch.Tensor]] = None,
                 decode: bool = True, observe: Optional[Observer] = None) -> SampleResult:
    """Sample B images in one pass (no chunking). Both models on the same device, in eval mode.

    labels: (B,) int64, num_classes = unconditional; seeds: B ints.
    known / known_mask: K tensors (B, pn_k²) long / bool (masks may be (1, pn_k²)): where the mask
    is True the given token replaces the sampled one at that scale, in the tokens and in f̂ (and so
    in every later scale's input) — VAR's zero-shot editing (var-facts §5).
    observe: called per scale with the guided logits and the sampled tokens (before forcing).
    """
    device = var.pos_1LC.device
    quant = tokenizer.quantize
    pns, K = var.patch_nums, len(var.patch_nums)
    if tuple(quant.patch_nums) != tuple(pns):
        raise UserError(f"tokenizer patch numbers {list(quant.patch_nums)} differ from the model's {list(pns)}")
    labels = labels.to(device=device, dtype=torch.long).view(-1)
    B = labels.numel()
    if len(seeds) != B:
        raise ValueError(f"{len(seeds)} seeds for {B} labels")
    _check_labels(labels, var.num_classes)
    gens = _generators(seeds)
    # an all-unconditional batch (inpainting's default) has nothing to guide: its null half would
    # repeat the conditional one
    guided = not guidance_off(settings) and bool((labels != var.num_classes).any())
    E = quant.embedding.weight  # (V, Cv)
    Cv, P = E.shape[1], pns[-1]
    cuda = device.type == "cuda"
    # bf16 transformer on CUDA (VAR samples under autocast); CFG, softmax and sampling stay float32
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    lab = torch.cat((labels, torch.full_like(labels, var.num_classes))) if guided else labels
    cond_BD = var.class_condition(lab)  # (2B or B, C)
    cache = var.new_kv_cache(lab.numel(), device, dtype=torch.bfloat16 if cuda else torch.float32)
    f_hat = torch.zeros(B, Cv, P, P, device=device, dtype=torch.float32)
    tokens: List[torch.Tensor] = []
    # every image's uniforms for all scales drawn up front (the same numbers as per-scale draws
    # from its generator) and moved once; with more_smooth the gumbel noise follows them
    u_all = _uniforms(gens, var.seq_len, device)  # (B, L)
    if known is not None:
        known = [k.to(device) for k in known]
        known_mask = [m.to(device) for m in known_mask]
    with amp:
        x = var.first_scale_input(cond_BD)
        for si, pn in enumerate(pns):
            logits = var.forward_step(cond_BD, x, cache).float()  # (2B or B, l, V)
            if guided:
                logits = guide(logits[:B], logits[B:], si, K, settings)
            u = u_all[:, slice(*var.begin_ends[si])]
            idx, filtered = pick_tokens(logits, u, settings.top_k, settings.top_p, want_filtered=settings.more_smooth)
            if observe is not None:
                observe(si, logits, idx)
            if settings.more_smooth:  # VAR's soft code mix (visualisation only, var-facts §2.8)
                ratio, tau = smooth_ratio_tau(si, K)
                expo = torch.stack([torch.empty(pn * pn, E.shape[0]).exponential_(generator=g) for g in gens])
                gumbel = -expo.to(device).log()
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
            if si < K - 1:
                x = var.scale_input(nxt.flatten(2).transpose(1, 2), si + 1)  # (B, l', C)
                if guided:
                    x = x.repeat(2, 1, 1)
    images = decode_images(tokenizer, f_hat).cpu() if decode else None
    return SampleResult([t.cpu() for t in tokens], images, f_hat)


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def sample(var, tokenizer, labels: Sequence[int], seeds: Sequence[int], settings: SampleConfig, *,
           batch_size: Optional[int] = None, known: Optional[Sequence[torch.Tensor]] = None,
           known_mask: Optional[Sequence[torch.Tensor]] = None, decode: bool = True,
           progress: Optional[Callable[[int, int], None]] = None) -> SampleResult:
    """Sample N images in chunks of `batch_size` (default settings.batch_size).

    A chunk that runs out of GPU memory is retried at half the size; because every image has its
    own seed, chunking never changes an image. known / known_mask as in `sample_batch`, with N rows
    (masks may have 1). progress(done, N) after every chunk."""
    lab = torch.as_tensor(list(labels), dtype=torch.long)
    N = lab.numel()
    if len(seeds) != N:
        raise ValueError(f"{len(seeds)} seeds for {N} labels")
    chunk = max(1, int(batch_size or settings.batch_size))
    toks: List[List[torch.Tensor]] = []
    imgs: List[torch.Tensor] = []
    done = 0
    while done < N:
        end = min(N, done + chunk)
        rows = slice(done, end)
        kn = [k[rows] for k in known] if known is not None else None
        km = ([m if m.shape[0] == 1 else m[rows] for m in known_mask] if known_mask is not None else None)
        try:
            out = sample_batch(var, tokenizer, lab[rows], list(seeds[done:end]), settings, known=kn,
                               known_mask=km, decode=decode)
        except RuntimeError as e:
            if not _is_oom(e) or var.pos_1LC.device.type != "cuda":
                raise
            torch.cuda.empty_cache()
            if chunk == 1:
                raise UserError("out of GPU memory even at batch 1: use a smaller model or --device cpu") from None
            chunk = max(1, chunk // 2)
            continue
        toks.append(out.tokens)
        if out.images is not None:
            imgs.append(out.images)
        done = end
        if progress is not None:
            progress(done, N)
    K = len(var.patch_nums)
    tokens = [torch.cat([t[k] for t in toks]) for k in range(K)] if toks else \
        [torch.zeros(0, p * p, dtype=torch.long) for p in var.patch_nums]
    return SampleResult(tokens, torch.cat(imgs) if imgs else None)


# ------------------------------------------------------------------------------------------------
# Checkpoints → models
# ------------------------------------------------------------------------------------------------

def checkpoint_identity(ckpt) -> Dict[str, Any]:
    """What names a checkpoint in sidecars: path, weights sha256, preset, step, kind."""
    from .checkpoints import WEIGHTS_NAME
    from .hashing import file_sha256

    return {"path": str(Path(ckpt.path).resolve()), "kind": ckpt.kind,
            "sha256": file_sha256(Path(ckpt.path) / WEIGHTS_NAME), "preset": ckpt.preset.name,
            "step": ckpt.provenance.get("step")}


@dataclass
class Models:
    """A transformer with the tokenizer that decodes it, on one device, in eval mode."""

    var: Any
    tokenizer: Any
    var_ckpt: Any  # checkpoints.Checkpoint (state_dict dropped)
    tok_ckpt: Any
    device: torch.device
    identity: Dict[str, Any] = field(default_factory=dict)  # {"checkpoint": ..., "tokenizer": ...}

    @property
    def preset(self):
        return self.var_ckpt.preset


def check_pair(var_preset, tok_preset, var_path, tok_path) -> None:
    """The tokenizer must speak the transformer's tokens: same scales, vocabulary and latent width."""
    problems = []
    if tuple(var_preset.patch_nums) != tuple(tok_preset.patch_nums):
        problems.append(f"patch_nums {list(var_preset.patch_nums)} vs {list(tok_preset.patch_nums)}")
    for f in ("vocab_size", "z_channels"):
        a, b = getattr(var_preset.tokenizer, f), getattr(tok_preset.tokenizer, f)
        if a != b:
            problems.append(f"{f} {a} vs {b}")
    if problems:
        raise UserError(f"tokenizer {tok_path} does not fit transformer {var_path}: " + "; ".join(problems))


def load_models(var_ckpt: PathLike, tokenizer: Optional[PathLike] = None, device=None) -> Models:
    """Load a var checkpoint (or run directory) and its tokenizer (runs.find_tokenizer's rule, or
    `tokenizer`), check they fit, move both to `device` (default: CUDA if available) in eval mode."""
    from .checkpoints import build_tokenizer, build_var, load_checkpoint
    from .devices import pick_device
    from .runs import find_tokenizer, resolve_checkpoint

    dev = device if isinstance(device, torch.device) else pick_device(device or "auto")
    ck = load_checkpoint(resolve_checkpoint(var_ckpt, "--ckpt"), expect_kind="var")
    tok_path = find_tokenizer(ck.path, ck.provenance, tokenizer)
    tk = load_checkpoint(tok_path, expect_kind="tokenizer")
    check_pair(ck.preset, tk.preset, ck.path, tk.path)
    var = build_var(ck).to(dev).eval()
    tok = build_tokenizer(tk).to(dev).eval()
    identity = {"checkpoint": checkpoint_identity(ck), "tokenizer": checkpoint_identity(tk)}
    ck.state_dict, tk.state_dict = {}, {}  # the models hold the weights now
    return Models(var, tok, ck, tk, dev, identity)


# ------------------------------------------------------------------------------------------------
# Class names
# ------------------------------------------------------------------------------------------------

CLASS_INDEX_NAME = "classes.json"


def class_names_for(ckpt_dir: PathLike) -> Optional[List[str]]:
    """The run's class names: `classes.json` in the checkpoint directory, else in its run directory
    (two levels up: <run>/checkpoints/step-N); None when neither has one."""
    from .data import read_class_index

    d = Path(ckpt_dir)
    for cand in (d / CLASS_INDEX_NAME, d.parent.parent / CLASS_INDEX_NAME):
        if cand.is_file():
            return read_class_index(cand)
    return None


def parse_classes(spec: str, num_classes: int) -> List[int]:
    """'207', '1,207,388', '0-9', '0-3,7' or 'uncond' (the null class) → class ids, in order."""
    out: List[int] = []
    for part in (p.strip() for p in str(spec).split(",")):
        if part.lower() in ("uncond", "null", "none"):
            out.append(num_classes)
            continue
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part) or re.fullmatch(r"(\d+)", part)
        if not m:
            raise UserError(f"--class {spec!r}: expected ids like 207, 1,207,388 or 0-9 (or 'uncond')")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.lastindex == 2 else lo
        if hi < lo:
            raise UserError(f"--class {part}: empty range")
        if hi >= num_classes:
            raise UserError(f"class {hi} out of range: the model has {num_classes} classes "
                            f"(0-{num_classes - 1}, or 'uncond')")
        out.extend(range(lo, hi + 1))
    if not out:
        raise UserError("--class: no class given")
    return out


def slug(name: str, limit: int = 40) -> str:
    """A file-name-safe form of a class name ('tench, Tinca tinca' → 'tench-Tinca-tinca')."""
    s = re.sub(r"[^A-Za-z0-9_]+", "-", name).strip("-")
    return s[:limit].rstrip("-") or "class"


# ------------------------------------------------------------------------------------------------
# Grids and token files
# ------------------------------------------------------------------------------------------------

def make_grid(images: torch.Tensor, cols: int, pad: int = 2, fill: float = 1.0) -> torch.Tensor:
    """(N, 3, H, W) → (3, rows·(H+pad)+pad, cols·(W+pad)+pad), row-major, white padding."""
    N, C, H, W = images.shape
    cols = max(1, min(cols, N))
    rows = math.ceil(N / cols)
    grid = torch.full((C, rows * (H + pad) + pad, cols * (W + pad) + pad), fill, dtype=images.dtype)
    for i in range(N):
        r, c = divmod(i, cols)
        y, x = pad + r * (H + pad), pad + c * (W + pad)
        grid[:, y:y + H, x:x + W] = images[i]
    return grid


def save_tokens(path: PathLike, tokens: Sequence[torch.Tensor], labels: Sequence[int], seeds: Sequence[int],
                patch_nums: Sequence[int]) -> None:
    """Per-scale tokens as .npz (atomically): tokens_k (N, pn_k²) int64, labels, seeds, patch_nums."""
    import io

    import numpy as np

    from .atomic import atomic_write_bytes

    arrays = {f"tokens_{k}": t.cpu().numpy().astype(np.int64) for k, t in enumerate(tokens)}
    arrays.update(labels=np.asarray(labels, dtype=np.int64), seeds=np.asarray(seeds, dtype=np.int64),
                  patch_nums=np.asarray(patch_nums, dtype=np.int64))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(Path(path), buf.getvalue())


def write_json(path: PathLike, doc: Dict[str, Any]) -> None:
    from .atomic import atomic_write_bytes

    atomic_write_bytes(Path(path), (json.dumps(doc, indent=2) + "\n").encode())


# ------------------------------------------------------------------------------------------------
# Resumable folder generation (fvar eval)
# ------------------------------------------------------------------------------------------------

def progress_bar(total: int, initial: int = 0, enabled: bool = True):
    """(update(done), close()) over a rich bar on stderr, or no-ops."""
    if not enabled:
        return (lambda done: None), (lambda: None)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    bar = Progress(TextColumn("sampling"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn(), console=Console(stderr=True), transient=True)
    task = bar.add_task("sampling", total=total, completed=initial)
    bar.start()
    return (lambda done: bar.update(task, completed=done)), bar.stop


def generate_to_folder(var_ckpt: Path, out_dir: Path, labels: Sequence[int], seeds: Sequence[int],
                       settings: SampleConfig, *, batch_size: int = 32, tokenizer: Optional[Path] = None,
                       device: Optional[str] = None, progress: bool = True) -> List[Path]:
    """Image i (label labels[i], seed seeds[i]) → out_dir/{i:06d}.png, written atomically.

    Images already present are skipped, so a killed run resumes where it stopped (a PNG exists
    only once complete). Models are loaded only if something is missing. Returns all N paths."""
    out_dir = Path(out_dir)
    labels, seeds = [int(x) for x in labels], [int(x) for x in seeds]
    if len(labels) != len(seeds):
        raise UserError(f"{len(labels)} labels but {len(seeds)} seeds")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{i:06d}.png" for i in range(len(labels))]
    todo = [i for i, p in enumerate(paths) if not p.is_file()]
    if not todo:
        return paths
    from .images import save_png

    models = load_models(var_ckpt, tokenizer, device)
    _check_labels(torch.as_tensor(labels), models.var.num_classes)
    step = max(1, int(batch_size))
    update, close = progress_bar(len(paths), len(paths) - len(todo), progress)
    try:
        done = len(paths) - len(todo)
        for s in range(0, len(todo), step):
            part = todo[s:s + step]
            res = sample(models.var, models.tokenizer, [labels[i] for i in part], [seeds[i] for i in part],
                         settings, batch_size=step)
            for i, img in zip(part, res.images):
                save_png(img, paths[i])
            done += len(part)
            update(done)
    except KeyboardInterrupt as e:
        mark_interrupt(e, f"after {done} of {len(paths)} images in {out_dir} (finished images are kept and skipped "
                          f"on a rerun)")
        raise
    finally:
        close()
    return paths


# ------------------------------------------------------------------------------------------------
# `fvar sample`: a folder of images, a grid, a sidecar
# ------------------------------------------------------------------------------------------------

SEED_RULE = "image i (0-based, classes in the order given, n per class) has seed seed + i"


@dataclass
class SampleRun:
    """What `sample_to_dir` wrote."""

    out: Path
    files: List[Path]
    grid: Path
    sidecar: Path
    tokens: Optional[Path]
    seconds: float


def _class_label(c: int, num_classes: int, names: Optional[List[str]]) -> tuple[str, Optional[str]]:
    """(file-name part, class name or None) of class id c."""
    if c == num_classes:
        return "uncond", None
    name = names[c] if names is not None and c < len(names) else None
    return (f"class{c:04d}-{slug(name)}" if name else f"class{c:04d}"), name


GRID_MAX = 256  # grid.png shows at most this many images (the first ones)


def sample_to_dir(models: Models, classes: Sequence[int], n: int, seed: int, settings: SampleConfig,
                  out_dir: PathLike, *, batch_size: Optional[int] = None, tokens_file: Optional[PathLike] = None,
                  progress: Optional[Callable[[int, int], None]] = None) -> SampleRun:
    """n images of each class → out_dir: one PNG per image (written as each chunk is done, so
    memory does not grow with N and a kill keeps the finished ones), grid.png (the first
    GRID_MAX; one row per class when n ≤ 16), samples.json (every setting, checkpoint and
    tokenizer identity, per-image class and seed), and optionally the per-scale tokens as .npz.
    Seeds: SEED_RULE. Output paths are checked before anything is sampled."""
    import time

    from .atomic import ensure_dir
    from .images import save_png

    out_dir = ensure_dir(Path(out_dir), "--out")
    tok_path = Path(tokens_file) if tokens_file is not None else None
    if tok_path is not None:
        if tok_path.is_dir():
            raise UserError(f"--save-tokens {tok_path} is a folder; give the .npz file to write")
        ensure_dir(tok_path.parent, "--save-tokens folder")
    num_classes = models.var.num_classes
    names = class_names_for(models.var_ckpt.path)
    labels = [int(c) for c in classes for _ in range(n)]
    seeds = [seed + i for i in range(len(labels))]
    if seeds and seeds[-1] >= 2 ** 63:
        raise UserError(f"--seed {seed}: seed + {len(labels) - 1} exceeds 2^63 - 1")
    _check_labels(torch.as_tensor(labels), num_classes)

    chunk = max(1, int(batch_size or settings.batch_size))
    files, entries, token_parts, shown = [], [], [], []
    t0 = time.perf_counter()
    try:
        for lo in range(0, len(labels), chunk):
            hi = min(len(labels), lo + chunk)
            res = sample(models.var, models.tokenizer, labels[lo:hi], seeds[lo:hi], settings, batch_size=chunk)
            for i, img in zip(range(lo, hi), res.images):
                part, name = _class_label(labels[i], num_classes, names)
                path = out_dir / f"{i:04d}-{part}.png"
                save_png(img, path)
                files.append(path)
                entries.append({"file": path.name, "index": i, "class": labels[i], "class_name": name,
                                "unconditional": labels[i] == num_classes, "seed": seeds[i]})
            token_parts.append(res.tokens)
            shown.extend(res.images[:max(0, GRID_MAX - len(shown))])
            if progress is not None:
                progress(hi, len(labels))
    except KeyboardInterrupt as e:
        mark_interrupt(e, f"after {len(files)} of {len(labels)} images in {out_dir} (a rerun draws them again, "
                          f"identically: every image has its own seed)")
        raise
    seconds = time.perf_counter() - t0

    cols = n if (len(classes) > 1 and n <= 16) else math.ceil(math.sqrt(len(shown)))
    grid = out_dir / "grid.png"
    save_png(make_grid(torch.stack(shown), cols), grid)
    if tok_path is not None:
        tokens = [torch.cat([t[k] for t in token_parts]) for k in range(len(models.var.patch_nums))]
        save_tokens(tok_path, tokens, labels, seeds, models.var.patch_nums)
    sidecar = out_dir / "samples.json"
    write_json(sidecar, {
        "format": "fvar-samples", "version": 1,
        "checkpoint": models.identity["checkpoint"], "tokenizer": models.identity["tokenizer"],
        "settings": {**settings.model_dump(mode="json"), "seed": seed, "n_per_class": n,
                     "classes": [int(c) for c in classes], "batch_size": chunk, "device": str(models.device)},
        "seed_rule": SEED_RULE, "resolution": models.preset.resolution,
        "patch_nums": list(models.var.patch_nums), "grid": grid.name, "grid_images": len(shown),
        "tokens": str(tok_path) if tok_path else None, "seconds": round(seconds, 3), "images": entries})
    return SampleRun(out_dir, files, grid, sidecar, tok_path, seconds)
