"""Exports in the layouts four papers' own code reads (``counterfactory export --format NAME``),
for versions made with the matching recipe in ``configs/recipes/``.

- ``defacto``: DeFacto's training folders: ``N/original.jpg``, ``N/original_smask.jpg`` (the
  evidence masked: ``blackout``), ``N/original_rmask.jpg`` (an equal-area control region:
  ``random_mask``), ``boxes.txt``, ``sboxes.txt``, ``outside_boxes.txt``, ``random_boxes.txt``
  (one ``x0 y0 x1 y1`` box per line), ``question.txt``, ``answer.txt``; plus ``defacto.jsonl``
  with the answer each image should get (the abstention on the masked one).
- ``beaf``: ``beaf_qna.json`` as BEAF's ``beaf_metric.py`` reads it (``id``, ``image``,
  ``question``, ``orig_img``, ``removed_q``, ``gt``), originals ``images/STEM.jpg`` and each
  removal ``images/STEM_NN.png`` (its metric finds the original by ``name[:-7] + ".jpg"``).
- ``popev2``: ``popev2.jsonl`` rows ``normal_image``, ``counterfactual_image``, ``question``,
  ``normal_label``, ``counterfactual_label``, ``target_object`` (existence questions, removal).
- ``countercurate``: ``train_countercurate.csv``, tab-separated ``captions``, ``images``,
  ``neg_captions``, ``neg_images`` as CounterCurate's CLIP ``CsvDataset`` reads it: the flip
  (left/right swapped) and count (instances removed) pairs with captions from the answers.

Only questions and variants a format can express are written; the rest are counted as skipped
in the export's ``counterfactory-export.json``.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

FORMATS = ("defacto", "beaf", "popev2", "countercurate")
YES_NO = ("yes", "no")


def _png(data: bytes) -> bytes:
    """The picture re-encoded as PNG (lossless from the decoded pixels; no metadata)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _box_of(mask_png: bytes) -> list[int] | None:
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(mask_png)) as im:
        m = np.asarray(im.convert("L")) > 0
    if not m.any():
        return None
    ys, xs = np.nonzero(m)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def _boxes(lines: list[list[float]]) -> str:
    return "".join(" ".join(str(int(round(v))) for v in b) + "\n" for b in lines)


def write(fmt: str, samples: Iterator[tuple[dict[str, Any], dict[str, bytes]]], out: Path,
          progress: Callable[[int], None] | None, abstain: str) -> dict[str, int]:
    return {"defacto": _defacto, "beaf": _beaf, "popev2": _popev2, "countercurate": _countercurate}[fmt](
        samples, out, progress, abstain)


def _defacto(samples, out: Path, progress, abstain: str) -> dict[str, int]:
    n = skipped = 0
    rows = []
    for done, (doc, parts) in enumerate(samples, 1):
        if progress:
            progress(done)
        if not {"blackout", "random_mask"} <= set(doc["variants"]):
            skipped += 1
            continue
        ext = next(p for p in sorted(parts) if p.startswith("orig.")).split(".", 1)[1]
        evidence = [i["box"] for i in doc["instances"] if i.get("box")]
        for q in doc["qa"]:
            n += 1
            d = out / str(n)
            d.mkdir()
            (d / f"original.{ext}").write_bytes(parts[f"orig.{ext}"])
            (d / f"original_smask.{ext}").write_bytes(parts[f"blackout.{ext}"])
            (d / f"original_rmask.{ext}").write_bytes(parts[f"random_mask.{ext}"])
            rbox = _box_of(parts["control_mask.png"]) if "control_mask.png" in parts else None
            (d / "boxes.txt").write_text(_boxes(evidence))  # the boxes the sample annotates
            (d / "sboxes.txt").write_text(_boxes(evidence))
            (d / "outside_boxes.txt").write_text(_boxes([rbox] if rbox else []))
            (d / "random_boxes.txt").write_text(_boxes([rbox] if rbox else []))
            (d / "question.txt").write_text(q["question"] + "\n")
            (d / "answer.txt").write_text(str(q["answers"]["orig"]) + "\n")
            rows.append({"folder": str(n), "key": doc["key"], "question": q["question"], "kind": q["kind"],
                         "answer_original": q["answers"]["orig"], "answer_smask": q["answers"].get("blackout", abstain),
                         "answer_rmask": q["answers"].get("random_mask")})
    (out / "defacto.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    return {"records": n, "skipped_samples": skipped}


def _beaf(samples, out: Path, progress, abstain: str) -> dict[str, int]:
    (out / "images").mkdir()
    rows: list[dict[str, Any]] = []
    skipped = 0
    for done, (doc, parts) in enumerate(samples, 1):
        if progress:
            progress(done)
        exist = [q for q in doc["qa"] if q["kind"] == "existence"
                 and str(q["answers"]["orig"]) in YES_NO and str(q["answers"].get("remove")) in YES_NO]
        if "remove" not in doc["variants"] or not exist:
            skipped += 1
            continue
        ext = next(p for p in sorted(parts) if p.startswith("orig.")).split(".", 1)[1]
        stem = doc["key"]
        (out / "images" / f"{stem}.jpg").write_bytes(parts[f"orig.{ext}"] if ext == "jpg" else _jpg(parts[f"orig.{ext}"]))
        (out / "images" / f"{stem}_00.png").write_bytes(_png(parts[f"remove.{ext}"]))
        removed = set(doc.get("edits", {}).get("remove", {}).get("affects") or doc["targets"])
        for image, is_orig in ((f"{stem}.jpg", True), (f"{stem}_00.png", False)):
            for q in exist:
                rows.append({"id": len(rows), "image": image, "question": q["question"], "orig_img": is_orig,
                             "removed_q": bool(set(q.get("targets") or doc["targets"]) & removed),
                             "gt": str(q["answers"]["orig" if is_orig else "remove"])})
    (out / "beaf_qna.json").write_text(json.dumps(rows) + "\n")
    return {"records": len(rows), "skipped_samples": skipped}


def _jpg(data: bytes) -> bytes:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _popev2(samples, out: Path, progress, abstain: str) -> dict[str, int]:
    (out / "images").mkdir()
    rows = []
    skipped = 0
    for done, (doc, parts) in enumerate(samples, 1):
        if progress:
            progress(done)
        ext = next(p for p in sorted(parts) if p.startswith("orig.")).split(".", 1)[1]
        qs = [q for q in doc["qa"] if q["kind"] == "existence" and "remove" in doc["variants"]
              and str(q["answers"]["orig"]) in YES_NO and str(q["answers"].get("remove")) in YES_NO]
        if not qs:
            skipped += 1
            continue
        normal, cf = f"images/{doc['key']}.{ext}", f"images/{doc['key']}_counterfactual.{ext}"
        (out / normal).write_bytes(parts[f"orig.{ext}"])
        (out / cf).write_bytes(parts[f"remove.{ext}"])
        for q in qs:
            rows.append({"normal_image": normal, "counterfactual_image": cf, "question": q["question"],
                         "normal_label": str(q["answers"]["orig"]), "counterfactual_label": str(q["answers"]["remove"]),
                         "target_object": ", ".join(q.get("targets") or doc["targets"])})
    (out / "popev2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"records": len(rows), "skipped_samples": skipped}


def _caption(kind: str, target: str, answer: str) -> str | None:
    if kind == "position" and answer in ("left", "right"):
        return f"The {target} is on the {answer}."
    if kind == "count" and answer.isdigit():
        n = int(answer)
        return f"There {'is' if n == 1 else 'are'} {n} {target}{'' if n == 1 else 's'} in the image."
    return None


def _countercurate(samples, out: Path, progress, abstain: str) -> dict[str, int]:
    (out / "images").mkdir()
    rows = []
    skipped = 0
    for done, (doc, parts) in enumerate(samples, 1):
        if progress:
            progress(done)
        ext = next(p for p in sorted(parts) if p.startswith("orig.")).split(".", 1)[1]
        before = len(rows)
        for v in ("flip", "count", "swap"):
            if v not in doc["variants"]:
                continue
            for q in doc["qa"]:
                a, b = str(q["answers"]["orig"]), str(q["answers"].get(v))
                target = ", ".join(q.get("targets") or doc["targets"])
                pos, neg = _caption(q["kind"], target, a), _caption(q["kind"], target, b)
                if pos is None or neg is None or pos == neg:
                    continue
                img, neg_img = f"images/{doc['key']}.orig.{ext}", f"images/{doc['key']}.{v}.{ext}"
                (out / img).write_bytes(parts[f"orig.{ext}"])
                (out / neg_img).write_bytes(parts[f"{v}.{ext}"])
                rows.append({"captions": pos, "images": img, "neg_captions": neg, "neg_images": neg_img})
        skipped += len(rows) == before
    with open(out / "train_countercurate.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["captions", "images", "neg_captions", "neg_images"], delimiter="\t",
                           lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return {"records": len(rows), "skipped_samples": skipped}
