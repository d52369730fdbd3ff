"""The studio's page (Gradio): four tabs over `fvar_studio.service.Studio` — Generate (with the
image coming into focus scale by scale, and a second model beside it), Edit (a brush mask,
in- and out-painting), Pyramid (the D / L / A views and the alias table), Model (card, preset,
classes, curves). Layout only: every action is a Studio call; every refusal is one message.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional

import gradio as gr
import numpy as np
from PIL import Image

from fvar_core.errors import UserError
from fvar_studio.service import MAX_PER_CLASS, Studio, focus_sheet

log = logging.getLogger("fvar.studio")
ALIAS_COLUMNS = ["k", "size", "ρ px", "leak area dB", "leak focus dB", "Δ dB", "kept area", "kept focus"]


def _message(e: BaseException) -> gr.Error:
    """What the page shows for a failed action: the one-line message (never a traceback)."""
    if isinstance(e, UserError):
        return gr.Error(str(e), print_exception=False)
    log.error("studio: %s: %s", type(e).__name__, e)
    return gr.Error(f"internal error ({type(e).__name__}): {e}", print_exception=False)


def _readable(base):
    """`base` (an image input) whose failure to read an upload is one message in the page, not
    Gradio's processing error with a traceback in the server log. A template of `base`, so the
    page draws it as one."""

    class Readable(base):
        is_template = True

        def preprocess(self, payload):
            try:
                return super().preprocess(payload)
            except gr.Error:
                raise
            except Exception:
                raise gr.Error("the upload is not an image fvar can read (PNG, JPEG, WebP, …)",
                               print_exception=False) from None

    Readable.__name__ = f"Readable{base.__name__}"
    return Readable


ImageEditor, ImageInput = _readable(gr.ImageEditor), _readable(gr.Image)


def _values(cfg, cfg_mode, cfg_schedule, top_k, top_p, more_smooth, rng, cfg_scales=0, prune="", kv_budget="",
            decode_precision="auto") -> Dict[str, Any]:
    return {"cfg": cfg, "cfg_mode": cfg_mode, "cfg_schedule": cfg_schedule, "top_k": None if top_k is None else int(top_k),
            "top_p": top_p, "more_smooth": more_smooth, "rng": rng,
            "cfg_scales": None if cfg_scales is None else int(cfg_scales), "prune": (prune or "").strip(),
            "kv_budget": (kv_budget or "").strip(), "decode_precision": decode_precision}


def _mask_of(editor: Optional[dict]) -> tuple:
    """ImageEditor value → (image (H, W, 3) uint8 or None, painted mask (H, W) bool or None)."""
    if not editor or editor.get("background") is None:
        return None, None
    bg = np.asarray(editor["background"])
    mask = np.zeros(bg.shape[:2], bool)
    for layer in editor.get("layers") or []:
        a = np.asarray(layer)
        if a.ndim == 3 and a.shape[2] == 4 and a.shape[:2] == mask.shape:
            mask |= a[..., 3] > 0
    return bg[..., :3] if bg.ndim == 3 else bg, mask


def build(studio: Studio) -> gr.Blocks:
    names = list(studio.pipes)
    first = names[0]
    with gr.Blocks(title="fvar studio") as demo:
        gr.Markdown("# fvar studio\nNext-focus prediction, scale by scale. Models: " + ", ".join(names))
        with gr.Tab("Generate"):
            with gr.Row():
                model = gr.Dropdown(names, value=first, label="model", elem_id="gen-model")
                compare = gr.Dropdown(["(none)"] + names, value=names[1] if len(names) > 1 else "(none)",
                                      label="beside it, the same class and seeds under", elem_id="gen-compare")
            with gr.Row():
                classes = gr.Dropdown(studio.class_choices(first), value=[studio.class_choices(first)[0]],
                                      multiselect=True, filterable=True, allow_custom_value=True,
                                      label="classes (type to search: names or ids)",
                                      elem_id="gen-classes")
                n = gr.Slider(1, MAX_PER_CLASS, value=4, step=1, label="images per class", elem_id="gen-n")
                seed = gr.Number(0, precision=0, label="seed (image i: seed + i)", elem_id="gen-seed")
            with gr.Accordion("sampling settings", open=False):
                s0 = studio.pipe(first).preset.sample
                with gr.Row():
                    cfg = gr.Number(s0.cfg, label="cfg")
                    cfg_mode = gr.Radio(["var", "standard"], value=s0.cfg_mode, label="cfg mode")
                    cfg_schedule = gr.Radio(["linear", "constant"], value=s0.cfg_schedule, label="cfg schedule")
                with gr.Row():
                    top_k = gr.Number(s0.top_k, precision=0, label="top-k (0 = off)")
                    top_p = gr.Number(s0.top_p, label="top-p (0 = off)")
                    more_smooth = gr.Checkbox(s0.more_smooth, label="more smooth")
                    rng = gr.Radio(["per-image", "official"], value=s0.rng, label="random stream")
            with gr.Accordion("faster sampling (training-free; costs quality: benchmarks/RESULTS.md)", open=False):
                with gr.Row():
                    cfg_scales = gr.Number(0, precision=0, label="guidance on the first N scales (0 = all)")
                    prune = gr.Textbox("", label="prune PATCH:RATIO,… (e.g. 8:0.5)")
                    kv_budget = gr.Textbox("", label="KV budget FIRST,RECENT (e.g. 1,1)")
                    decode_precision = gr.Radio(["auto", "fp32", "bf16"], value="auto", label="decode precision")
            go = gr.Button("Generate", variant="primary", elem_id="gen-button")
            strips = gr.Image(type="pil", format="png", label="into focus: each image after every scale (with a "
                              "second model: its row below, same class and seed)", elem_id="gen-strips")
            gallery = gr.Gallery(label="samples", columns=8, height="auto", format="png", elem_id="gen-gallery")
            command = gr.Textbox(label="the same images from the command line", elem_id="gen-command")
            download = gr.File(label="PNGs + generation.json", elem_id="gen-download")

            def on_model(name):
                choices = studio.class_choices(name)
                return gr.update(choices=choices, value=[choices[0]])

            model.change(on_model, model, classes)

            def generate(name, other, chosen, n_, seed_, *settings):
                try:
                    other = None if other == "(none)" else other
                    for ev in studio.generate(name, chosen or [], n_, seed_ if seed_ is not None else 0,
                                              _values(*settings), compare=other):
                        if ev.kind == "scale":
                            pns = studio.pipe(name).preset.patch_nums
                            yield focus_sheet(ev.strips, pns, pair=ev.pair), gr.skip(), gr.skip(), gr.skip()
                        else:
                            yield (gr.skip(), list(zip(ev.images, ev.captions)), ev.command, str(ev.folder))
                except Exception as e:
                    raise _message(e)

            go.click(generate, [model, compare, classes, n, seed, cfg, cfg_mode, cfg_schedule, top_k, top_p,
                                more_smooth, rng, cfg_scales, prune, kv_budget, decode_precision],
                     [strips, gallery, command, download], api_name="generate",
                     concurrency_limit=1)

        with gr.Tab("Edit"):
            with gr.Row():
                e_model = gr.Dropdown(names, value=first, label="model", elem_id="edit-model")
                e_class = gr.Dropdown(["unconditional"] + studio.class_choices(first), value="unconditional",
                                      filterable=True, allow_custom_value=True, label="class",
                                      elem_id="edit-class")
                e_seed = gr.Number(0, precision=0, label="seed", elem_id="edit-seed")
            editor = ImageEditor(type="numpy", label="image — paint (white brush) where to regenerate",
                                    brush=gr.Brush(colors=["#ffffff"], default_size=6), elem_id="edit-canvas",
                                    height=400)
            take = gr.Button("use the first sample of the gallery")
            with gr.Row():
                outpaint = gr.Checkbox(False, label="outpaint: shrink the image onto the canvas, generate around it",
                                       elem_id="edit-outpaint")
                fit = gr.Slider(0.25, 0.95, value=0.6, step=0.05, label="outpaint: the image's share of the canvas")
            e_go = gr.Button("Inpaint", variant="primary", elem_id="edit-button")
            shown = gr.Image(type="pil", label="input | mask | result (enlarged)", format="png", elem_id="edit-compare")
            result = gr.Image(type="numpy", label="result (its own size)", format="png", elem_id="edit-result")
            e_command = gr.Textbox(label="the same edit from the command line (files in the download)",
                                   elem_id="edit-command")
            e_files = gr.File(label="input.png, mask.png", file_count="multiple", elem_id="edit-files")

            e_model.change(lambda nm: gr.update(choices=["unconditional"] + studio.class_choices(nm),
                                                value="unconditional"), e_model, e_class)

            def take_first(items):
                if not items:
                    raise gr.Error("the gallery is empty: generate first", print_exception=False)
                first_item = items[0][0] if isinstance(items[0], (list, tuple)) else items[0]
                return {"background": first_item, "layers": [], "composite": first_item}

            take.click(take_first, gallery, editor)

            def inpaint(name, cls, seed_, ed, out_, fit_):
                try:
                    img, mask = _mask_of(ed)
                    res, cmd, d, compare_ = studio.edit(name, img, mask, cls, seed_ if seed_ is not None else 0, {},
                                                        outpaint=fit_ if out_ else None)
                    files = [str(p) for p in (d / "input.png", d / "mask.png") if p.exists()]
                    scale = max(1, 480 // compare_.width)
                    big = compare_.resize((compare_.width * scale, compare_.height * scale), Image.NEAREST)
                    return big, np.asarray(res), cmd, files
                except Exception as e:
                    raise _message(e)

            e_go.click(inpaint, [e_model, e_class, e_seed, editor, outpaint, fit],
                       [shown, result, e_command, e_files], api_name="inpaint", concurrency_limit=1)

        with gr.Tab("Pyramid"):
            from fvar_core.presets import list_presets

            with gr.Row():
                p_image = ImageInput(type="numpy", label="your image (optional)", height=256)
                with gr.Column():
                    p_builtin = gr.Radio(["chart", "zone-plate"], value="zone-plate", label="or a built-in image")
                    p_preset = gr.Dropdown([p for p in list_presets() if not p.startswith("_")], value="d16-256",
                                           label="preset")
                    p_kernel = gr.Radio(["disk", "gaussian", "box", "area"], value="disk", label="PSF")
                    p_schedule = gr.Radio(["cosine", "matched", "linear"], value="cosine", label="radius schedule")
                    p_rho = gr.Slider(0.5, 8.0, value=1.5, step=0.25, label="ρ max (px)")
            p_go = gr.Button("Show the pyramid", variant="primary")
            p_fig = gr.Image(type="pil", label="D (area) / L (focus) / A (alias, amplified), one column per scale")
            p_table = gr.Dataframe(headers=ALIAS_COLUMNS, label="alias leakage per scale (fvar pyramid analyze)")

            def pyramid(img, builtin, preset, kernel, schedule, rho):
                try:
                    return studio.pyramid(img, builtin, preset, kernel, schedule, rho)
                except Exception as e:
                    raise _message(e)

            p_go.click(pyramid, [p_image, p_builtin, p_preset, p_kernel, p_schedule, p_rho], [p_fig, p_table],
                       api_name="pyramid")

        with gr.Tab("Model"):
            m_model = gr.Dropdown(names, value=first, label="model")
            m_card = gr.Markdown()
            with gr.Row():
                m_preset = gr.Code(language="yaml", label="preset")
                m_classes = gr.Dataframe(headers=["id", "name"], label="classes")
            m_curves = gr.Image(type="filepath", label="training curves (run folders)")
            m_grids = gr.Gallery(label="sample grids from training (run folders)", columns=4)

            def info(name):
                try:
                    d = studio.model_info(name)
                except Exception as e:
                    raise _message(e)
                card = d["card"]
                if card.startswith("---"):  # the Hub's YAML header
                    card = card.split("---", 2)[-1]
                return card, d["preset"], d["classes"], d["curves"], d["grids"]

            m_model.change(info, m_model, [m_card, m_preset, m_classes, m_curves, m_grids])
            demo.load(info, m_model, [m_card, m_preset, m_classes, m_curves, m_grids])
    return demo


def launch(studio: Studio, host: str = "127.0.0.1", port: Optional[int] = None, auth: Optional[List[str]] = None,
           block: bool = True):
    """Serve the page; returns (demo, url). One generation at a time per model (the Studio's locks
    and the events' concurrency limit); uploads over 16 MB are refused by the server."""
    demo = build(studio)
    demo.queue(default_concurrency_limit=1, max_size=64)
    demo.launch(server_name=host, server_port=port, auth=tuple(auth) if auth else None, max_file_size="16mb",
                show_error=True, quiet=True, prevent_thread_lock=not block, ssr_mode=False)
    return demo, demo.local_url
