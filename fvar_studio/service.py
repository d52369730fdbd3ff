"""What the studio does, without the page: every action is a library call (fvar.Pipeline, the
sampler, inpainting, the focus pyramid) plus the command line that reproduces it. The Gradio page
(`fvar_studio.app`) only lays these out; tests call them directly and through the page's API.

Models are those the command loaded (by name in the page, never a path); images come only from
uploads or the built-in test charts, and are refused past MAX_PIXELS; the number of images per
request is bounded by an estimate of the model's memory. One generation at a time per model.
"""
from __future__ import annotations

import queue
import shlex
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from fvar_core.config import SampleConfig
from fvar_core.data.images import to_pil  # the rounding `fvar sample` uses for its PNGs
from fvar_core.errors import UserError

MAX_PIXELS = 4096 * 4096  # an upload larger than this is refused (decompression bombs, memory)
MAX_PER_CLASS = 16
MEMORY_BUDGET = 2 * 2 ** 30  # bytes one request may use on a CPU (a quarter of free memory on a GPU)
SETTINGS = ("cfg", "cfg_mode", "cfg_schedule", "top_k", "top_p", "more_smooth", "rng")
SPEEDUPS = ("cfg_scales", "prune", "kv_budget", "decode_precision")  # docs/sampling-speed.md


def check_upload(img: Optional[np.ndarray], what: str = "image") -> np.ndarray:
    """An uploaded image as (H, W, 3) uint8; a missing, empty or oversized one is a UserError."""
    if img is None:
        raise UserError(f"no {what}: upload one first")
    a = np.asarray(img)
    if a.ndim == 2:
        a = np.stack([a] * 3, -1)
    if a.ndim != 3 or a.shape[2] not in (3, 4) or a.shape[0] < 1 or a.shape[1] < 1:
        raise UserError(f"the {what} is not an RGB image (shape {tuple(a.shape)})")
    if a.shape[0] * a.shape[1] > MAX_PIXELS:
        raise UserError(f"the {what} is {a.shape[1]}×{a.shape[0]} px: at most {MAX_PIXELS // 2 ** 20} megapixels")
    if a.dtype != np.uint8:
        a = np.clip(a, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(a[..., :3])


@dataclass
class Event:
    """One update while generating: kind 'scale' (si, strips: one PIL strip per image, the decoded
    f̂ after scales 0..si side by side) or 'done' (images, the command, the download folder)."""

    kind: str
    si: int = -1
    pair: bool = False  # strips alternate: the first model's, then the second's
    strips: List[Image.Image] = field(default_factory=list)
    images: List[Image.Image] = field(default_factory=list)
    captions: List[str] = field(default_factory=list)
    command: str = ""
    folder: Optional[Path] = None


class Studio:
    """The models a `fvar studio` command loaded, by display name, and what can be done with them."""

    def __init__(self, sources: Sequence[Tuple[str, Optional[str]]], device: str = "auto"):
        import fvar

        if not sources:
            raise UserError("no models to serve")
        self.pipes: Dict[str, Any] = {}
        self.sources: Dict[str, Tuple[str, Optional[str]]] = {}
        for src, tok in sources:
            pipe = fvar.Pipeline.from_pretrained(src, tokenizer=tok, device=device)
            name = self._name(src, pipe)
            self.pipes[name], self.sources[name] = pipe, (str(src), tok)
        self.locks = {n: threading.Lock() for n in self.pipes}
        self.work = Path(tempfile.mkdtemp(prefix="fvar-studio-"))

    @staticmethod
    def _name(src: str, pipe) -> str:
        kind = "VAR" if pipe.preset.pyramid.kernel == "area" else "FVAR"
        return f"{Path(str(src)).name} ({kind}, {pipe.resolution} px)"

    def pipe(self, name: str):
        if name not in self.pipes:
            raise UserError(f"unknown model {name!r}: this studio serves {', '.join(self.pipes)}")
        return self.pipes[name]

    # ----------------------------------------------------------------------------- classes
    def class_choices(self, name: str) -> List[str]:
        """'id · name' for every class (ids alone when the model has no names)."""
        pipe = self.pipe(name)
        names = pipe.class_names
        return [f"{i} · {names[i]}" if names else str(i) for i in range(pipe.num_classes)]

    def class_ids(self, name: str, chosen: Sequence[str]) -> List[int]:
        if not chosen:
            raise UserError("pick at least one class")
        return self.pipe(name).models.class_ids([c.split(" · ")[0] for c in chosen], "class")

    # -------------------------------------------------------------------------- generation
    def max_images(self, name: str) -> int:
        """How many images one request may sample: the KV cache (both CFG halves) and the decoder's
        largest activations per image against MEMORY_BUDGET (a quarter of free GPU memory)."""
        pipe = self.pipe(name)
        var, p = pipe.models.var, pipe.preset
        kv = 2 * var.depth * 2 * var.seq_len * var.width * 4
        dec = 3 * p.tokenizer.ch * p.tokenizer.ch_mult[0] * p.resolution ** 2 * 4
        budget = MEMORY_BUDGET
        if pipe.device.type == "cuda":
            budget = torch.cuda.mem_get_info(pipe.device)[0] // 4
        return max(1, min(256, budget // (kv + dec)))

    def settings(self, name: str, values: Dict[str, Any]) -> SampleConfig:
        """The model's sampling defaults with the page's values; prune and kv_budget as the CLI
        writes them ('8:0.5', '1,1'; empty = off); the sampler refuses one that does not fit the model."""
        from fvar_core.sample.sampler import settings_from
        from fvar_core.sample.speedups import speedup_overrides

        return settings_from(self.pipe(name).preset.sample, **{k: values.get(k) for k in SETTINGS},
                             **speedup_overrides(**{k: values.get(k) for k in SPEEDUPS}))

    def sample_command(self, name: str, ids: Sequence[int], n: int, seed: int, s: SampleConfig, batch: int) -> str:
        """The `fvar sample` line that draws the same images (settings spelled out in full)."""
        src, tok = self.sources[name]
        argv = ["fvar", "sample", "--ckpt", src] + (["--tokenizer", tok] if tok else [])
        nc = self.pipe(name).num_classes
        argv += ["--class", ",".join("uncond" if i == nc else str(i) for i in ids), "--n", str(n), "--seed", str(seed),
                 "--cfg", repr(s.cfg), "--cfg-mode", s.cfg_mode, "--cfg-schedule", s.cfg_schedule,
                 "--top-k", str(s.top_k), "--top-p", repr(s.top_p),
                 "--more-smooth" if s.more_smooth else "--no-more-smooth", "--rng", s.rng,
                 "--batch", str(batch), "--out", "samples"]
        if s.cfg_scales:
            argv += ["--cfg-scales", str(s.cfg_scales)]
        if s.prune:
            argv += ["--prune", ",".join(f"{pn}:{r!r}" for pn, r in s.prune.items())]
        if s.kv_budget:
            argv += ["--kv-budget", f"{s.kv_budget[0]},{s.kv_budget[1]}"]
        if s.decode_precision != "auto":
            argv += ["--decode-precision", s.decode_precision]
        return shlex.join(argv)

    def generate(self, name: str, chosen: Sequence[str], n: int, seed: int, values: Dict[str, Any],
                 compare: Optional[str] = None) -> Iterator[Event]:
        """n images of each chosen class, streamed scale by scale: one 'scale' event per scale (every
        image's focus strip so far; with `compare`, the other model's strip of the same class and
        seed below it), then 'done'. Image i has seed seed + i, as `fvar sample`."""
        from fvar_core.sample.sampler import decode_images, sample_batch

        pipe = self.pipe(name)
        ids = self.class_ids(name, chosen)
        n, seed = int(n), int(seed)
        if not 1 <= n <= MAX_PER_CLASS:
            raise UserError(f"images per class must be 1…{MAX_PER_CLASS} (got {n})")
        if seed < 0:
            raise UserError(f"seed must be ≥ 0 (got {seed})")
        total = n * len(ids)
        cap = self.max_images(name)
        if total > cap:
            raise UserError(f"{total} images is more than this model may sample at once here ({cap}): "
                            "fewer classes or images per class")
        s = self.settings(name, values)
        labels = [c for c in ids for _ in range(n)]
        seeds = [seed + i for i in range(total)]
        runs = [(name, pipe, s)]
        if compare and compare != name:
            other = self.pipe(compare)
            if other.num_classes != pipe.num_classes:
                raise UserError(f"{compare} has {other.num_classes} classes, {name} {pipe.num_classes}: "
                                "compare models of the same classes")
            runs.append((compare, other, self.settings(compare, values)))
        updates: "queue.Queue" = queue.Queue()
        strips: List[List[List[Image.Image]]] = [[[] for _ in range(total)] for _ in runs]

        def work() -> None:
            try:
                outs = []
                for r, (nm, pp, st) in enumerate(runs):
                    m = pp.models

                    def on_scale(si: int, f_hat: torch.Tensor, r: int = r, m=m, st=st) -> None:
                        imgs = decode_images(m.tokenizer, f_hat, st.decode_precision).cpu()
                        for i, im in enumerate(imgs):
                            strips[r][i].append(to_pil(im))
                        updates.put(("scale", r, si))

                    with self.locks[nm]:
                        outs.append(sample_batch(m.var, m.tokenizer, torch.tensor(labels), seeds, st,
                                                 on_scale=on_scale))
                updates.put(("done", outs))
            except Exception as e:  # handed to the page as one message
                updates.put(("error", e))

        threading.Thread(target=work, daemon=True).start()
        K = len(pipe.preset.patch_nums)
        while True:
            item = updates.get()
            if item[0] == "error":
                raise item[1]
            if item[0] == "scale":
                _, r, si = item
                if r == 0:
                    yield Event("scale", si=si, strips=[strip_image(strips[0][i][:si + 1], K) for i in range(total)])
                elif si == len(runs[1][1].preset.patch_nums) - 1:  # the comparison, once complete
                    yield Event("scale", si=si, pair=True, strips=[strip_image(strips[r][i], K)
                                                                   for i in range(total) for r in (0, 1)])
                continue
            outs = item[1]
            images = [to_pil(im) for im in outs[0].images]
            command = self.sample_command(name, ids, n, seed, s, total)
            folder = self._write_download(name, ids, n, seed, s, labels, seeds, images, command)
            choices = self.class_choices(name)
            shown = [choices[c] if c < len(choices) else "unconditional" for c in labels]
            yield Event("done", images=images, captions=[f"{c} · seed {sd}" for c, sd in zip(shown, seeds)],
                        command=command, folder=folder)
            return

    def _write_download(self, name, ids, n, seed, s, labels, seeds, images, command: str) -> Path:
        """The gallery's PNGs and generation.json, zipped for the download button."""
        import json
        import shutil

        d = Path(tempfile.mkdtemp(dir=self.work))
        (d / "images").mkdir()
        for i, (im, c) in enumerate(zip(images, labels)):
            im.save(d / "images" / f"{i:04d}-class{c:04d}.png")
        (d / "images" / "generation.json").write_text(json.dumps({
            "format": "fvar-studio-generation", "version": 1, "model": self.sources[name][0],
            "classes": list(ids), "n_per_class": n, "seed": seed, "seeds": seeds, "labels": labels,
            "settings": s.model_dump(mode="json"), "command": command},
            indent=1))
        return Path(shutil.make_archive(str(d / "fvar-samples"), "zip", d / "images"))

    # ------------------------------------------------------------------------------- editing
    def edit(self, name: str, image: np.ndarray, mask: Optional[np.ndarray], cls: Optional[str], seed: int,
             values: Dict[str, Any], outpaint: Optional[float] = None) -> Tuple[Image.Image, str, Path, Image.Image]:
        """Inpaint where mask is True (H, W) — or outpaint: the image shrunk to `outpaint` of the
        model's canvas, centred, the rest generated — through `fvar inpaint`'s own function; returns
        the result, the command that reproduces it (with the saved input and mask files), the
        folder holding them, and `fvar inpaint`'s compare.png (input | mask | result)."""
        from fvar_core.sample.inpaint import edit_to_dir

        pipe = self.pipe(name)
        img = check_upload(image)
        seed = int(seed)
        if seed < 0:
            raise UserError(f"seed must be ≥ 0 (got {seed})")
        label = None if not cls or cls == "unconditional" else self.class_ids(name, [cls])[0]
        d = Path(tempfile.mkdtemp(dir=self.work))
        Image.fromarray(img).save(d / "input.png")
        s = self.settings(name, values)
        src, tok = self.sources[name]
        argv = ["fvar", "inpaint", "--ckpt", src] + (["--tokenizer", tok] if tok else []) + ["--image", "input.png"]
        if outpaint is not None:
            fit = float(outpaint)
            run = edit_to_dir(pipe.models, d / "input.png", d / "out", outpaint=True, fit=fit, label=label,
                              seed=seed, settings=s)
            argv += ["--outpaint", "--fit", repr(fit)]
        else:
            if mask is None or not np.asarray(mask).any():
                raise UserError("the mask is empty: paint the region to regenerate")
            m = np.asarray(mask).astype(bool)
            if m.shape != img.shape[:2]:
                raise UserError(f"the mask is {m.shape[1]}×{m.shape[0]}, the image {img.shape[1]}×{img.shape[0]}")
            Image.fromarray((m * 255).astype(np.uint8)).save(d / "mask.png")
            run = edit_to_dir(pipe.models, d / "input.png", d / "out", mask=d / "mask.png", label=label, seed=seed,
                              settings=s)
            argv += ["--mask", "mask.png"]
        argv += (["--class", str(label)] if label is not None else []) + [
            "--seed", str(seed), "--cfg", repr(s.cfg), "--cfg-mode", s.cfg_mode, "--top-k", str(s.top_k),
            "--top-p", repr(s.top_p), "--more-smooth" if s.more_smooth else "--no-more-smooth", "--out", "edit"]
        return Image.open(run.result).convert("RGB"), shlex.join(argv), d, Image.open(run.compare).convert("RGB")

    # ------------------------------------------------------------------------------ pyramid
    @staticmethod
    def pyramid(image: Optional[np.ndarray], builtin: str, preset: str, kernel: str, schedule: str,
                rho_max: float) -> Tuple[Image.Image, List[List[Any]]]:
        """The D / L / A figure of `fvar pyramid visualize` and the rows of `fvar pyramid analyze`."""
        from fvar_core.data.images import load_or_builtin
        from fvar_core.focus.alias import alias_report
        from fvar_core.focus.figure import pyramid_figure
        from fvar_core.focus.pyramid import focus_views
        from fvar_core.presets import load_preset

        cfg = load_preset(preset, [f"pyramid.kernel={kernel}", f"pyramid.schedule={schedule}",
                                   f"pyramid.rho_max={float(rho_max)}"])
        if image is not None:
            d = Path(tempfile.mkdtemp())
            Image.fromarray(check_upload(image)).save(d / "upload.png")
            x, name = load_or_builtin(str(d / "upload.png"), cfg.resolution)
            name = "upload"
        else:
            x, name = load_or_builtin(builtin, cfg.resolution)
        views = focus_views(x[None], cfg.pyramid, cfg.patch_nums, cfg.resolution)
        fig = pyramid_figure(views, title=f"{name} · {cfg.name} · {kernel} PSF, {schedule}, ρmax {float(rho_max):g}px")
        fmt = lambda v, k=1: "—" if v is None else round(float(v), k)  # noqa: E731
        rows = [[d["scale"], d["size"], round(d["rho"], 2), fmt(d["leak_db_area"]), fmt(d["leak_db_focus"]),
                 fmt(d["margin_db"]), fmt(d["passband_area"], 3), fmt(d["passband_focus"], 3)]
                for d in (r.to_dict() for r in alias_report(x, cfg.pyramid, cfg.patch_nums, cfg.resolution))]
        return fig, rows

    # -------------------------------------------------------------------------------- model
    def model_info(self, name: str) -> Dict[str, Any]:
        """The model card, the preset (YAML), the class list, and for a run folder its curves and grids."""
        import yaml

        pipe = self.pipe(name)
        ck = Path(pipe.models.var_ckpt.path)
        card = ck / "README.md"
        run = ck.parent.parent if ck.parent.name == "checkpoints" else None
        curves = None
        if run is not None and (run / "metrics.jsonl").is_file():
            from fvar_core.eval.curves import plot_run

            curves = plot_run(run, self.work / f"curves-{abs(hash(name))}.png")
        grids = sorted((run / "samples").glob("*.png"))[-4:] if run is not None and (run / "samples").is_dir() else []
        names = pipe.class_names
        return {"card": card.read_text() if card.is_file() else "(no model card)",
                "preset": yaml.safe_dump(pipe.preset.model_dump(mode="json"), sort_keys=False),
                "classes": [[i, names[i] if names else ""] for i in range(pipe.num_classes)],
                "curves": curves, "grids": [str(g) for g in grids]}


def focus_sheet(strips: Sequence[Image.Image], patch_nums: Sequence[int], pair: bool = False) -> Image.Image:
    """Every image's focus strip, one row each (with `pair`, rows come in twos — the first model's,
    then the second's — and pairs are spaced apart), under a header naming each scale."""
    from PIL import ImageDraw

    w = max(s.width for s in strips)
    cell = strips[0].height
    gap = lambda i: 10 if pair and i % 2 == 0 and i else 2  # noqa: E731
    height = 14 + sum(s.height + gap(i) for i, s in enumerate(strips))
    out = Image.new("RGB", (w, height), "white")
    draw = ImageDraw.Draw(out)
    for k, p in enumerate(patch_nums):
        draw.text((k * (cell + 2) + 2, 1), f"{p}x{p}", fill=(60, 60, 60))  # PIL's built-in font has no ×
    y = 14
    for i, s in enumerate(strips):
        y += gap(i)
        out.paste(s, (0, y))
        y += s.height
    return out


def strip_image(frames: Sequence[Image.Image], K: int, cell: int = 64) -> Image.Image:
    """Frames (the image after each scale so far) side by side, K cells wide, NEAREST-scaled so
    that blocks look like blocks."""
    out = Image.new("RGB", (K * (cell + 2), cell), "white")
    for k, f in enumerate(frames):
        out.paste(f.resize((cell, cell), Image.NEAREST), (k * (cell + 2), 0))
    return out
