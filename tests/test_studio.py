"""fvar studio through its API (gradio_client against a server this module starts on a free port):
generate equals `fvar sample` with the same seeds, inpaint equals `fvar inpaint`, every bad input is
its message and the server keeps answering; the CLI's refusals are one line."""
from __future__ import annotations

import shlex
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

gr = pytest.importorskip("gradio", reason="the studio extra (gradio) is not installed")
from gradio_client import Client, handle_file  # noqa: E402

from fvar_core import bundle  # noqa: E402

pytestmark = pytest.mark.skipif(not bundle.bundled_names(), reason="no bundled models in this checkout")
FVAR, TWIN = "fmnist-32 (FVAR, 32 px)", "fmnist-32-var (VAR, 32 px)"
DEFAULTS = (1.5, "var", "linear", 900, 0.96, False, "per-image", 0, "", "", "auto")  # the release's sample settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    from fvar_studio.app import launch
    from fvar_studio.service import Studio

    studio = Studio([("fmnist-32", None), ("fmnist-32-var", None)], device="cpu")
    demo, url = launch(studio, port=free_port(), block=False)
    yield studio, url
    demo.close()


@pytest.fixture(scope="module")
def client(server):
    return Client(server[1], verbose=False)


def _run_command(cli, command: str, out: Path) -> list:
    """Run the command line the studio printed (its --out replaced) in this process."""
    argv = shlex.split(command)
    assert argv[0] == "fvar"
    argv = argv[1:]
    argv[argv.index("--out") + 1] = str(out)
    r = cli(*argv)
    assert r.code == 0, r.err
    return argv


def test_generate_equals_fvar_sample_with_the_same_seeds(client, cli, tmp_path):
    strips, gallery, command, download = client.predict(FVAR, TWIN, ["7 · sneaker", "9 · ankle boot"], 2, 5,
                                                        *DEFAULTS, api_name="/generate")
    assert len(gallery) == 4 and [g["caption"] for g in gallery][:2] == ["7 · sneaker · seed 5", "7 · sneaker · seed 6"]
    _run_command(cli, command, tmp_path / "cli")
    pngs = sorted((tmp_path / "cli").glob("0*.png"))
    assert len(pngs) == 4
    for g, f in zip(gallery, pngs):
        assert np.array_equal(np.asarray(Image.open(g["image"]).convert("RGB")),
                              np.asarray(Image.open(f).convert("RGB"))), f.name
    assert Path(download).suffix == ".zip"


def test_generate_with_the_speedups_equals_fvar_sample_with_them(client, cli, tmp_path):
    fast = (1.5, "var", "linear", 900, 0.96, False, "per-image", 4, "8:0.5", "1,1", "bf16")
    _, gallery, command, _ = client.predict(FVAR, "(none)", ["bag"], 2, 3, *fast, api_name="/generate")
    assert "--cfg-scales 4 --prune 8:0.5 --kv-budget 1,1 --decode-precision bf16" in command
    _run_command(cli, command, tmp_path / "cli")
    for g, f in zip(gallery, sorted((tmp_path / "cli").glob("0*.png"))):
        assert np.array_equal(np.asarray(Image.open(g["image"]).convert("RGB")),
                              np.asarray(Image.open(f).convert("RGB"))), f.name
    with pytest.raises(Exception, match=r"prune: scale\(s\) \[5\] are not patch numbers"):
        client.predict(FVAR, "(none)", ["bag"], 1, 0, *fast[:8], "5:0.5", "", "auto", api_name="/generate")


def test_unconditional_samples_reproduce_from_their_command(client, cli, tmp_path):
    _, gallery, command, _ = client.predict(FVAR, "(none)", ["uncond", "bag"], 1, 2, *DEFAULTS, api_name="/generate")
    assert "--class uncond,8" in command and gallery[0]["caption"] == "unconditional · seed 2"
    _run_command(cli, command, tmp_path / "cli")
    for g, f in zip(gallery, sorted((tmp_path / "cli").glob("0*.png"))):
        assert np.array_equal(np.asarray(Image.open(g["image"]).convert("RGB")),
                              np.asarray(Image.open(f).convert("RGB"))), f.name


def _rgba_layer(h: int, w: int, box) -> np.ndarray:
    a = np.zeros((h, w, 4), np.uint8)
    y0, y1, x0, x1 = box
    a[y0:y1, x0:x1] = 255
    return a


def test_inpaint_equals_fvar_inpaint_and_changes_only_inside_the_mask(client, cli, tmp_path):
    src = tmp_path / "shoe.png"
    rng = np.random.default_rng(0)
    img = (rng.random((32, 32, 3)) * 60).astype(np.uint8)
    img[8:24, 4:28] = 200
    Image.fromarray(img).save(src)
    layer = tmp_path / "layer.png"
    Image.fromarray(_rgba_layer(32, 32, (0, 16, 0, 32))).save(layer)  # paint the top half
    editor = {"background": handle_file(str(src)), "layers": [handle_file(str(layer))], "composite": None}
    shown, result, command, files = client.predict(FVAR, "5 · sandal", 3, editor, False, 0.6, api_name="/inpaint")
    out = np.asarray(Image.open(result).convert("RGB"))
    assert out.shape == (32, 32, 3)
    # the command reads the input and mask the studio saved: run it beside them
    names = {Path(f).name: f for f in files}
    assert set(names) == {"input.png", "mask.png"}
    work = tmp_path / "cmd"
    work.mkdir()
    for n, f in names.items():
        (work / n).write_bytes(Path(f).read_bytes())
    argv = shlex.split(command)[1:]
    argv[argv.index("--image") + 1] = str(work / "input.png")
    argv[argv.index("--mask") + 1] = str(work / "mask.png")
    argv[argv.index("--out") + 1] = str(work / "edit")
    r = cli(*argv)
    assert r.code == 0, r.err
    assert np.array_equal(out, np.asarray(Image.open(work / "edit" / "result.png").convert("RGB")))
    # outside the painted half the image is the input's, up to the tokenizer's reconstruction of the kept tokens
    assert not np.array_equal(out[:16], img[:16])


@pytest.mark.parametrize("args, message", [
    ((FVAR, "(none)", [], 2, 0), "pick at least one class"),
    ((FVAR, "(none)", ["7 · sneaker"], 2, -1), "seed must be ≥ 0"),
    ((FVAR, "(none)", ["sneakr"], 2, 0), "unknown class 'sneakr'"),
])
def test_bad_generate_requests_are_messages(client, args, message):
    with pytest.raises(Exception, match=message):
        client.predict(*args, *DEFAULTS, api_name="/generate")
    assert len(client.predict(FVAR, "(none)", ["0 · t shirt top"], 1, 0, *DEFAULTS, api_name="/generate")[1]) == 1


def test_images_per_class_are_bounded(server):
    studio, _ = server
    from fvar_core.errors import UserError

    with pytest.raises(UserError, match="images per class must be 1…16"):
        next(studio.generate(FVAR, ["7 · sneaker"], 17, 0, {}))


def test_bad_edit_requests_are_messages(client, tmp_path):
    src = tmp_path / "x.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(src)
    empty = {"background": handle_file(str(src)), "layers": [], "composite": None}
    with pytest.raises(Exception, match="the mask is empty"):
        client.predict(FVAR, "unconditional", 0, empty, False, 0.6, api_name="/inpaint")
    with pytest.raises(Exception, match="no image"):
        client.predict(FVAR, "unconditional", 0, None, False, 0.6, api_name="/inpaint")
    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((4097, 4097, 3), np.uint8)).save(big)  # 16.8 MP, a small PNG file
    with pytest.raises(Exception, match="at most 16 megapixels"):
        client.predict(FVAR, "unconditional", 0, {"background": handle_file(str(big)), "layers": [],
                                                  "composite": None}, False, 0.6, api_name="/inpaint")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(Exception, match=r"^the upload is not an image fvar can read"):
        client.predict(FVAR, "unconditional", 0, {"background": handle_file(str(text)), "layers": [],
                                                  "composite": None}, False, 0.6, api_name="/inpaint")
    with pytest.raises(Exception, match=r"^the upload is not an image fvar can read"):
        client.predict(handle_file(str(text)), "zone-plate", "d16-256", "disk", "cosine", 1.5, api_name="/pyramid")
    # still serving
    fig, rows = client.predict(None, "zone-plate", "d16-256", "disk", "cosine", 1.5, api_name="/pyramid")
    assert Path(fig).is_file() and len(rows["data"]) == 10


def test_outpaint_equals_fvar_inpaint_outpaint(client, cli, tmp_path):
    src = tmp_path / "x.png"
    img = np.zeros((32, 32, 3), np.uint8)
    img[6:26, 10:22] = 200  # a bright garment-like block on black, as the release's data
    Image.fromarray(img).save(src)
    editor = {"background": handle_file(str(src)), "layers": [], "composite": None}
    _, result, command, files = client.predict(FVAR, "8 · bag", 1, editor, True, 0.5, api_name="/inpaint")
    assert "--outpaint --fit 0.5" in command and [Path(f).name for f in files] == ["input.png"]
    argv = shlex.split(command)[1:]
    argv[argv.index("--image") + 1] = files[0]
    argv[argv.index("--out") + 1] = str(tmp_path / "edit")
    r = cli(*argv)
    assert r.code == 0, r.err
    assert np.array_equal(np.asarray(Image.open(result).convert("RGB")),
                          np.asarray(Image.open(tmp_path / "edit" / "result.png").convert("RGB")))


def test_the_cli_refuses_bad_auth_and_says_how_to_install_gradio(cli, monkeypatch):
    r = cli("studio", "--auth", "nopassword")
    assert r.code == 2 and "--auth takes user:password" in r.err
    import builtins

    real = builtins.__import__

    def no_gradio(name, *a, **k):
        if name == "gradio":
            raise ImportError("no gradio")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_gradio)
    r = cli("studio")
    lines = [ln for ln in r.err.splitlines() if ln.strip()]
    assert r.code == 2 and len(lines) == 1 and "pip install 'fvar[studio]'" in lines[0]


def test_the_model_tab_reads_a_run_folder(tmp_path_factory):
    """A run folder's card, preset and classes; its curves drawn from metrics.jsonl, its sample grids."""
    import json as _json

    from fvar_studio.service import Studio
    from tests.test_sample_cli import tiny_runs_dir

    run = tiny_runs_dir(tmp_path_factory) / "x"
    with (run / "metrics.jsonl").open("w") as f:
        for step in range(1, 6):
            f.write(_json.dumps({"step": step, "loss": 5.0 / step}) + "\n")
    (run / "samples").mkdir(exist_ok=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(run / "samples" / "step-0000001.png")
    studio = Studio([(str(run), None)], device="cpu")
    (name,) = studio.pipes
    info = studio.model_info(name)
    assert "tiny-64" in info["preset"] and len(info["classes"]) == studio.pipe(name).num_classes
    assert info["curves"] is not None and Path(info["curves"]).is_file()
    assert [Path(g).name for g in info["grids"]] == ["step-0000001.png"]


def test_an_official_checkpoint_offers_the_imagenet_names(tmp_path):
    """Official-format files (the fixture's keyed depth-2 VAR and ch-32 VQ-VAE, 1,000 classes): the
    class list is ImageNet's, a class found by name samples, and the printed command names the files."""
    import torch

    from fvar_studio.service import Studio
    from tests.test_sampler import keyed_tokenizer, load_manifest, load_ref
    from tests.test_transformer_compat import build_keyed_model

    var_pth, vae_pth = tmp_path / "var_dev.pth", tmp_path / "vae_dev.pth"
    torch.save(build_keyed_model(load_manifest()).official_state_dict(), var_pth)
    torch.save(keyed_tokenizer(load_ref()).official_state_dict(), vae_pth)
    studio = Studio([(str(var_pth), str(vae_pth))], device="cpu")
    (name,) = studio.pipes
    choices = studio.class_choices(name)
    assert len(choices) == 1000 and choices[207] == "207 · golden retriever"
    *_, done = studio.generate(name, ["golden retriever"], 1, 0, {"top_k": 1})
    assert len(done.images) == 1 and done.images[0].size == (256, 256)
    assert f"--ckpt {var_pth} --tokenizer {vae_pth} --class 207" in done.command


def test_an_upload_over_the_servers_limit_is_refused(client, tmp_path):
    big = tmp_path / "huge.png"
    big.write_bytes(b"\x89PNG" + b"\0" * (17 * 2 ** 20))  # 17 MB: past the server's 16 MB
    with pytest.raises(Exception, match="(?i)(size|large)"):
        client.predict(FVAR, "unconditional", 0, {"background": handle_file(str(big)), "layers": [],
                                                  "composite": None}, False, 0.6, api_name="/inpaint")
    assert len(client.predict(FVAR, "(none)", ["0 · t shirt top"], 1, 0, *DEFAULTS, api_name="/generate")[1]) == 1
