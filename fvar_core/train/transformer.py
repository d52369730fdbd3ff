"""Transformer training — alone (`fvar train`) or distilled online from the teacher (`fvar distill`) —
as tasks of the one loop (`train.loop.fit`, docs/design.md §6–7).

Data: token shards (`fvar tokenize`, the fast path: no VAE in the step) or an image folder encoded
on the fly by the frozen tokenizer (VAR's way, with random crops). Per step, on B items:

    x_in      = tokenizer.quantize.idx_to_var_input(tokens)        (B, L − pn_0², Cz), no gradient
    train     loss = CE(student(label, x_in), tokens)               plain mean over all B·L tokens
    distill   labels dropped once for both networks (same null labels), then
              loss = CE_stu + CE_tea + λ_feat·Σ‖F_stu − sg(F_tea)‖² + λ_logit·KL(p_tea ‖ p_stu)
              (`distill.distill_loss`; computed without full logits by `head_loss.head_losses`);
              the teacher reads the alias tokens through AG-XAttn.

The checkpoint of either mode is the student alone (kind "var": official VAR keys), so every run's
checkpoint samples and exports like a VAR checkpoint. A distillation run keeps the teacher's
weights in the checkpoint's training state (for resume); `--save-teacher` also writes the teacher
as a checkpoint of its own at the end. The tokenizer is copied once into <run>/tokenizer and each
checkpoint's provenance points at it (relative path + weights hash, see `runs.find_tokenizer`).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from fvar_core.checks import check_labels, check_tokenizer_fits
from fvar_core.config import Preset
from fvar_core.errors import UserError
from fvar_core.checkpoints import CONFIG_NAME, WEIGHTS_NAME, card_for, load_checkpoint, load_strict, save_checkpoint
from fvar_core.modelcard import CARD_NAME
from fvar_core.data.folders import check_folder, write_class_index, write_skipped
from fvar_core.data.images import save_png
from fvar_core.hashing import file_sha256, tensors_sha256
from fvar_core.models.loading import build_tokenizer
from fvar_core.models.teacher import Teacher
from fvar_core.models.transformer import VAR
from fvar_core.runs import CLASS_INDEX, SKIPPED_FILES, check_run_dir, data_identity, resolve_checkpoint
from fvar_core.sample.sampler import sample
from fvar_core.train.distill import feature_alignment
from fvar_core.train.head_loss import head_losses, loss_parts
from fvar_core.train.loop import fit
from fvar_core.data.shards import TokenShards

# VAR's no-weight-decay rule (docs/var-compat.md §3.3): 1-D parameters, biases, and these names.
NO_DECAY_NAMES = ("cls_token", "start_token", "task_token", "cfg_uncond", "pos_embed", "pos_1LC", "pos_start",
                  "start_pos", "lvl_embed", "gamma", "beta", "ada_gss", "moe_bias", "scale_mul")
# The teacher's own positions/levels follow the same rule.
NO_DECAY_NAMES_TEACHER = ("alias_pos_1LC", "alias_lvl_embed")
TOKENIZER_DIR = "tokenizer"
_MORE_CLASSES = "use a preset with more classes (--set model.num_classes=N)"
TEACHER_DIR = "teacher"


def var_param_groups(model: nn.Module) -> List[Dict[str, Any]]:
    """AdamW groups with VAR's rule: decay on weights of Linear/Embedding layers only."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        skip = p.ndim <= 1 or name.endswith("bias") or any(n in name for n in NO_DECAY_NAMES + NO_DECAY_NAMES_TEACHER)
        (no_decay if skip else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": False}]


# ------------------------------------------------------------------------------------------ data
class ShardItems(torch.utils.data.Dataset):
    """Token shards as training items (structure (L,), alias (L,) or (0,), label).

    Shards written with `--flip` hold each image twice (item 2j, its mirror 2j+1); with the
    preset's `data.hflip` one of the pair is picked per (seed, epoch, image), VAR-style random
    flips without the VAE; without it only the unflipped item is used.
    """

    def __init__(self, shards: Any, hflip: bool, seed: int):
        self.shards, self.seed = shards, seed
        self.variants = int(shards.manifest.get("variants", 1))
        self.hflip = hflip and self.variants == 2
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.shards) // self.variants

    def __getitem__(self, i: int):
        j = i * self.variants
        if self.hflip:
            j += int(np.random.SeedSequence([self.seed, self.epoch, i, 0xF11B]).generate_state(1)[0] & 1)
        structure, alias, label = self.shards[j]
        return structure, (alias if alias is not None else torch.zeros(0, dtype=torch.long)), label


# ------------------------------------------------------------------------------------ the models
class StudentTeacher(nn.Module):
    """Student and teacher under one root, so one optimiser / DDP wrapper holds both; forward runs
    both on the same (already dropped) labels."""

    def __init__(self, student: nn.Module, teacher: nn.Module, feat_blocks: int):
        super().__init__()
        self.student, self.teacher, self.feat_blocks = student, teacher, feat_blocks

    def forward(self, label_B: torch.Tensor, x_in: torch.Tensor, alias_BL: torch.Tensor, head: bool = True):
        """-> (student out, student features, teacher out, teacher features); out = logits, or with
        head=False the head's input (`VAR.forward`)."""
        label_B = self.student.drop_labels(label_B) if self.training else label_B
        s_out, s_feats = self.student(label_B, x_in, return_features=self.feat_blocks, label_dropout=False,
                                      head=head)
        t_out, t_feats = self.teacher(label_B, x_in, alias_BL, return_features=self.feat_blocks,
                                      label_dropout=False, head=head)
        return s_out, s_feats, t_out, t_feats


def check_shards_fit(preset: Preset, shards: Any, distill: bool) -> None:
    """Vocabulary, scales and classes of token shards against the preset (one line each)."""
    m = shards.manifest
    where = f"token shards {shards.dir}"
    if list(m["patch_nums"]) != list(preset.patch_nums):
        raise UserError(f"{where} have patch_nums {list(m['patch_nums'])}, preset {preset.name} "
                        f"{list(preset.patch_nums)}")
    if int(m["vocab_size"]) != preset.tokenizer.vocab_size:
        raise UserError(f"{where} use a vocabulary of {m['vocab_size']} codes, preset {preset.name} "
                        f"{preset.tokenizer.vocab_size} (tokenizer.vocab_size)")
    if int(m["alias_vocab_size"]) != preset.tokenizer.alias_tokens:
        raise UserError(f"{where} have an alias vocabulary of {m['alias_vocab_size']}, preset {preset.name} "
                        f"{preset.tokenizer.alias_tokens} (tokenizer.alias_vocab_size / shared_codebook)")
    made = (m.get("preset_config") or {}).get("pyramid")
    if made is not None:
        mine = preset.pyramid.model_dump(mode="json")
        diff = [k for k in mine if made.get(k) != mine[k]]
        if diff:
            k = diff[0]
            raise UserError(f"{where} were encoded with pyramid.{k} {made.get(k)}, preset {preset.name} says {mine[k]}: "
                            f"tokens carry their pyramid, so tokenize again (fvar tokenize --set pyramid.{k}=…) or "
                            f"train with --set pyramid.{k}={made.get(k)}")
    if distill and not shards.has_alias:
        raise UserError(f"{where} hold no alias tokens: distillation needs a tokenizer with an alias codebook")
    labels = shards.labels()
    check_labels(labels, preset.model.num_classes, where, owner=f"preset {preset.name}", hint=_MORE_CLASSES)


# -------------------------------------------------------------------------------------- the task
class VARTask:
    """`fvar train` (student alone) and `fvar distill` (teacher + student online) for `train.loop.fit`."""

    kind = "var"
    best_metric = "loss"

    def __init__(self, preset: Preset, tokenizer: nn.Module, *, distill: bool, source: str,
                 notes: Sequence[str] = (), sample_labels: Optional[Sequence[int]] = None):
        if source not in ("tokens", "images"):
            raise ValueError(source)
        if distill and not preset.teacher.enabled:
            raise UserError(f"preset {preset.name} has teacher.enabled false (the 'w/o teacher' ablation): "
                            f"train it with `fvar train`")
        if distill and not preset.tokenizer.alias_tokens:
            raise UserError(f"preset {preset.name} has no alias codebook (tokenizer.alias_vocab_size 0): "
                            f"nothing for a teacher to read; train it with `fvar train`")
        self.preset, self.cfg = preset, preset.train
        self.loop_config = preset.train
        self.mode = "distill" if distill else "train"
        self.tok = tokenizer.eval().requires_grad_(False)
        self.distill, self.source = distill, source
        self.notes = list(notes)
        self.sample_labels = list(sample_labels) if sample_labels is not None else None

    # ------------------------------------------------------------------------------ model
    def build(self) -> nn.Module:
        p = self.preset
        student = VAR(p.model, p.patch_nums, p.tokenizer.vocab_size, p.tokenizer.z_channels)
        self.student = student
        if not self.distill:
            self.teacher = None
            return student
        teacher = Teacher.from_student(student, p.teacher, p.tokenizer.alias_tokens)
        self.teacher = teacher
        return StudentTeacher(student, teacher, p.teacher.feat_blocks)

    def param_groups(self, model: nn.Module) -> List[Dict[str, Any]]:
        return var_param_groups(model)

    def shard_units(self, model: nn.Module) -> List[nn.Module]:
        """FSDP groups (`train.sharding.shard`): every block of the student and the teacher, and the
        teacher's AG-XAttn layers; embeddings and heads stay with the root."""
        units = list(self.student.blocks)
        if self.teacher is not None:
            units += list(self.teacher.net.blocks) + list(self.teacher.xattn)
        return units

    def attach(self, model: nn.Module) -> None:
        self.model = model
        device = next(self.student.parameters()).device
        self.tok.to(device)
        self.checkpointing = self.cfg.checkpointing_on(device.type)
        for net in (self.student, self.teacher.net if self.teacher is not None else None):
            if net is not None:
                net.activation_checkpointing = self.checkpointing
        # Whole-model compile (static shapes, no graph breaks in the step: docs/design.md §11).
        self.compiled = self.cfg.compile_on(device.type)
        self.run = torch.compile(model, dynamic=False) if self.compiled else model

    def describe(self) -> List[str]:
        p, c = self.preset, self.cfg
        n = sum(x.numel() for x in self.student.parameters())
        lines = list(self.notes)
        lines.append(f"student: VAR depth {p.model.depth}, width {p.model.width}, {n / 1e6:.2f}M parameters, "
                     f"{p.tokenizer.vocab_size} codes, {len(p.patch_nums)} scales ({self.student.seq_len} tokens)")
        if self.teacher is not None:
            t = p.teacher
            lines.append(f"teacher: AG-XAttn in the last {t.xattn_blocks} blocks ({t.alias_visibility} alias "
                         f"visibility), λ_feat {t.lambda_feat} on {t.feat_blocks} blocks, λ_logit {t.lambda_logit} "
                         f"(T={t.kd_temperature}), teacher CE {'on' if t.teacher_ce else 'off'}")
        lines.append(f"tokens: {'token shards' if self.source == 'tokens' else 'encoded on the fly from images'}"
                     + (f", focus pyramid {p.pyramid.kernel}" if self.source == "images" else ""))
        if self.source == "images":  # the encoder's cost, said where the choice is made
            lines.append("note: every step runs the tokenizer's focus encodes (at 256 px about twice the FLOPs of a "
                         "d16 training step, fp32, no grad, chunked to memory); `fvar tokenize` once and "
                         "`--tokens` trains without them")
        lines.append(f"activation checkpointing: {getattr(self, 'checkpointing', c.activation_checkpointing)}; "
                     f"torch.compile: {'on' if getattr(self, 'compiled', False) else 'off'}")
        return lines

    # ------------------------------------------------------------------------------- step
    @torch.no_grad()
    def tokens(self, batch: Any) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
        """(structure (B, L), alias (B, L) or None, labels (B,)) of a batch of either source."""
        if self.source == "tokens":
            structure, alias, label = batch
            return structure, (alias if alias.numel() else None), label
        img, label = batch
        with torch.autocast(img.device.type, enabled=False):
            toks = self.tok.encode_with_pyramid(img.float(), self.preset.pyramid, self.preset.resolution)
        alias = torch.cat(toks.alias, dim=1) if toks.alias is not None else None
        return torch.cat(toks.structure, dim=1), alias, label

    def step(self, batch: Any, step: int):
        """(loss, logged parts). The networks stop at the head's input; `head_losses` applies the
        heads chunk by chunk (the (B, L, V) logits never exist) and gives the CE, KL and argmax hits
        together — the same numbers as `distill.distill_loss` on full logits."""
        structure, alias, label = self.tokens(batch)
        sizes = [p * p for p in self.preset.patch_nums]
        x_in = self.tok.quantize.idx_to_var_input(list(torch.split(structure, sizes, dim=1)))
        t_cfg = self.preset.teacher
        kw = dict(label_smoothing=self.cfg.label_smoothing)
        if self.teacher is None:
            h = self.run(label, x_in, head=False)
            out = head_losses(h, self.student.head, structure, **kw)
            return loss_parts(out, None, t_cfg, sizes[-1])
        h, s_feats, h_t, t_feats = self.run(label, x_in, alias, head=False)
        out = head_losses(h, self.student.head, structure, h_t=h_t, head_t=self.teacher.net.head,
                          kd_temperature=t_cfg.kd_temperature if t_cfg.lambda_logit > 0 else None,
                          teacher_ce=t_cfg.teacher_ce, **kw)
        feat = feature_alignment(s_feats, t_feats) if t_cfg.lambda_feat > 0 else None
        return loss_parts(out, feat, t_cfg, sizes[-1])

    # ---------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def on_sample(self, run_dir: Path, step: int, weights: Optional[Mapping[str, torch.Tensor]] = None) -> None:
        """A grid of one sample per class of `sample_labels` (seed = index), decoded. weights: the
        student's full weights when the trained one is sharded (sampled by a whole copy)."""
        if not self.sample_labels:
            return
        student = self.student
        if weights is not None:
            p = self.preset
            with torch.random.fork_rng(devices=[]):  # its throw-away initialisation must not move the run's RNG
                student = VAR(p.model, p.patch_nums, p.tokenizer.vocab_size, p.tokenizer.z_channels)
            load_strict(student, weights, "gathered student")
            student.to(next(self.tok.parameters()).device)
        was = student.training
        student.eval()
        try:
            out = sample(student, self.tok, torch.tensor(self.sample_labels),
                         seeds=list(range(len(self.sample_labels))), settings=self.preset.sample)
        finally:
            student.train(was)
        save_png(torch.cat(list(out.images.float()), dim=2), Path(run_dir) / "samples" / f"step-{step:07d}.png")

    # ------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> Dict[str, torch.Tensor]:
        return self.student.state_dict()

    def load_state_dict(self, sd: Mapping[str, torch.Tensor]) -> None:
        load_strict(self.student, sd, "run checkpoint")

    def extra_state(self) -> Dict[str, Any]:
        """The teacher's weights (the loop gathers them to the CPU, from shards when sharded)."""
        return {"teacher": self.teacher.state_dict()} if self.teacher else {}

    def load_extra_state(self, d: Mapping[str, Any]) -> None:
        if self.teacher is not None:
            if not d.get("teacher"):
                raise UserError("this run's checkpoint holds no teacher weights: it is not a distillation run")
            load_strict(self.teacher, d["teacher"], "run checkpoint (teacher)")


# ------------------------------------------------------------------------------- run plumbing
def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def check_run_tokenizer(run_dir: Path, tokenizer_ckpt: Path) -> str:
    """The sha256 of the tokenizer's weights; a UserError if run_dir was trained with another one."""
    dst = run_dir / TOKENIZER_DIR
    want = file_sha256(tokenizer_ckpt / WEIGHTS_NAME)
    if (dst / WEIGHTS_NAME).is_file() and file_sha256(dst / WEIGHTS_NAME) != want:
        raise UserError(f"{run_dir} was trained with another tokenizer ({dst}); choose another --out")
    return want


def install_tokenizer(run_dir: Path, tokenizer_ckpt: Path) -> Path:
    """<run>/tokenizer: one copy (a hard link where possible) of the tokenizer checkpoint the run
    trains on; a run resumed with another tokenizer is refused."""
    dst = run_dir / TOKENIZER_DIR
    check_run_tokenizer(run_dir, tokenizer_ckpt)
    if (dst / WEIGHTS_NAME).is_file():
        return dst
    tmp = run_dir / f".{TOKENIZER_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        _link_or_copy(tokenizer_ckpt / name, tmp / name)
    (tmp / CARD_NAME).write_text(card_for(tokenizer_ckpt), encoding="utf-8")
    os.replace(tmp, dst)
    return dst


def _tokenizer_of_shards(shards: Any, override: Optional[Path]) -> Path:
    """The tokenizer that wrote the shards: --tokenizer, else the path their manifest records."""
    rec = shards.manifest.get("tokenizer") or {}
    if override is not None:
        return resolve_checkpoint(override, "--tokenizer")
    if rec.get("path") and Path(rec["path"]).is_dir():
        return Path(rec["path"])
    raise UserError(f"the tokenizer that wrote {shards.dir} ({rec.get('path', '?')}) is not there: pass it "
                    f"with --tokenizer")


def train_transformer(preset: Preset, run_dir: Union[str, Path], *, distill: bool,
                      tokens: Optional[Union[str, Path]] = None, data: Optional[Union[str, Path]] = None,
                      tokenizer: Optional[Union[str, Path]] = None, save_teacher: bool = False,
                      device: Optional[str] = None, console: Any = None, num_workers: Optional[int] = None,
                      allow_data_change: bool = False):
    """`fvar train` / `fvar distill`: check every input against the preset, then train (or resume)
    in run_dir. Exactly one of `tokens` (shards) and `data` (image folder, needs `tokenizer`);
    resuming on other data needs allow_data_change."""
    if (tokens is None) == (data is None):
        raise UserError("give either --tokens SHARDS or --data DIR (with --tokenizer CKPT)")
    run_dir = Path(run_dir)
    notes: List[str] = []
    bad: List[Tuple[Path, str]] = []
    if tokens is not None:
        shards = TokenShards(tokens)
        check_shards_fit(preset, shards, distill)
        tok_path = _tokenizer_of_shards(shards, Path(tokenizer) if tokenizer else None)
        dataset: Any = ShardItems(shards, preset.data.hflip, preset.train.seed)
        classes = shards.classes
        notes.append(f"data: token shards {tokens}: {len(dataset)} images"
                     + (" (+ mirrors)" if dataset.hflip else "") + f", {len(classes)} classes")
        source = "tokens"
        identity = data_identity("tokens", tokens, shards.fingerprint())
    else:
        if tokenizer is None:
            raise UserError("--data needs --tokenizer CKPT (the tokenizer to encode the images with)")
        tok_path = resolve_checkpoint(tokenizer, "--tokenizer")
        folder = check_folder(data)
        good = folder.good
        check_labels(range(len(good.classes)), preset.model.num_classes, f"image folder {data} (classes)",
                     owner=f"preset {preset.name}", hint=_MORE_CLASSES)
        notes += [f"data: {folder.summary()}", *filter(None, [folder.report(listed_in=run_dir / SKIPPED_FILES)])]
        dataset = folder.dataset(preset.resolution, preset.data, train=True, seed=preset.train.seed)
        classes = good.classes
        source = "images"
        identity = data_identity("images", data, good.fingerprint())

    tok_ck = load_checkpoint(tok_path, expect_kind="tokenizer")
    check_tokenizer_fits(preset, tok_ck.preset, f"tokenizer {tok_path}")
    tok = build_tokenizer(tok_ck)
    if tokens is not None:
        want = shards.tokenizer_sha256
        if want and tensors_sha256(tok) != want:
            raise UserError(f"tokenizer {tok_ck.path} is not the one that wrote {tokens} (its weights differ)")

    # Read-only checks on every rank; the files are written by the main process inside `fit`.
    run = check_run_dir(run_dir, preset)
    tok_sha = check_run_tokenizer(run_dir, tok_ck.path)

    def prepare(d: Path) -> None:
        install_tokenizer(d, tok_ck.path)
        write_class_index(d / CLASS_INDEX, classes)
        write_skipped(d / SKIPPED_FILES, bad)

    n = min(len(classes), 8)
    task = VARTask(preset, tok, distill=distill, source=source, notes=notes,
                   sample_labels=[round(i * (len(classes) - 1) / max(n - 1, 1)) for i in range(n)])
    prov = {"tokenizer": {"path": f"../../{TOKENIZER_DIR}", "sha256": tok_sha},
            "data": str(Path(tokens if tokens is not None else data).resolve())}
    res = fit(task, dataset, run, device=device,
              console=console, num_workers=num_workers, provenance=prov, prepare=prepare, data_identity=identity,
              allow_data_change=allow_data_change)
    if distill and save_teacher and res.main_process:
        save_teacher_checkpoint(task, preset, run_dir, res.step)
    return res


def save_teacher_checkpoint(task: VARTask, preset: Preset, run_dir: Path, step: int) -> Path:
    """<run>/teacher: the teacher as a checkpoint of kind 'teacher' (not needed for sampling)."""
    return save_checkpoint(run_dir / TEACHER_DIR, kind="teacher", preset=preset, state_dict=task.teacher.state_dict(),
                           provenance={"source": "fvar distill", "step": step})
