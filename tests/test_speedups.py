"""The training-free sampling speed-ups (fvar_core/sample/speedups.py): off or set to a no-op they give
the default sampler's tokens bit for bit; on, they change tokens only from the scale they start at;
draft-and-refine refuses a refiner of another token space; the KV budget allocates what it claims."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from fvar_core.config import ModelConfig, SampleConfig, TokenizerConfig
from fvar_core.errors import UserError
from fvar_core.models.tokenizer import Tokenizer
from fvar_core.models.transformer import VAR
from fvar_core.presets import load_preset
from fvar_core.sample.sampler import sample_batch
from fvar_core.sample.speedups import fill_pruned, kept_tokens, kv_capacity, kv_keeps

PN = (1, 2, 3, 4, 6, 8)  # the release's schedule
LABELS = torch.tensor([0, 3, 7, 9, 1, 5])
SEEDS = [11, 12, 13, 14, 15, 16]


def _var(depth: int, width: int, seed: int, patch_nums=PN) -> VAR:
    torch.manual_seed(seed)
    cfg = ModelConfig(depth=depth, width=width, num_heads=2, num_classes=10, drop_path=0.0, init_adaln_gamma=0.5,
                      init_head=1.0)  # sharp, context-dependent logits: a changed context shows in the tokens
    return VAR(cfg, patch_nums, 64, 8).eval()


@pytest.fixture(scope="module")
def models():
    tok = Tokenizer(TokenizerConfig(vocab_size=64, alias_vocab_size=0, z_channels=8, ch=32, num_res_blocks=1),
                    PN).eval()
    return _var(2, 64, 0), _var(1, 32, 1), tok


def _tokens(var, tok, refiner=None, **options):
    s = SampleConfig(cfg=1.5, top_k=20, top_p=0.9, **options)
    return sample_batch(var, tok, LABELS, SEEDS, s, decode=False, refiner=refiner).tokens


def _first_change(a, b) -> int:
    """Index of the first scale whose tokens differ (len(a) if none)."""
    return next((k for k, (x, y) in enumerate(zip(a, b)) if not torch.equal(x, y)), len(a))


@pytest.mark.parametrize("official", [False, True])
def test_no_op_settings_give_the_default_tokens_bit_for_bit(models, official):
    var, _, tok = models
    rng = {"rng": "official"} if official else {}
    base = _tokens(var, tok, **rng)
    K = len(PN)
    for options in ({"cfg_scales": K}, {"kv_budget": (1, K)}, {"prune": {6: 0.01, 8: 0.001}},
                    {"prune": {8: 0.0}}, {"cfg_scales": K, "kv_budget": (K, 0), "prune": {4: 0.01}}):
        got = _tokens(var, tok, **options, **rng)
        assert _first_change(base, got) == K, options
    # the same model as its own refiner reads the same context: the same tokens
    twin = copy.deepcopy(var)
    assert _first_change(base, _tokens(var, tok, refiner=twin, refine_from=2, **rng)) == K


@pytest.mark.parametrize("options, starts", [
    ({"cfg_scales": 3}, 3),                        # the null half dropped after scale 2
    ({"prune": {6: 0.5}}, 4),                      # pn 6 is scale 4
    ({"prune": {8: 0.75}}, 5),
    ({"kv_budget": (1, 1)}, 3),                    # scale 3 is the first that loses one (scale 1)
    ({"kv_budget": (2, 1)}, 4),
    ({"refine_from": 3}, 3),
])
def test_an_option_changes_tokens_only_from_its_scale(models, options, starts):
    var, small, tok = models
    base = _tokens(var, tok)
    got = _tokens(var, tok, refiner=small if "refine_from" in options else None, **options)
    assert _first_change(base, got) == starts, options


def test_options_compose(models):
    var, small, tok = models
    base = _tokens(var, tok)
    got = _tokens(var, tok, refiner=small, refine_from=3, cfg_scales=4, prune={8: 0.5}, kv_budget=(2, 2))
    assert _first_change(base, got) == 3
    assert [t.shape for t in got] == [t.shape for t in base]  # every position still gets a token
    assert all(int(t.min()) >= 0 and int(t.max()) < 64 for t in got)


def test_pruning_keeps_the_farthest_tokens_and_fills_the_rest_from_the_previous_scale():
    x = torch.zeros(1, 9, 2)
    x[0, [1, 5, 7], 0] = torch.tensor([3.0, -2.0, 1.0])  # three tokens away from the (near-zero) mean
    assert kept_tokens(x, 2 / 3).tolist() == [[1, 5, 7]]
    assert kept_tokens(x, 0.99).tolist() == [[1]]  # at least one token stays
    prev = torch.arange(4.0).view(1, 4, 1)  # a 2×2 map, one channel
    h = fill_pruned(torch.full((1, 2, 1), -9.0), torch.tensor([[0, 8]]), prev, 3)
    assert h.shape == (1, 9, 1)
    assert h[0, 0, 0] == -9 and h[0, 8, 0] == -9  # run positions keep their states
    assert h[0, 4, 0] == pytest.approx(1.5)  # the centre of the up-sampled 2×2 map: its mean


def test_draft_and_refine_refuses_another_token_space(models):
    var, _, tok = models
    other = _var(1, 32, 2, patch_nums=(1, 2, 4, 8))
    with pytest.raises(UserError, match=r"refiner's patch nums \(1, 2, 4, 8\) differ"):
        _tokens(var, tok, refiner=other, refine_from=2)
    torch.manual_seed(0)
    wider_vocab = VAR(ModelConfig(depth=1, width=32, num_heads=2, num_classes=10), PN, 128, 8).eval()
    with pytest.raises(UserError, match="refiner's vocab size 128 differ"):
        _tokens(var, tok, refiner=wider_vocab, refine_from=2)
    with pytest.raises(UserError, match="needs a refiner"):
        _tokens(var, tok, refine_from=2)
    with pytest.raises(UserError, match="refine-from must be a scale index in 1..5"):
        _tokens(var, tok, refiner=copy.deepcopy(var), refine_from=6)
    with pytest.raises(UserError, match=r"prune: scale\(s\) \[1, 5\] are not patch numbers"):
        _tokens(var, tok, prune={1: 0.5, 5: 0.5})


def test_bad_speedup_values_are_refused_by_the_config():
    with pytest.raises(ValueError, match=r"prune ratio for scale 8 must be in \[0, 1\)"):
        SampleConfig(prune={8: 1.0})
    with pytest.raises(ValueError, match="needs first ≥ 1"):
        SampleConfig(kv_budget=(0, 2))


def test_the_kv_budget_allocates_the_cache_it_claims(models, monkeypatch):
    """Measured: the bytes of the KV caches the sampler allocates, with and without a budget."""
    var, _, tok = models
    made = []
    real = VAR.new_kv_cache

    def spy(self, *a, **k):
        made.append(real(self, *a, **k))
        return made[-1]

    monkeypatch.setattr(VAR, "new_kv_cache", spy)
    sizes = [p * p for p in PN]  # 1 4 9 16 36 64, L = 130
    full, budget = {}, {}
    for out, opt in ((full, None), (budget, (1, 1))):
        made.clear()
        _tokens(var, tok, kv_budget=opt)
        (cache,) = made
        out["bytes"] = cache.k.untyped_storage().nbytes() + cache.v.untyped_storage().nbytes()
        out["capacity"] = cache.capacity
    # (1, 1): the largest scale set attended = scale 0 + scales 4 and 5 = 1 + 36 + 64 tokens
    assert budget["capacity"] == kv_capacity(PN, (1, 1)) == 101 and full["capacity"] == sum(sizes) == 130
    per_token = 2 * var.depth * 2 * len(LABELS) * var.width * 4  # k and v, blocks, 2B rows, width, fp32
    assert full["bytes"] == 130 * per_token and budget["bytes"] == 101 * per_token
    # at 1024 px (14 scales up to 64×64: 9,451 tokens) the same budget holds 6,401 (68 %)
    pn1024 = load_preset("d16-1024").patch_nums
    assert (kv_capacity(pn1024, None), kv_capacity(pn1024, (1, 1))) == (9451, 6401)
    keep = kv_keeps(2, 1, 5)
    assert [s for s in range(5) if keep(s)] == [0, 1, 4]


# ------------------------------------------------------------------ the CLI and Python, on the release
def test_fvar_sample_records_the_speedups_and_python_reproduces_the_images(cli, tmp_path):
    import fvar
    from PIL import Image

    out = tmp_path / "s"
    r = cli("sample", "--ckpt", "fmnist-32", "--class", "sneaker,bag", "--n", "2", "--seed", "5", "--cfg-scales", "3",
            "--prune", "8:0.5", "--kv-budget", "1,2", "--decode-precision", "bf16", "--out", str(out))
    assert r.code == 0, r.err
    side = json.loads((out / "samples.json").read_text())
    s = side["settings"]
    assert (s["cfg_scales"], s["prune"], s["kv_budget"], s["decode_precision"]) == (3, {"8": 0.5}, [1, 2], "bf16")
    assert side["refiner"] is None
    pipe = fvar.Pipeline.from_pretrained("fmnist-32", device="cpu")
    imgs = pipe(["sneaker", "bag"], n=2, seed=5, cfg_scales=3, prune={8: 0.5}, kv_budget=(1, 2),
                decode_precision="bf16", output="tensor")
    files = sorted(out.glob("0*.png"))
    assert len(files) == 4
    for f, img in zip(files, imgs):
        got = torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1)
        assert torch.equal(got, (img * 255).round().to(torch.uint8)), f.name


def test_draft_and_refine_from_the_cli_and_its_refusals(cli, tmp_path):
    out = tmp_path / "s"
    # the release as its own refiner: its tokenizer, so accepted, and the same images as without
    r = cli("sample", "--ckpt", "fmnist-32", "--class", "0", "--n", "2", "--refiner", "fmnist-32", "--refine-from", "4",
            "--out", str(out))
    assert r.code == 0, r.err
    plain = cli("sample", "--ckpt", "fmnist-32", "--class", "0", "--n", "2", "--out", str(tmp_path / "p"))
    assert plain.code == 0
    for a, b in zip(sorted(out.glob("0*.png")), sorted((tmp_path / "p").glob("0*.png"))):
        assert a.read_bytes() == b.read_bytes()
    assert json.loads((out / "samples.json").read_text())["refiner"]["path"].endswith("fmnist-32")
    for args, msg in (
        (["--refiner", "fmnist-32-var", "--refine-from", "4"], "was trained on another tokenizer"),
        (["--refine-from", "4"], "refine-from 4 needs a refiner model"),
        (["--prune", "8"], "--prune: '8' is not PATCH:RATIO"),
        (["--prune", "5:0.5"], r"prune: scale(s) [5] are not patch numbers"),
        (["--prune", "8:1.5"], "prune ratio for scale 8 must be in [0, 1)"),
        (["--kv-budget", "2"], "--kv-budget: '2' is not FIRST,RECENT"),
        (["--decode-precision", "fp8"], "decode-precision"),
    ):
        bad = tmp_path / "bad"
        r = cli("sample", "--ckpt", "fmnist-32", "--class", "0", "--n", "1", *args, "--out", str(bad))
        lines = [ln for ln in r.err.splitlines() if ln.strip()]
        assert r.code == 2 and len(lines) == 1 and msg in lines[0], (args, r.err)
        assert not list(bad.glob("*.png"))
