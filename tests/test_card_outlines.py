"""Issue 27 (s27audit3): the card's metric panels draw every variant's outline as one
LineCollection: the picture of one ``ax.stairs`` per variant (to anti-aliasing), for one artist
per panel."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from counterfactory import card as card_mod


def _panel(draw) -> np.ndarray:
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with matplotlib.rc_context(card_mod.PLOT_RC):
        fig = Figure(figsize=(4, 2.6))
        ax = fig.add_subplot(1, 1, 1)
        draw(ax)
        FigureCanvasAgg(fig)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=80, metadata=card_mod.PLOT_METADATA)
    return np.asarray(Image.open(buf).convert("RGB"))


def test_outlines_draw_what_stairs_draws():
    rng = np.random.default_rng(0)
    hists = [card_mod._hist(rng.normal(3, 1, 200).tolist()), card_mod._hist(rng.normal(5, 2, 50).tolist()),
             card_mod._hist([4.0] * 7), card_mod._hist([])]
    colours = ["C0", "C1", "C2", "C3"]

    def stairs(ax):
        for h, c in zip(hists, colours, strict=True):
            ax.stairs(h["counts"], h["edges"], color=c, linewidth=1.2)

    def outlines(ax):
        card_mod._outlines(ax, list(zip(hists, colours, strict=True)))

    a, b = _panel(stairs), _panel(outlines)
    assert a.shape == b.shape
    d = np.abs(a.astype(int) - b.astype(int)).max(axis=2)
    # the same lines, ticks and limits: the pictures differ only in a few anti-aliased edge pixels
    assert d.max() <= 24 and (d > 0).mean() < 0.01, (d.max(), (d > 0).mean())
