"""The model card every checkpoint carries: README.md with the Hugging Face Hub's YAML header
(library, tags, licence, datasets), written by `checkpoints.save_checkpoint` in the same atomic step
as the weights, so a checkpoint folder pushed to the Hub describes itself.

The card says what the checkpoint is (kind, preset, architecture, step), what it was trained on
(data path, fingerprint, classes), its metrics at save time, the sampling defaults, how to use it,
and whom to cite. It is documentation: editing it never invalidates the checkpoint.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import yaml

from fvar_core.config import Preset

CARD_NAME = "README.md"
LICENSE = "mit"  # fvar's licence; the weights' own terms are the trainer's to state
CITATIONS = """@inproceedings{tian2024var,
  title     = {Visual Autoregressive Modeling: Scalable Image Generation via Next-Scale Prediction},
  author    = {Tian, Keyu and Jiang, Yi and Yuan, Zehuan and Peng, Bingyue and Wang, Liwei},
  booktitle = {Advances in Neural Information Processing Systems},
  year      = {2024}
}
@article{li2025fvar,
  title   = {{FVAR}: Visual Autoregressive Modeling via Next Focus Prediction},
  author  = {Li, Xiaofan and Wu, Chenming and Sun, Yanpeng and Zhou, Jiaming and Qu, Delin and Qu, Yansong
             and Bo, Weihao and Yu, Haibao and Liang, Dingkang},
  year    = {2025}
}"""
_CLASSES_SHOWN = 20
_KIND_TEXT = {"var": "a VAR transformer (the FVAR student: it runs in the official VAR inference code)",
              "tokenizer": "a multi-scale VQ-VAE tokenizer (VAR-compatible, with FVAR's dual path)",
              "teacher": "an FVAR high-frequency teacher (training only)",
              "classifier": "the small CNN of fvar's offline evaluation"}


def _header(kind: str, preset: Optional[Preset], datasets: Sequence[str]) -> Dict[str, Any]:
    tags = ["fvar", "var", "autoregressive", "image-generation"]
    if kind == "tokenizer":
        tags += ["vq-vae", "image-tokenizer"]
    if preset is not None and preset.pyramid.kernel != "area":
        tags.append("next-focus-prediction")
    head: Dict[str, Any] = {"library_name": "fvar", "license": LICENSE, "tags": tags}
    if datasets:
        head["datasets"] = list(datasets)
    return head


def model_card(kind: str, preset: Optional[Preset], provenance: Mapping[str, Any],
               classes: Optional[Sequence[str]] = None) -> str:
    """The README.md text of a checkpoint of `kind` (see the module docstring)."""
    datasets = [provenance["dataset"]] if isinstance(provenance.get("dataset"), str) else []
    lines = ["---", yaml.safe_dump(_header(kind, preset, datasets), sort_keys=False).strip(), "---", ""]
    name = preset.name if preset is not None else kind
    lines += [f"# {name} ({kind})", "", f"An fvar checkpoint: {_KIND_TEXT.get(kind, kind)}.", ""]
    lines += ["| | |", "|---|---|"]
    if preset is not None:
        m, t = preset.model, preset.tokenizer
        lines += [f"| preset | `{preset.name}` ({preset.resolution} px, scales {list(preset.patch_nums)}) |",
                  f"| tokenizer | {t.vocab_size} codes" + (f" + {t.alias_tokens} alias codes" if t.alias_tokens else "")
                  + f", z {t.z_channels}, ch {t.ch} |",
                  f"| pyramid | {preset.pyramid.kernel} PSF, ρ_max {preset.pyramid.rho_max:g} px, "
                  f"{preset.pyramid.schedule} schedule |"]
        if kind in ("var", "teacher"):
            lines.append(f"| transformer | depth {m.depth}, width {m.width}, {m.num_heads} heads, {m.num_classes} classes |")
    step = provenance.get("step")
    lines.append(f"| step | {step if step is not None else '–'} |")
    lines.append(f"| fvar | {provenance.get('fvar_version', '?')}, saved {provenance.get('created', '?')} |")
    source = provenance.get("source")
    if isinstance(source, Mapping):
        lines.append(f"| converted from | `{source.get('file')}` (sha256 {str(source.get('sha256'))[:12]}…) |")
    ident = provenance.get("data_identity") or {}
    if ident or provenance.get("data"):
        path = ident.get("path") or provenance.get("data")
        fp = ident.get("fingerprint") or provenance.get("data_fingerprint")
        lines.append(f"| data | {ident.get('source', 'images')} `{path}`" + (f" (fingerprint {str(fp)[:12]}…)" if fp else "")
                     + " |")
    if classes:
        shown = ", ".join(classes[:_CLASSES_SHOWN]) + (f", … ({len(classes)} in all)" if len(classes) > _CLASSES_SHOWN else "")
        lines.append(f"| classes | {shown} |")
    lines.append("")
    metrics = provenance.get("metrics")
    if isinstance(metrics, Mapping):
        shown_m = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not k.endswith("_s")}
        if shown_m:
            lines += ["## Metrics at save time", "", "| metric | value |", "|---|---|"]
            lines += [f"| {k} | {v:.6g} |" for k, v in shown_m.items()]
            lines.append("")
    release = provenance.get("release")
    where = "PATH/TO/THIS/FOLDER"
    if isinstance(release, Mapping):
        where = str(release.get("name", where))
        lines += _release_section(release)
    if preset is not None and kind == "var":
        s = preset.sample
        lines += ["## Use", "", "```bash",
                  f"fvar sample --ckpt {where} --class 0 --n 8",
                  "```", "", "```python", "import fvar", "",
                  f'pipe = fvar.Pipeline.from_pretrained("{where}")',
                  "images = pipe(classes=[0, 1], seed=0)", "```", "",
                  f"Sampling defaults (the preset's): cfg {s.cfg} ({s.cfg_mode}, {s.cfg_schedule} ramp), "
                  f"top-k {s.top_k}, top-p {s.top_p}, more_smooth {s.more_smooth}, rng {s.rng}.", ""]
    lines += ["## Citation", "", "```bibtex", CITATIONS, "```", ""]
    return "\n".join(lines)


def _release_section(release: Mapping[str, Any]) -> List[str]:
    """A bundled model's card: what it is, the command that trains it, how it scores."""
    lines = ["## Bundled with fvar", "", f"`{release.get('name')}`: {release.get('summary', '')}".rstrip(), "",
             "Trained from Fashion-MNIST's IDX files by one resumable command:", "", "```bash",
             str(release.get("recipe")), "```", ""]
    if release.get("precision") == "float16":
        lines += ["Stored in float16 (loaded into float32 models); the tensors as trained have sha256 "
                  f"`{str(release.get('trained_tensors_sha256'))[:16]}…` (docs/release.md says what the rounding "
                  "changes).", ""]
    rows = release.get("evaluation") or []
    if rows:
        lines += [f"The recipe's evaluation, of the weights as trained (float32), in the feature space of the "
                  f"bundled classifier `{release.get('classifier')}` against the 10,000 test images (100 samples "
                  "per class, the preset's sampling defaults, seed 0; the float16 files' own figures are in "
                  "docs/release.md):", "",
                  "| images | n | class acc. | FID | precision | recall | PSNR |", "|---|---|---|---|---|---|---|"]
        for r in rows:
            def f(k: str, fmt: str) -> str:
                v = r.get(k)
                return format(v, fmt) if isinstance(v, (int, float)) else "–"
            acc = f"{100 * r['accuracy']:.1f}%" if isinstance(r.get("accuracy"), (int, float)) else "–"
            lines.append(f"| {r.get('name')} | {r.get('n', '–')} | {acc} | {f('fid', '.2f')} | "
                         f"{f('precision', '.3f')} | {f('recall', '.3f')} | {f('psnr', '.2f')} |")
        lines.append("")
    return lines


def read_card_header(path: Path) -> Dict[str, Any]:
    """The YAML header of a model card (README.md) as a mapping; ValueError if it has none."""
    text = Path(path).read_text(encoding="utf-8")
    if not text.startswith("---\n") or "\n---\n" not in text[4:]:
        raise ValueError(f"{path}: no YAML header (--- … ---) at the top")
    head = yaml.safe_load(text[4:text.index("\n---\n", 4)])
    if not isinstance(head, dict):
        raise ValueError(f"{path}: the YAML header is not a mapping")
    return head
