"""Spectral alias analysis: the focus pyramid leaks far less supra-Nyquist energy than area-down."""
import json
import math

import pytest
import torch

from fvar_core.focus.alias import ScaleAlias, alias_report
from fvar_core.config import PyramidConfig
from fvar_core.errors import UserError
from fvar_core.focus.testimages import resolution_chart, zone_plate

PN = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


@pytest.fixture(scope="module")
def zone_report():
    return alias_report(zone_plate(256), PyramidConfig(), PN, 256)


def test_report_has_one_entry_per_scale(zone_report):
    assert [r.scale for r in zone_report] == list(range(1, 11))
    assert [r.size for r in zone_report] == [16, 32, 48, 64, 80, 96, 128, 160, 208, 256]
    assert all(isinstance(r, ScaleAlias) for r in zone_report)


def test_focus_leaks_at_least_20_db_less_wherever_rho_is_a_pixel(zone_report):
    # docs/design.md §4: disk + area-down leaks 20–30 dB less than area-down alone where ρ_k ≥ 1 px.
    margins = [r.leak_db_area - r.leak_db_focus for r in zone_report if r.rho >= 1.0]
    assert len(margins) == 8
    assert min(margins) >= 20.0


def test_zone_plate_margins_match_the_prototype(zone_report):
    prototype = [21.0, 23.1, 29.4, 30.1, 30.7, 28.9, 23.6, 20.1]
    ours = [r.margin_db for r in zone_report[:8]]
    assert ours == pytest.approx(prototype, abs=0.15)
    assert zone_report[8].margin_db == pytest.approx(0.0, abs=1e-9)  # ρ = 0.36: identity PSF


def test_focus_keeps_no_more_passband_than_area(zone_report):
    for r in zone_report:
        assert 0.0 <= r.passband_focus <= r.passband_area + 1e-12 <= 1.0 + 1e-9


def test_last_scale_cannot_alias_and_serialises_as_none(zone_report):
    last = zone_report[-1]
    assert last.rho == 0.0 and math.isinf(last.leak_db_area) and last.margin_db == 0.0
    d = last.to_dict()
    assert d["leak_db_area"] is None and d["leak_db_focus"] is None
    assert d["passband_area"] == d["passband_focus"] == pytest.approx(1.0)
    json.dumps([r.to_dict() for r in zone_report], allow_nan=False)


def test_area_kernel_reports_identical_operators():
    rep = alias_report(resolution_chart(64), PyramidConfig(kernel="area"), (1, 2, 4), 64)
    for r in rep:
        assert r.margin_db == 0.0 and r.passband_area == r.passband_focus


def test_accepts_batches_and_constant_images():
    x = torch.stack([zone_plate(64), resolution_chart(64)])
    assert len(alias_report(x, PyramidConfig(rho_max=3.0), (1, 2, 4), 64)) == 3
    flat = alias_report(torch.full((3, 64, 64), 0.5), PyramidConfig(rho_max=3.0), (1, 2, 4), 64)
    assert all(r.to_dict()["leak_db_area"] is None and r.passband_focus == 1.0 for r in flat)


def test_wrong_size_and_latent_space_raise():
    with pytest.raises(ValueError, match="64×64"):
        alias_report(zone_plate(32), PyramidConfig(), (1, 2, 4), 64)
    with pytest.raises(UserError, match="latent"):
        alias_report(zone_plate(64), PyramidConfig(space="latent"), (1, 2, 4), 64)
