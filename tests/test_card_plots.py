"""The card's histogram PNGs (drawn with Pillow): ticks as matplotlib places them, sizes, content."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from counterfactory.pipeline import card as card_mod
from tests.conftest import REPO


def test_ticks_match_matplotlibs_default_locator():
    from matplotlib.ticker import MaxNLocator

    rng = np.random.default_rng(0)
    for _ in range(2000):
        span = float(rng.random() * 10.0 ** float(rng.integers(-3, 5))) + 1e-9
        lo = float(rng.choice([0.0, rng.normal() * 10.0 ** float(rng.integers(-3, 5))]))
        hi, nbins = lo + span, int(rng.integers(1, 10))
        want = [t for t in MaxNLocator(nbins, steps=[1, 2, 2.5, 5, 10]).tick_values(lo, hi)
                if lo - 1e-9 * span <= t <= hi + 1e-9 * span]
        got, _ = card_mod.nice_ticks(lo, hi, nbins)
        assert np.allclose(got, want, rtol=1e-9, atol=1e-9 * span), (lo, hi, nbins)


@pytest.mark.parametrize("lo,hi,nbins,labels", [
    (-0.55, 0.55, 9, ["\u22120.4", "\u22120.2", "0.0", "0.2", "0.4"]),
    (0.0, 15.75, 7, ["0.0", "2.5", "5.0", "7.5", "10.0", "12.5", "15.0"]),
    (0.0, 66.15, 7, ["0", "10", "20", "30", "40", "50", "60"]),
])
def test_tick_labels(lo, hi, nbins, labels):
    ticks, dec = card_mod.nice_ticks(lo, hi, nbins)
    assert [card_mod._tick_label(t, dec) for t in ticks] == labels


def _image(data: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(data))
    assert img.format == "PNG" and not img.text  # no software or date chunks
    return np.asarray(img.convert("RGB"))


def test_plots_have_the_figure_sizes_and_one_panel_per_metric():
    card = json.loads((REPO / "data_cards" / "demo" / "card.json").read_text())
    out = card_mod.render_plots(card)
    assert set(out) == set(card["plots"])
    mask = _image(out["plots/mask_area.png"])
    assert mask.shape == (240, 400, 3)
    metrics = _image(out["plots/metrics.png"])
    n = len(card["histograms"]) - 1
    assert metrics.shape == (round(2.6 * 80 * -(-n // 3)), 960, 3)
    bar = np.all(metrics == (0x4C, 0x72, 0xB0), axis=2)
    assert bar.any()
    # every panel with a sample shows bars: bar pixels in each of the grid's occupied cells
    rows = -(-n // 3)
    h, w = metrics.shape[0] / rows, metrics.shape[1] / 3
    for i in range(n):
        r, c = divmod(i, 3)
        assert bar[int(r * h):int((r + 1) * h), int(c * w):int((c + 1) * w)].any(), i


def test_plots_without_samples_or_metrics():
    empty = {"histograms": {"mask_area_frac": card_mod._hist([], np.linspace(0, 1, 21))}}
    out = card_mod.render_plots(empty)
    assert not np.all(_image(out["plots/metrics.png"]) == 255)  # says "no verification metrics"
    assert not np.any(np.all(_image(out["plots/mask_area.png"]) == (0x4C, 0x72, 0xB0), axis=2))



def test_tiny_and_degenerate_bins_draw():
    """A count far below the tallest bar still shows (one pixel); zero-width and constant data draw."""
    hs = {"mask_area_frac": {"n": 100001, "edges": [0.0, 0.5, 1.0], "counts": [100000, 1]},
          "x.const": card_mod._hist([3.0] * 5), "x.tiny": card_mod._hist([1e-9, 2e-9]),
          "x.huge": card_mod._hist([1e9, 3e9])}
    out = card_mod.render_plots({"histograms": hs})
    mask = np.all(_image(out["plots/mask_area.png"]) == (0x4C, 0x72, 0xB0), axis=2)
    cols = np.nonzero(mask.any(axis=0))[0]
    assert cols.min() < 200 < cols.max()  # both bins drawn, left and right of the middle
    assert _image(out["plots/metrics.png"]).shape[0] == round(2.6 * 80)
