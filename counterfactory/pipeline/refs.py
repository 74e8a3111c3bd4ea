"""How a manifest names an image (``image_ref``): below ``inputs.py`` so that the driver's cut-out
bank (``cutout_bank.py``), which ``config.py`` builds, reads manifests without an import circle."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from urllib.request import url2pathname

_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class UnsupportedURI(ValueError):
    """An image named by a URI no worker can open: a reject with the source as written."""


def _image_ref(image: Any, root: Path, home: str | None = None) -> str:
    """An absolute path, or a URI kept as written: ``procedural://``, ``pkg:``, or an object
    store / web URI (``s3://``, ``gs://``, ``https://``, ...) that the workers read through
    ``storage.read_object``. ``file://`` URIs are local paths. ``~/`` is the planning driver's
    home, so a worker with another ``HOME`` resolves the same path."""
    if not isinstance(image, str) or not image:
        raise ValueError("'image' must be a non-empty string")
    if image.startswith(("procedural://", "pkg:")):
        return image
    m = _URI.match(image)
    if m and m.group(1).lower() == "file":
        parts = urlsplit(image)
        if parts.netloc not in ("", "localhost"):
            raise UnsupportedURI(f"{image}: a file:// URI names another host ({parts.netloc})")
        return str(Path(url2pathname(parts.path)))
    if m:
        return image
    p = Path(home, image[2:]) if home and image.startswith("~/") else Path(image).expanduser()
    return str(p if p.is_absolute() else (root / p))
