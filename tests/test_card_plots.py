"""The card's histogram PNGs (matplotlib Agg): one panel per metric with every variant overlaid,
figure sizes, no metadata chunks, byte-identical on a rerun, and degenerate data still drawn."""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

from counterfactory import card as card_mod
from tests.conftest import REPO

BLUE = (0x4C, 0x72, 0xB0)  # the mask-area fill


def _image(data: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(data))
    assert img.format == "PNG" and "Software" not in img.info  # no matplotlib version in the bytes
    return np.asarray(img.convert("RGB"))


def _coloured(img: np.ndarray) -> np.ndarray:
    """Pixels that are neither grey nor white: the histogram lines and fills."""
    a = img.astype(int)
    return (a.max(axis=2) - a.min(axis=2)) > 40


def test_one_panel_per_metric_with_every_variant():
    card = json.loads((REPO / "data_cards" / "demo" / "card.json").read_text())
    out = card_mod.render_plots(card)
    assert set(out) == set(card["plots"])
    assert out == card_mod.render_plots(card), "plots must be byte-identical on a rerun"
    mask = _image(out["plots/mask_area.png"])
    assert mask.shape == (240, 400, 3) and np.all(mask == BLUE, axis=2).any()
    constant = card_mod.constant_metrics(card["histograms"])
    metrics_names = {k.partition(".")[2] for k in card["histograms"] if k != "mask_area_frac"} - set(constant)
    rows = -(-len(metrics_names) // 3)
    metrics = _image(out["plots/metrics.png"])
    assert metrics.shape == (round(2.6 * 80 * rows), 960, 3)
    colour = _coloured(metrics)
    h, w = metrics.shape[0] / rows, metrics.shape[1] / 3
    for i in range(len(metrics_names)):  # every occupied grid cell draws something coloured
        r, c = divmod(i, 3)
        assert colour[int(r * h):int((r + 1) * h), int(c * w):int((c + 1) * w)].any(), i


def test_plots_without_samples_or_metrics():
    empty = {"histograms": {"mask_area_frac": card_mod._hist([], np.linspace(0, 1, 21))}}
    out = card_mod.render_plots(empty)
    assert not np.all(_image(out["plots/metrics.png"]) == 255)  # says "no verification metrics"
    assert not np.all(_image(out["plots/mask_area.png"]) == BLUE, axis=2).any()


def test_tiny_and_degenerate_bins_draw():
    """A bin far below the tallest still renders; constant, tiny and huge values draw without error."""
    hs = {"mask_area_frac": {"n": 100001, "edges": [0.0, 0.5, 1.0], "counts": [100000, 1]},
          "x.const": card_mod._hist([3.0] * 5), "x.tiny": card_mod._hist([1e-9, 2e-9]),
          "y.huge": card_mod._hist([1e9, 3e9])}
    out = card_mod.render_plots({"histograms": hs})
    mask = np.all(_image(out["plots/mask_area.png"]) == BLUE, axis=2)
    assert mask.any()
    metrics = _image(out["plots/metrics.png"])
    assert metrics.shape[0] == round(2.6 * 80) and _coloured(metrics).any()


def test_constant_metrics_are_named_not_plotted():
    """A metric with one value everywhere (outside_changed_frac is 0 by design) is a sentence,
    not a one-bar histogram; every plotted metric has an axis label with its unit."""
    hs = {"mask_area_frac": card_mod._hist([0.1, 0.2], np.linspace(0, 1, 21)),
          "remove.outside_changed_frac": card_mod._hist([0.0] * 4), "blackout.outside_changed_frac": card_mod._hist([0.0] * 3),
          "flip.mirror_exact": card_mod._hist([1.0] * 2), "remove.inside_mad": card_mod._hist([10.0, 40.0, 90.0]),
          "blackout.inside_mad": card_mod._hist([50.0, 50.0])}
    assert card_mod.constant_metrics(hs) == {"mirror_exact": 1.0, "outside_changed_frac": 0.0}
    one = card_mod.render_plots({"histograms": hs})["plots/metrics.png"]
    assert _image(one).shape[:2] == (round(2.6 * 80), 960)  # one row: inside_mad alone
    only_constant = {k: v for k, v in hs.items() if "inside_mad" not in k}
    assert not _coloured(_image(card_mod.render_plots({"histograms": only_constant})["plots/metrics.png"])).any()
    assert {"inside_mad", "outside_changed_frac", "mask_area_frac"} <= set(card_mod.METRIC_UNITS)
    assert all("(" in u for u in card_mod.METRIC_UNITS.values())  # every label names its unit


def test_every_metric_of_the_demo_card_has_its_axis_label():
    """A panel's x axis names what it measures and its unit (the metric's key otherwise)."""
    card = json.loads((REPO / "data_cards" / "demo" / "card.json").read_text())
    metrics = {k.partition(".")[2] or k for k in card["histograms"]}
    assert metrics and metrics <= set(card_mod.METRIC_UNITS), sorted(metrics - set(card_mod.METRIC_UNITS))
