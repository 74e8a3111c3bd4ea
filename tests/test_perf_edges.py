"""Edge cases of session 5's CPU-cost changes (issue 27, part s29robust): each test pins a case
where a faster path must give what the plain one gives, at the sizes where it broke."""

from __future__ import annotations

import numpy as np

from counterfactory.stages.shared import control_mask


def test_control_mask_on_a_large_image_mostly_kept_out_places_as_the_plain_path():
    """A 4000 x 3000 evidence over three quarters of the image: the 0/255 keepout's integral
    passes 2^31 (255 * 9 Mpx) and an int32 one wraps; OpenCV's saturating int32 subtract then
    missed free spots, so the uniform draw picked another one. The 0/1 keepout (evidence
    without a uint8 ``avoid``) cannot wrap: both paths must place the same control."""
    h, w = 3000, 4000
    ev = np.zeros((h, w), np.uint8)
    ev[:, : 3 * w // 4] = 255
    avoid = np.zeros((h, w), np.uint8)
    for seed in range(2):
        fast = control_mask(ev, np.random.default_rng(seed), 8, 8, avoid, area=200 * 200)
        plain = control_mask(ev, np.random.default_rng(seed), 8, 8, None, area=200 * 200)
        assert fast is not None and plain is not None
        assert np.array_equal(fast, plain), seed
        assert not (fast & ev).any()
