"""Decode and resize a sample's pictures, masks and clips for a trainer (``counterfactory.loader``).

One geometry per sample: the original, its variants and its masks are fitted to the same box
(``pad``, ``crop`` or ``stretch``), pictures bilinear (area when shrinking clips) and masks
nearest, so pairs stay pixel-aligned and masks stay binary.
"""

from __future__ import annotations

import io
from typing import Any

import torch
from PIL import Image

# -- decoding ------------------------------------------------------------------------------


def image_part(sample: dict[str, Any], name: str) -> bytes | None:
    for ext in ("jpg", "png", "jpeg", "webp"):
        data = sample.get(f"{name}.{ext}")
        if data is not None:
            return data
    return None


def decode_image(data: bytes, mode: str, size: tuple[int, int] | None, fit: str = "stretch") -> Image.Image:
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert(mode)
    if size is not None and im.size != (size[1], size[0]):
        # masks stay binary: nearest neighbour; pictures bilinear (PIL antialiases when shrinking)
        resample = Image.Resampling.NEAREST if mode == "L" else Image.Resampling.BILINEAR
        im = _fit_image(im, size, fit, resample)
    return im


# -- aspect-preserving resize (one geometry for a sample's pictures and masks) -----------------
FITS = ("pad", "crop", "stretch")


def _fit_box(w: int, h: int, size: tuple[int, int], fit: str) -> tuple[int, int, int, int]:
    """(scaled width, scaled height, x offset, y offset) of a w x h picture in ``size``
    (height, width): ``pad`` fits it inside (centered, zero borders), ``crop`` covers the size
    and cuts the centre, ``stretch`` ignores the aspect ratio. It depends only on the source
    size, so an original, its variants and its masks get the same geometry (pairs stay aligned)."""
    th, tw = size
    if fit == "stretch":
        return tw, th, 0, 0
    scale = min(tw / w, th / h) if fit == "pad" else max(tw / w, th / h)
    sw, sh = max(1, round(w * scale)), max(1, round(h * scale))
    return sw, sh, (tw - sw) // 2, (th - sh) // 2


def _fit_image(im: Image.Image, size: tuple[int, int], fit: str, resample: Any) -> Image.Image:
    sw, sh, x, y = _fit_box(im.width, im.height, size, fit)
    im = im.resize((sw, sh), resample)
    if (sw, sh) == (size[1], size[0]):
        return im
    canvas = Image.new(im.mode, (size[1], size[0]), 0)
    canvas.paste(im, (x, y))  # pad: at an offset; crop: at a negative offset (the centre stays)
    return canvas


def resize_frames(frames: Any, size: tuple[int, int] | None, mask: bool, fit: str = "stretch") -> Any:
    """T x H x W (x 3) uint8 frames at ``size`` (height, width): masks nearest, pictures area
    when shrinking and bilinear when growing; ``fit`` as for pictures (``_fit_box``)."""
    import cv2
    import numpy as np

    if size is None or frames.shape[1:3] == tuple(size):
        return frames
    interp = cv2.INTER_NEAREST if mask else (
        cv2.INTER_AREA if size[0] * size[1] < frames.shape[1] * frames.shape[2] else cv2.INTER_LINEAR)
    sw, sh, x, y = _fit_box(frames.shape[2], frames.shape[1], size, fit)
    scaled = np.stack([cv2.resize(f, (sw, sh), interpolation=interp) for f in frames])
    if (sw, sh) == (size[1], size[0]):
        return scaled
    out = np.zeros((frames.shape[0], size[0], size[1], *frames.shape[3:]), dtype=frames.dtype)
    ys, xs = max(0, y), max(0, x)  # destination window
    yo, xo = max(0, -y), max(0, -x)  # source window (crop)
    hh, ww = min(sh - yo, size[0] - ys), min(sw - xo, size[1] - xs)
    out[:, ys:ys + hh, xs:xs + ww] = scaled[:, yo:yo + hh, xo:xo + ww]
    return out


def to_tensor(im: Image.Image, mask: bool) -> torch.Tensor:
    t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    t = t.view(im.height, im.width, len(im.getbands())).permute(2, 0, 1)
    return (t > 127).float() if mask else t.float().div_(255.0)
