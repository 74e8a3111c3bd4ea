"""The run's cut-out bank for photo inserts (issue 31), made once in the driver when the run's
settings are made (``PipelineConfig.run_settings``): small references (category, source image,
polygons, the object's share of its image) read from the run's manifests or a folder of RGBA
cut-outs, bounded by ``MAX_BANK`` / ``MAX_PER_CATEGORY``. The insert that uses it is
``stages/cutouts.py`` (see its docstring); this half reads inputs, so it lives in the pipeline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from counterfactory.pipeline.refs import _image_ref
from counterfactory.stages.cutouts import MAX_BANK, MAX_LINES, MAX_PER_CATEGORY, MIN_SIDE
from counterfactory.storage import is_remote

MAX_SOURCE_BYTES = 256 << 20  # an image file larger than this gives no cut-out


def _polygons(o: dict[str, Any]) -> list[list[list[float]]]:
    if isinstance(o.get("polygon"), list) and o["polygon"]:
        return [o["polygon"]]
    polys = o.get("polygons")
    return [p for p in polys if isinstance(p, list) and p] if isinstance(polys, list) else []


def _frame_size(ref: str) -> tuple[int, int] | None:
    """(width, height) of a local or ``pkg:`` image from its header, None when unreadable."""
    from PIL import Image

    from counterfactory.stages.shared import local_source, source_file_size

    try:
        path = local_source(ref)
        # the driver plans; it never blocks on a FIFO or reads a device (/dev/zero) or a huge file
        source_file_size(path, MAX_SOURCE_BYTES)
        with Image.open(path) as im:
            w, h = im.size
            orient = int(im.getexif().get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001 - a missing or undecodable file simply gives no cut-out
        return None
    return (h, w) if orient in (5, 6, 7, 8) else (w, h)


def _manifest_cutouts(path: Path, root: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    try:
        fh = path.open("rb")  # a line that is not UTF-8 is the planner's reject, not a crash here
    except OSError:
        return out
    with fh:
        for i, raw in enumerate(fh):
            if i >= MAX_LINES:
                break
            try:
                line = json.loads(raw.decode("utf-8"))
                ref = _image_ref(line.get("image"), root)
            except Exception:  # noqa: BLE001 - the input planner reports bad lines; no cut-out
                continue
            if not isinstance(line, dict) or is_remote(ref) or ref.startswith("procedural://"):
                continue
            objs = [o for o in line.get("objects") or [] if isinstance(o, dict) and o.get("category")
                    and _polygons(o)]
            size = _frame_size(ref) if objs else None
            if size is None:
                continue
            w, h = size
            for o in objs:
                polys = _polygons(o)
                try:
                    pts = np.concatenate([np.asarray(p, np.float64).reshape(-1, 2) for p in polys])
                except (ValueError, TypeError, OverflowError):  # a 400-digit coordinate: ingest's bad_polygon
                    continue
                if not np.isfinite(pts).all():
                    continue
                x0, y0 = pts.min(axis=0)
                x1, y1 = pts.max(axis=0)
                if x0 <= 1 or y0 <= 1 or x1 >= w - 1 or y1 >= h - 1:
                    continue  # cut off by the frame
                if min(x1 - x0, y1 - y0) < MIN_SIDE:
                    continue
                area = sum(float(cv2.contourArea(np.asarray(p, np.float32).reshape(-1, 1, 2))) for p in polys)
                out.append({"category": str(o["category"]).strip(), "source": ref, "polygons": polys,
                            "area_frac": round(area / (w * h), 6)})
    return out


def _folder_cutouts(folder: Path) -> list[dict[str, Any]]:
    return [{"category": p.parent.name, "source": str(p), "polygons": None, "area_frac": None}
            for p in sorted(folder.glob("*/*.png"))]


def build_bank(cfg: Any) -> tuple[dict[str, Any], ...]:
    """The run's cut-out bank (see the module's docstring): from the edit stage's ``cutouts``
    parameter and the run's inputs; empty when the edit backend has no such parameter."""
    try:
        edit = cfg.stage("edit")
    except KeyError:
        return ()
    src = edit.params.get("cutouts") if edit.backend == "default" else None
    if not src:
        return ()
    found: list[dict[str, Any]] = []
    if src == "run":
        for inp in cfg.inputs:
            if getattr(inp, "kind", None) != "manifest":
                continue
            path = cfg.path(inp.path)
            root = cfg.path(inp.images_root) if inp.images_root else path.parent
            found += _manifest_cutouts(path, root)
    else:
        found = _folder_cutouts(cfg.path(src))
    bank, per = [], {}
    for c in found:
        if per.get(c["category"], 0) < MAX_PER_CATEGORY and len(bank) < MAX_BANK:
            per[c["category"]] = per.get(c["category"], 0) + 1
            bank.append(c)
    return tuple(bank)
