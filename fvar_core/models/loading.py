"""Models from fvar checkpoints: a tokenizer or var checkpoint → its Tokenizer / VAR, weights loaded
strictly (a checkpoint that does not fit its preset's model is a one-line error)."""
from __future__ import annotations

from fvar_core.checkpoints import Checkpoint, article, load_strict
from fvar_core.errors import UserError
from fvar_core.models.tokenizer import Tokenizer
from fvar_core.models.transformer import VAR


def build_tokenizer(ckpt: Checkpoint):
    """The Tokenizer of a tokenizer checkpoint, weights loaded (strict)."""
    if ckpt.kind != "tokenizer":
        raise UserError(f"{ckpt.path} is {article(ckpt.kind)} {ckpt.kind} checkpoint, expected a tokenizer")
    tok = Tokenizer(ckpt.preset.tokenizer, ckpt.preset.patch_nums)
    load_strict(tok, ckpt.state_dict, f"checkpoint {ckpt.path}")
    return tok


def build_var(ckpt: Checkpoint, attn_backend: str = "auto"):
    """The VAR transformer of a var checkpoint, weights loaded (strict)."""
    if ckpt.kind != "var":
        raise UserError(f"{ckpt.path} is {article(ckpt.kind)} {ckpt.kind} checkpoint, expected a var")
    p = ckpt.preset
    model = VAR(p.model, p.patch_nums, p.tokenizer.vocab_size, p.tokenizer.z_channels,
                               attn_backend=attn_backend)
    load_strict(model, ckpt.state_dict, f"checkpoint {ckpt.path}")
    return model
