"""Official weights on the Hugging Face Hub, by name: a small registry (like litgpt's) of where
each file lives, the revision it is pinned to and its sha256; fetched through huggingface_hub's
cache, checked, and converted into a ready fvar checkpoint pair (`fvar download`,
`Pipeline.from_pretrained("var-d16")` / `"hf://ORG/REPO/FILE"`); and fvar checkpoints pushed back
with their model card (`fvar push`).

Offline (`HF_HUB_OFFLINE=1`, or no network) a file already in the cache is used; one that is not
is a one-line error naming the file, the cache and what to do instead.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

from fvar_core import envvars
from fvar_core.checkpoints import CONFIG_NAME, card_for, read_checkpoint_config
from fvar_core.errors import UserError
from fvar_core.hashing import file_sha256
from fvar_core.modelcard import CARD_NAME
from fvar_core.models.official import import_official

PathLike = Union[str, Path]
OFFICIAL_REPO = "FoundationVision/var"


@dataclass(frozen=True)
class HubFile:
    """One file on the Hub. revision: a commit sha (pinned) or a branch ('main': not pinned);
    sha256: the file's checksum, checked after every fetch (None: not known yet)."""

    repo_id: str
    filename: str
    revision: str = "main"
    sha256: Optional[str] = None


@dataclass(frozen=True)
class HubModel:
    """A registry entry: the transformer file, its VQ-VAE file, and the preset that fits it."""

    var: HubFile
    vae: HubFile
    preset: Optional[str] = None  # None: read off the state dict (`models.official.default_var_preset`)


# The official release (github.com/FoundationVision/VAR, README "model zoo"). Their Hub commit and
# checksums were not reachable from where this registry was written: pin them with what
# `fvar download NAME` prints once online (the revision and sha256 it fetched).
_VAE = HubFile(OFFICIAL_REPO, "vae_ch160v4096z32.pth")
REGISTRY: Dict[str, HubModel] = {
    f"var-d{d}": HubModel(HubFile(OFFICIAL_REPO, f"var_d{d}.pth"), _VAE) for d in (16, 20, 24, 30)
}


def offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it (1/true/yes/on)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def parse_hf_uri(spec: str) -> HubFile:
    """'hf://ORG/REPO/path/to/file.pth[@REVISION]' → HubFile."""
    m = re.fullmatch(r"hf://([^/@\s]+/[^/@\s]+)/([^@\s]+)(?:@([^@\s]+))?", spec)
    if not m:
        raise UserError(f"{spec!r}: expected hf://ORG/REPO/FILE[@REVISION]")
    return HubFile(m.group(1), m.group(2), m.group(3) or "main")


def lookup(name: str) -> HubModel:
    if name not in REGISTRY:
        raise UserError(f"unknown model '{name}': known are {', '.join(sorted(REGISTRY))} (or hf://ORG/REPO/FILE)")
    return REGISTRY[name]


@dataclass(frozen=True)
class Fetched:
    """A fetched file: its path in the cache, the commit it came from, its sha256."""

    path: Path
    revision: str
    sha256: str


def fetch(f: HubFile, cache_dir: Optional[PathLike] = None) -> Fetched:
    """`f` from huggingface_hub's cache (HF_HUB_CACHE, or its default), downloaded into it when
    online; its sha256 is checked when the registry knows it. Every failure is one line."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub import errors as hfe

    where = f"{f.repo_id}/{f.filename}@{f.revision}"
    try:
        path = Path(hf_hub_download(f.repo_id, f.filename, revision=f.revision,
                                    cache_dir=cache_dir or os.environ.get("HF_HUB_CACHE"),
                                    local_files_only=offline(), library_name="fvar"))
    except hfe.LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if offline() else "the Hub cannot be reached"
        raise UserError(f"{where} is not in the Hugging Face cache and {why}: download it where there is a "
                        f"network (or unset HF_HUB_OFFLINE), or pass a local copy (fvar convert import FILE)") from None
    except hfe.RevisionNotFoundError:
        raise UserError(f"{where}: no such revision on the Hub") from None
    except (hfe.RepositoryNotFoundError, hfe.GatedRepoError):
        raise UserError(f"{f.repo_id}: no such repository on the Hub (or it needs a token: huggingface-cli login)") from None
    except hfe.EntryNotFoundError:
        raise UserError(f"{where}: no such file in the repository") from None
    except (hfe.HfHubHTTPError, OSError) as e:
        raise UserError(f"cannot fetch {where}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    got = file_sha256(path)
    if f.sha256 is not None and got != f.sha256:
        raise UserError(f"{where} in the cache ({path}) has sha256 {got[:16]}…, the registry says "
                        f"{f.sha256[:16]}…: the file is damaged or not the pinned one (delete it to refetch)")
    # the cache keeps files under snapshots/<commit>/<filename>
    commit = path.parents[len(Path(f.filename).parts) - 1].name
    return Fetched(path, commit, got)


def hub_cache_dir() -> Path:
    """Where converted Hub checkpoints are kept: $FVAR_CACHE/hub (default ~/.cache/fvar/hub)."""
    root = os.environ.get(envvars.CACHE) or Path.home() / ".cache" / "fvar"
    return Path(root) / "hub"


def download(name: str, out: Optional[PathLike] = None, *, cache_dir: Optional[PathLike] = None,
             overwrite: bool = False) -> Tuple[Path, Tuple[Fetched, Fetched]]:
    """Registry name → a ready fvar checkpoint pair at `out` (default $FVAR_CACHE/hub/NAME): the
    var checkpoint, with its tokenizer in `out/tokenizer` (where `fvar sample --ckpt` finds it).
    An existing pair converted from the same files is kept; another one needs `overwrite`.
    Returns (the checkpoint folder, the two fetched files)."""
    entry = lookup(name)
    out = Path(out) if out is not None else hub_cache_dir() / name
    var, vae = fetch(entry.var, cache_dir), fetch(entry.vae, cache_dir)
    if _converted_from(out) != var.sha256 or _converted_from(out / "tokenizer") != vae.sha256:
        import_official(var.path, out, entry.preset, overwrite=overwrite, sha256=var.sha256)
        import_official(vae.path, out / "tokenizer", overwrite=True, sha256=vae.sha256)
    return out, (var, vae)


def _converted_from(ckpt: Path) -> Optional[str]:
    """The sha256 of the official file a checkpoint was converted from (None: not a converted one)."""
    if not (ckpt / CONFIG_NAME).is_file():
        return None
    try:
        _, data = read_checkpoint_config(ckpt)
    except UserError:
        return None
    src = (data.get("provenance") or {}).get("source")
    return src.get("sha256") if isinstance(src, dict) else None


def resolve_source(source: PathLike, tokenizer: Optional[PathLike]) -> Tuple[Path, Optional[Path]]:
    """What `open_models` loads for a Hub name: a registry name → its converted pair (downloaded on
    first use); 'hf://…' → the fetched file (tokenizer too, when given as hf://…). Local paths pass."""
    s = str(source)
    if s in REGISTRY:
        return download(s)[0], None if tokenizer is None else Path(tokenizer)
    if s.startswith("hf://"):
        var = fetch(parse_hf_uri(s)).path
        if tokenizer is None:
            tok = fetch(_VAE).path
        elif str(tokenizer).startswith("hf://"):
            tok = fetch(parse_hf_uri(str(tokenizer))).path
        else:
            tok = Path(tokenizer)
        return var, tok
    return Path(source), None if tokenizer is None else Path(tokenizer)


def push(ckpt: PathLike, repo_id: str, *, private: bool = False, revision: Optional[str] = None,
         message: Optional[str] = None) -> str:
    """Upload an fvar checkpoint folder (config.json, weights, README.md model card; never the
    training state) to the Hub repository `repo_id` (created if needed). Returns the commit URL."""
    from huggingface_hub import HfApi
    from huggingface_hub import errors as hfe

    d, data = read_checkpoint_config(ckpt)
    if offline():
        raise UserError("HF_HUB_OFFLINE is set: pushing needs the network (unset it)")
    if not (d / CARD_NAME).is_file():
        (d / CARD_NAME).write_text(card_for(d), encoding="utf-8")
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(d), repo_id=repo_id, revision=revision,
                                 commit_message=message or f"fvar {data['kind']} checkpoint",
                                 ignore_patterns=["training_state.pt", ".*"])
    except (hfe.HfHubHTTPError, hfe.LocalTokenNotFoundError, OSError) as e:
        raise UserError(f"cannot push {d} to {repo_id}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return str(getattr(info, "commit_url", info))
