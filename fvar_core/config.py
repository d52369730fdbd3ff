"""The whole configuration of a run, as strict pydantic models.

Config flows one way: preset YAML (`presets.py` resolves `extends:` and `--set`) → `Preset` here →
constructors that take the sub-config they need. Unknown keys are errors, ranges are checked, and
rules that span fields (resolution = tokenizer downsampling × last patch number, heads divide
width, ...) are checked in `Preset`.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Literal, Optional, Tuple, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    # allow_inf_nan=False: `--set train.lr=.inf` (or nan) is a typo to refuse, never a value to train with
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class PyramidConfig(_Strict):
    """How the focus pyramid (paper §3.1–3.2, docs/design.md §4) builds the view of each scale."""

    kernel: Literal["disk", "gaussian", "box", "area"] = Field(
        "disk", description="defocus PSF; 'area' = no refocusing (VAR's plain area pyramid)")
    schedule: Literal["cosine", "matched", "linear"] = Field(
        "cosine", description="radius per scale: cosine (Eq. 2, corrected to decrease), matched, linear")
    rho_max: float = Field(12.0, ge=0.0, le=512.0, description="radius of the first (coarsest) scale")
    space: Literal["pixel", "latent"] = Field(
        "pixel", description="where the PSF acts: image pixels (default) or latent grid cells")
    noise: bool = Field(False, description="add beta_k * eps to the focus views L_k (Eq. 3)")
    beta_start: float = Field(1e-3, ge=0.0, le=1.0)
    beta_end: float = Field(1e-2, ge=0.0, le=1.0)


class TokenizerConfig(_Strict):
    """Dual-path multi-scale VQ-VAE; the defaults are VAR's released architecture."""

    vocab_size: int = Field(8192, ge=2, le=1 << 20, description="structure codebook entries")
    alias_vocab_size: int = Field(512, ge=0, le=1 << 20, description="alias codebook entries; 0 = none")
    shared_codebook: bool = Field(False, description="code alias residuals with the structure codebook")
    z_channels: int = Field(32, ge=1, le=4096)
    ch: int = Field(160, ge=32, le=4096)
    ch_mult: tuple[int, ...] = Field((1, 1, 2, 2, 4), min_length=1, max_length=8)
    num_res_blocks: int = Field(2, ge=1, le=16)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    beta: float = Field(0.25, ge=0.0, description="commitment weight")
    quant_resi: float = Field(0.5, ge=-1.0, le=1.0, description="phi(h) = (1-r) h + r conv(h)")
    share_quant_resi: int = Field(4, ge=0, le=64, description="number of shared phi convs (0 = one per scale)")
    phi_index: Optional[tuple[int, ...]] = Field(
        None, description="phi conv used by each scale; default: VAR's table for the scale count")

    def check_phi_index(self, num_scales: int) -> None:
        """phi_index, when set, names one of the φ convs (share_quant_resi of them, or one per scale)
        for each of `num_scales` scales; ValueError otherwise."""
        phi = self.phi_index
        if phi is None:
            return
        if len(phi) != num_scales:
            raise ValueError(f"tokenizer.phi_index has {len(phi)} entries for {num_scales} scales")
        n_phi = self.share_quant_resi or num_scales
        if any(not 0 <= i < n_phi for i in phi):
            raise ValueError(f"tokenizer.phi_index entries must lie in [0, {n_phi})")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def alias_tokens(self) -> int:
        """Distinct alias token values (the teacher's alias vocabulary): the structure codebook's
        size with shared_codebook (the "shared tokenizer" ablation), else alias_vocab_size; 0 = none."""
        return self.vocab_size if self.shared_codebook else self.alias_vocab_size

    @field_validator("ch_mult")
    @classmethod
    def _positive(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(m < 1 for m in v):
            raise ValueError("every channel multiplier must be >= 1")
        return v

    @model_validator(mode="after")
    def _groupnorm_channels(self) -> "TokenizerConfig":
        # GroupNorm(32, C) everywhere in VAR's VQ-VAE: every channel count must split into 32 groups.
        bad = [self.ch * m for m in self.ch_mult if (self.ch * m) % 32]
        if bad:
            raise ValueError(f"ch × ch_mult must be multiples of 32 (GroupNorm), got {bad}")
        if self.shared_codebook and self.alias_vocab_size:
            raise ValueError("shared_codebook codes alias residuals with the structure codebook: "
                             "set alias_vocab_size to 0")
        return self


class ModelConfig(_Strict):
    """VAR transformer (the student); width = 64·depth, heads = depth in VAR's mapping."""

    depth: int = Field(16, ge=1, le=128)
    width: int = Field(1024, ge=8, le=16384)
    num_heads: int = Field(16, ge=1, le=256)
    mlp_ratio: float = Field(4.0, gt=0.0, le=16.0)
    drop_path: float = Field(0.1 * 16 / 24, ge=0.0, lt=1.0)
    drop_rate: float = Field(0.0, ge=0.0, lt=1.0)
    attn_drop: float = Field(0.0, ge=0.0, lt=1.0)
    attn_l2_norm: bool = True
    shared_aln: bool = False
    num_classes: int = Field(1000, ge=1, le=1_000_000)
    cond_drop: float = Field(0.1, ge=0.0, le=1.0, description="label dropout for CFG (training mode only)")
    norm_eps: float = Field(1e-6, gt=0.0, le=1e-2)
    init_std: Optional[float] = Field(None, gt=0.0, description="None: VAR's sqrt(1 / (3 width))")
    init_head: float = Field(0.02, ge=0.0)
    init_adaln: float = Field(0.5, ge=0.0)
    init_adaln_gamma: float = Field(1e-5, ge=0.0)

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "ModelConfig":
        if self.width % self.num_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must divide width ({self.width})")
        return self


class TeacherConfig(_Strict):
    """High-frequency residual teacher and online distillation (paper §3.3, §3.5–3.6, docs/design.md §6)."""

    enabled: bool = Field(True, description="false = the 'w/o High-Freq Teacher' ablation")
    xattn_blocks: int = Field(2, ge=1, le=128, description="M: AG-XAttn in the last M blocks")
    alias_visibility: Literal["causal", "same", "all"] = Field(
        "causal", description="queries of scale k see alias tokens of scales <= k (causal), == k, or all")
    lambda_feat: float = Field(1.0, ge=0.0)
    lambda_logit: float = Field(0.5, ge=0.0)
    feat_blocks: int = Field(2, ge=1, le=128, description="feature alignment on the last N blocks")
    kd_temperature: float = Field(1.0, gt=0.0)
    teacher_ce: bool = Field(True, description="the teacher's own CE (Eq. 12 omits it; without it it never learns)")


class LoopConfig(_Strict):
    """What the one training loop (`train.loop.fit`) reads: optimiser, lr schedule, precision,
    logging and checkpoints. Each mode's section extends it with its own defaults.

    lr: the peak lr (`peak_lr`); warm-up linear from warmup_start·peak over `warmup_steps`, then
    lr_schedule: 'constant', or 'lin0' (VAR's `lr_wd_annealing`: flat for the first 5% of the
    remaining steps, then linear to lr_end·peak at the last step). Weight decay: cosine from
    weight_decay to weight_decay_end.
    """

    steps: int = Field(100_000, ge=1)
    batch_size: int = Field(256, ge=1, description="global batch")
    lr: float = Field(1e-4, gt=0.0)
    lr_schedule: Literal["constant", "lin0"] = Field(
        "constant", description="after warm-up: constant, or lin0 (flat 5%, then linear to lr_end × peak)")
    lr_end: float = Field(0.01, ge=0.0, le=1.0, description="lin0 decay ends at this × peak")
    warmup_frac: float = Field(0.01, ge=0.0, lt=1.0, description="fraction of the steps spent warming up")
    warmup_max_steps: Optional[int] = Field(1000, ge=0, description="cap on the warm-up steps; null = none")
    warmup_start: float = Field(0.1, ge=0.0, le=1.0, description="warm-up starts at this × peak")
    weight_decay: float = Field(0.0, ge=0.0)
    weight_decay_end: float = Field(0.0, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(2.0, ge=0.0, description="0 = off")
    grad_accum: int = Field(1, ge=1)
    precision: Literal["bf16", "fp16", "fp32"] = Field("bf16", description="autocast on CUDA")
    cpu_bf16: bool = Field(False, description="bf16 autocast on CPU too (fp32 weights; ~1.6x faster on CPUs with "
                                              "AVX512-BF16); off: the CPU path stays the exact fp32 reference")
    seed: int = Field(0, ge=0)
    log_every: int = Field(50, ge=1)
    ckpt_every: int = Field(5000, ge=1)
    keep_last: int = Field(3, ge=1)
    sample_every: int = Field(5000, ge=0, description="0 = no sample grids")
    log_with: Optional[Literal["tensorboard", "wandb", "all"]] = Field(
        None, description="experiment trackers fed with metrics.jsonl's numbers and the sample grids")
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="with more than one process: ddp (replicated weights) or fsdp (weights, gradients and "
                           "optimiser state sharded over the processes: torch FSDP2, train.sharding)")

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError("betas must lie in [0, 1)")
        return v

    @property
    def peak_lr(self) -> float:
        return float(self.lr)

    @property
    def warmup_steps(self) -> int:
        n = round(self.warmup_frac * self.steps)
        return n if self.warmup_max_steps is None else min(n, self.warmup_max_steps)

    def lr_at(self, it: int) -> float:
        """lr of optimiser step `it` (0-based); see the class docstring."""
        peak, warm = self.peak_lr, self.warmup_steps
        if it < warm:
            return peak * (self.warmup_start + (1 - self.warmup_start) * it / warm)
        if self.lr_schedule == "constant":
            return peak
        rest = max(self.steps - 1 - warm, 1)  # the last step (steps − 1) ends at lr_end
        t = (it - warm) / rest
        if t < 0.05:
            return peak
        frac = min((t - 0.05) / 0.95, 1.0)
        return peak * (1 + (self.lr_end - 1) * frac)

    def wd_at(self, it: int) -> float:
        """Weight decay of step `it`: cosine from weight_decay to weight_decay_end (docs/var-compat.md §3.3)."""
        t = min(it / max(self.steps - 1, 1), 1.0)
        return self.weight_decay_end + (self.weight_decay - self.weight_decay_end) * (1 + math.cos(math.pi * t)) / 2


class TrainConfig(LoopConfig):
    """Transformer training (VAR's recipe shape, the paper's numbers)."""

    steps: int = Field(400_000, ge=1)
    lr: float = Field(1e-4, gt=0.0, description="base lr per 256 images; peak = lr · batch_size / 256")
    lr_schedule: Literal["constant", "lin0"] = Field("lin0", description="VAR's: flat 5%, then linear to lr_end")
    warmup_frac: float = Field(0.02, ge=0.0, lt=1.0, description="VAR: ep/50 epochs of warm-up")
    warmup_max_steps: Optional[int] = Field(None, ge=0, description="cap on the warm-up steps; null = none")
    warmup_start: float = Field(0.005, ge=0.0, le=1.0, description="warm-up starts at this × peak")
    weight_decay: float = Field(0.05, ge=0.0)
    weight_decay_end: float = Field(0.05, ge=0.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    activation_checkpointing: Literal["auto", "off", "pointwise", "full"] = Field(
        "auto", description="recompute in the backward pass: 'pointwise' the blocks' elementwise ops (matmul and "
                            "attention outputs kept: no FLOPs repeated), 'full' whole blocks; auto = pointwise "
                            "on the CPU unless compiled, off on GPUs (true/false still mean full/off)")
    compile: Union[bool, Literal["auto"]] = Field(
        "auto", description="whole-model torch.compile of the training step; auto = on for CUDA")

    @field_validator("activation_checkpointing", mode="before")
    @classmethod
    def _checkpointing_from_bool(cls, v: Any) -> Any:
        return {True: "full", False: "off"}.get(v, v) if isinstance(v, bool) else v

    def compile_on(self, device: Any) -> bool:
        """Whether the step is compiled on this device (auto: CUDA only — measured in benchmarks/RESULTS.md)."""
        return self.compile is True or (self.compile == "auto" and str(device).startswith("cuda"))

    def checkpointing_on(self, device: Any) -> str:
        """The activation-checkpointing mode in effect: off, pointwise or full. auto: pointwise on
        the CPU when eager (measured: about half the step's memory at the same speed, benchmarks/
        RESULTS.md); off when compiled (inductor chooses what to recompute) and off on GPUs, where the
        selective-recompute hooks would hide FlexAttention's compiled kernel — until measured there."""
        if self.activation_checkpointing != "auto":
            return self.activation_checkpointing
        return "pointwise" if str(device) == "cpu" and not self.compile_on(device) else "off"

    @property
    def peak_lr(self) -> float:
        return self.lr * self.batch_size / 256  # VAR's tblr: lr is per 256 images


class TokenizerTrainConfig(LoopConfig):
    """Dual tokenizer training (paper §4.2: 100K steps before the transformer); the loop's
    defaults: a 1% warm-up (at most 1000 steps) from 0.1 × lr, then a constant lr, no weight decay."""

    l1_weight: float = Field(1.0, ge=0.0)
    l2_weight: float = Field(1.0, ge=0.0)
    vq_weight: float = Field(1.0, ge=0.0)
    alias_weight: float = Field(1.0, ge=0.0, description="weight of the alias codebook's VQ loss")
    perceptual_weight: float = Field(1.0, ge=0.0, description="used only when LPIPS weights are given")
    adversarial_weight: float = Field(0.1, ge=0.0, description="used only when the discriminator is on (--disc)")
    disc_start: int = Field(0, ge=0, description="optimiser step from which the adversarial terms count")
    disc_ch: int = Field(64, ge=8, le=1024, description="PatchGAN width")
    disc_layers: int = Field(3, ge=1, le=6, description="PatchGAN stride-2 layers")
    disc_adaptive: bool = Field(True, description="VQGAN's adaptive weight on the generator term")
    dead_code_every: int = Field(1000, ge=0, description="restart unused codes every N steps; 0 = off")
    focus_grad: bool = Field(True, description="backpropagate the commitment loss through the blurred views' "
                                               "encodes; false treats their latents as constants (no backward)")


class DataConfig(_Strict):
    """Image loading: VAR's shorter-side resize to mid_reso × resolution, then a crop."""

    mid_reso: float = Field(1.125, ge=1.0, le=4.0)
    hflip: bool = False
    num_workers: int = Field(4, ge=0, le=256)


class SampleConfig(_Strict):
    """Sampling defaults (VAR's README: cfg 1.5, top-k 900, top-p 0.96)."""

    cfg: float = Field(1.5, ge=0.0)
    cfg_mode: Literal["var", "standard"] = Field(
        "var", description="var: (1+t)·cond − t·uncond; standard: uncond + t·(cond − uncond)")
    cfg_schedule: Literal["linear", "constant"] = Field("linear", description="VAR ramps t = cfg·k/(K−1)")
    top_k: int = Field(900, ge=0, description="0 = off")
    top_p: float = Field(0.96, ge=0.0, le=1.0, description="0 = off")
    more_smooth: bool = False
    rng: Literal["per-image", "official"] = Field(
        "per-image", description="per-image: each image from its own seed (independent of the batch); official: "
                                 "one generator per batch, consumed as VAR's autoregressive_infer_cfg does")
    compile: Literal["off", "default", "reduce-overhead"] = Field(
        "off", description="torch.compile the per-scale transformer step (one static graph per scale); "
                           "reduce-overhead adds CUDA graphs on GPUs")
    batch_size: int = Field(64, ge=1)
    # Training-free speed-ups (docs/sampling-speed.md), all off by default; each changes tokens only
    # from the scale it starts at.
    cfg_scales: int = Field(0, ge=0, description="guide only the first N scales, then drop the null half "
                                                 "of the batch; 0 = every scale")
    prune: Dict[int, float] = Field(default_factory=dict, description="patch number → share of that scale's "
                                    "tokens not run through the transformer (filled from the previous scale)")
    refine_from: int = Field(0, ge=0, description="draft and refine: the refiner model samples from this scale "
                                                  "on; 0 = off")
    kv_budget: Optional[Tuple[int, int]] = Field(None, description="(first, recent): each scale attends only to "
                                                 "the first scales and the most recent ones; None = all")
    decode_precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="the VQ-VAE decode: auto = bf16 on CUDA (as VAR), fp32 elsewhere")

    @field_validator("prune")
    @classmethod
    def _ratios(cls, v: Dict[int, float]) -> Dict[int, float]:
        for pn, r in v.items():
            if not 0.0 <= r < 1.0:
                raise ValueError(f"prune ratio for scale {pn} must be in [0, 1), got {r}")
        return {int(pn): float(r) for pn, r in sorted(v.items()) if r > 0}

    @field_validator("kv_budget")
    @classmethod
    def _budget(cls, v):
        if v is not None and (v[0] < 1 or v[1] < 0):
            raise ValueError(f"kv budget (first, recent) needs first ≥ 1 and recent ≥ 0, got {tuple(v)}")
        return v


class Preset(_Strict):
    """A complete, validated configuration: what a run directory and a checkpoint carry."""

    name: str = Field(..., min_length=1)
    description: str = ""
    resolution: int = Field(256, ge=8, le=8192)
    patch_nums: tuple[int, ...] = Field((1, 2, 3, 4, 5, 6, 8, 10, 13, 16), min_length=2, max_length=64)
    pyramid: PyramidConfig = PyramidConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    model: ModelConfig = ModelConfig()
    teacher: TeacherConfig = TeacherConfig()
    train: TrainConfig = TrainConfig()
    tokenizer_train: TokenizerTrainConfig = TokenizerTrainConfig()
    data: DataConfig = DataConfig()
    sample: SampleConfig = SampleConfig()

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    @property
    def seq_len(self) -> int:
        """Tokens per image over all scales (680 for VAR's 256px schedule)."""
        return sum(p * p for p in self.patch_nums)

    @property
    def patch_size(self) -> int:
        """Image pixels per latent cell (16 for VAR's tokenizer)."""
        return self.tokenizer.downsample

    @field_validator("patch_nums")
    @classmethod
    def _increasing(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if v[0] < 1 or any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError(f"must be positive and strictly increasing, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _cross_field(self) -> "Preset":
        down = self.tokenizer.downsample
        if self.resolution != down * self.patch_nums[-1]:
            raise ValueError(
                f"resolution ({self.resolution}) must equal the tokenizer's downsampling ({down}) × the last "
                f"patch number ({self.patch_nums[-1]}) = {down * self.patch_nums[-1]}")
        self.tokenizer.check_phi_index(self.num_scales)
        if self.teacher.enabled and self.teacher.xattn_blocks > self.model.depth:
            raise ValueError(f"teacher.xattn_blocks ({self.teacher.xattn_blocks}) exceeds model.depth "
                             f"({self.model.depth})")
        if self.teacher.feat_blocks > self.model.depth:
            raise ValueError(f"teacher.feat_blocks ({self.teacher.feat_blocks}) exceeds model.depth "
                             f"({self.model.depth})")
        if self.teacher.enabled and not self.tokenizer.alias_vocab_size and not self.tokenizer.shared_codebook:
            raise ValueError("teacher.enabled needs alias tokens: set tokenizer.alias_vocab_size > 0 or "
                             "tokenizer.shared_codebook, or teacher.enabled false")
        return self
