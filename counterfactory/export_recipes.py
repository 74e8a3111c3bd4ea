"""Exports in the layouts five papers' own code reads (``counterfactory export --format NAME``),
for versions made with the matching recipe in ``configs/recipes/`` (issue 29: each one was run
through that paper's own script; the export's ``README.md`` says how).

- ``pope``: POPE's question files (RUCAIBox/POPE ``evaluate.py``): ``DATASET_pope_random.json``,
  ``_popular.json``, ``_adversarial.json`` over the originals and ``_counterfactual.json`` over the
  removals, each one JSON object per line ``{question_id, image, text, label}``, images in
  ``images/``. Per original: up to 3 annotated categories ("yes") and as many absent ones ("no"),
  absent only where the annotation is exhaustive for that category (procedural scenes: all);
  the absent ones are drawn at random (``random``), the most frequent categories of the dataset
  (``popular``) or those that co-occur most with the image's own (``adversarial``), as POPE's
  three settings. The counterfactual file asks each removal about the removed object ("no") and
  about the image's other objects that the edit left intact ("yes"), so it scores alone.
- ``popev2``: the release's ``test.parquet`` (AoiDragon/POPEv2 ``prepare_popev2_hf_parquet.py``):
  ``example_id``, ``image_id`` (int64), ``target_object``, ``question``, ``counterfactual_image``,
  ``counterfactual_label``, ``normal_image``, ``normal_label``, the images as ``datasets.Image()``;
  one question per image pair; a README whose ``configs`` make ``load_dataset(DIR)`` read it.
- ``beaf``: ``beaf_qna.json`` as BEAF's ``beaf_metric.py`` reads it (``id``, ``image``,
  ``question``, ``orig_img``, ``removed_q``, ``gt``), originals ``images/STEM.jpg`` and each
  removal ``images/STEM_00.png`` (its metric finds the original by ``name[:-7] + ".jpg"``); every
  question is asked of both images: the removed object (``removed_q``), the objects left intact
  and absent ones (its InDecision metric counts answers that changed on those).
- ``defacto``: DeFacto's training folders: ``N/original.jpg``, ``N/original_smask.jpg`` (the
  evidence masked: ``blackout``), ``N/original_rmask.jpg`` (an equal-area control region:
  ``random_mask``), ``boxes.txt`` (every annotated box), ``sboxes.txt`` (the question's evidence),
  ``outside_boxes.txt`` (the other annotated boxes: task-irrelevant), ``random_boxes.txt`` (the
  control region), one ``x0 y0 x1 y1`` box per line, ``question.txt``, ``answer.txt``; plus
  ``defacto.jsonl`` with the answer each image should get (the abstention on the masked one).
- ``countercurate``: ``train_countercurate.csv``, tab-separated ``captions``, ``images``,
  ``neg_captions``, ``neg_images`` as CounterCurate's CLIP ``CsvDataset`` reads it (absolute image
  paths: OpenCLIP opens them from wherever training starts): the flip (left/right swapped) and
  count (instances removed) pairs with captions from the answers.

Only questions and variants a format can express are written; the rest are counted as skipped
in the export's ``counterfactory-export.json``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

FORMATS = ("pope", "popev2", "beaf", "defacto", "countercurate")
YES_NO = ("yes", "no")
POPE_SETTINGS = ("random", "popular", "adversarial")
POPE_PER_IMAGE = 3  # POPE asks about up to 3 ground-truth objects per image, and as many absent ones
INTACT_MAX_COVER = 0.1  # an object counts as left intact by an edit when at most this share of its box is edited
# DeFacto's text reward (grpo_defacto.py, accuracy_reward_text) gives -1 to any answer in which this
# pattern occurs on an evidence-intact image: such an answer can never be rewarded, so it is not written
DEFACTO_NEGATIVE = re.compile(r"unknown|no|none", re.IGNORECASE)


@dataclass
class Context:
    """What every layout may need besides the samples."""

    out: Path  # the folder written now (renamed onto ``final`` when complete)
    final: Path  # where the export will be: absolute paths point there
    name: str  # the dataset's name (POPE's files are named by it)
    abstain: str
    progress: Callable[[int], None] | None = None


def write(fmt: str, samples: Iterator[tuple[dict[str, Any], dict[str, bytes]]], ctx: Context) -> dict[str, int]:
    return {"pope": _pope, "popev2": _popev2, "beaf": _beaf, "defacto": _defacto,
            "countercurate": _countercurate}[fmt](samples, ctx)


# -- shared helpers ----------------------------------------------------------------------------
def _png(data: bytes) -> bytes:
    """The picture re-encoded as PNG (lossless from the decoded pixels; no metadata)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _jpg(data: bytes) -> bytes:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _mask(png: bytes) -> Any:
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        return np.asarray(im.convert("L")) > 0


def _box_of(mask_png: bytes) -> list[int] | None:
    import numpy as np

    m = _mask(mask_png)
    if not m.any():
        return None
    ys, xs = np.nonzero(m)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def _boxes(lines: list[list[float]]) -> str:
    return "".join(" ".join(str(int(round(v))) for v in b) + "\n" for b in lines)


def _ext(parts: dict[str, bytes]) -> str:
    return next(p for p in sorted(parts) if p.startswith("orig.")).split(".", 1)[1]


def _edit_mask(parts: dict[str, bytes], variant: str) -> bytes:
    return parts.get(f"{variant}_mask.png") or parts["mask.png"]


def _ask(category: str) -> str:
    """POPE's question, word for word."""
    return f"Is there {'an' if category[:1].lower() in 'aeiou' else 'a'} {category} in the image?"


def _removal_questions(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The existence questions whose answer the removal turns from yes to no."""
    if "remove" not in doc["variants"]:
        return []
    return [q for q in doc["qa"] if q["kind"] == "existence"
            and str(q["answers"].get("orig")) == "yes" and str(q["answers"].get("remove")) == "no"]


def _annotated(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Every annotated object (category, box); an older version without them: the evidence."""
    return doc.get("annotated") or [{"category": i["category"], "box": i["box"]} for i in doc["instances"]]


def _intact(doc: dict[str, Any], parts: dict[str, bytes], variant: str) -> list[str]:
    """Categories present in the image, not the edit's target, every instance of which the edit
    left (almost) untouched: still "yes" on the edited image."""
    m = _mask(_edit_mask(parts, variant))
    h, w = m.shape
    touched = set(doc["targets"]) | set(doc.get("edits", {}).get(variant, {}).get("affects") or [])
    by_cat: dict[str, list[list[int]]] = {}
    for o in _annotated(doc):
        by_cat.setdefault(o["category"], []).append(o["box"])
    out = []
    for cat, boxes in sorted(by_cat.items()):
        if cat in touched:
            continue
        ok = True
        for b in boxes:
            x0, y0, x1, y1 = (max(0, min(int(round(v)), lim)) for v, lim in zip(b, (w, h, w, h), strict=True))
            area = max(0, x1 - x0) * max(0, y1 - y0)
            if area == 0 or m[y0:y1, x0:x1].sum() > INTACT_MAX_COVER * area:
                ok = False
                break
        if ok:
            out.append(cat)
    return out


def _absent_allowed(doc: dict[str, Any], category: str, present: set[str]) -> bool:
    """``category`` is truly absent: not annotated, and the annotation is exhaustive for it."""
    ex = doc.get("source", {}).get("exhaustive")
    return category not in present and (ex == "*" or (isinstance(ex, list) and category in ex))


def _rng(*parts: str) -> Any:
    import numpy as np

    return np.random.default_rng(int(hashlib.sha256("/".join(parts).encode()).hexdigest()[:15], 16))


def _write_readme(out: Path, title: str, body: str, front: dict[str, Any] | None = None) -> None:
    head = "---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n\n" if front else ""
    (out / "README.md").write_text(head + f"# {title}\n\n{body.strip()}\n")


# -- POPE --------------------------------------------------------------------------------------
@dataclass
class _Image:
    name: str
    doc: dict[str, Any]  # one sample of it (annotations and exhaustiveness are per image)
    present: set[str] = field(default_factory=set)


def _pope_negatives(img: _Image, setting: str, vocab: list[str], freq: Counter, cooc: dict[str, Counter],
                    n: int) -> list[str]:
    cands = [c for c in vocab if _absent_allowed(img.doc, c, img.present)]
    if setting == "random":
        rng = _rng("pope", setting, img.name)
        return [cands[i] for i in sorted(rng.permutation(len(cands))[:n])] if cands else []
    if setting == "popular":
        return sorted(cands, key=lambda c: (-freq[c], c))[:n]
    score = {c: sum(cooc[p][c] for p in img.present) for c in cands}  # adversarial: co-occurring
    return sorted(cands, key=lambda c: (-score[c], -freq[c], c))[:n]


def _pope_lines(rows: list[tuple[str, str, str]]) -> str:
    return "".join(json.dumps({"question_id": i, "image": image, "text": text, "label": label}) + "\n"
                   for i, (image, text, label) in enumerate(rows, 1))


def _pope(samples, ctx: Context) -> dict[str, int]:
    (ctx.out / "images").mkdir()
    images: dict[str, _Image] = {}
    cf_rows: list[tuple[str, str, str]] = []
    skipped = 0
    for done, (doc, parts) in enumerate(samples, 1):
        if ctx.progress:
            ctx.progress(done)
        ext = _ext(parts)
        src = str(doc["source"].get("sha256") or doc["key"])
        if src not in images:
            name = f"{src[:24]}.{ext}"
            (ctx.out / "images" / name).write_bytes(parts[f"orig.{ext}"])
            images[src] = _Image(name, doc, {o["category"] for o in _annotated(doc)})
        removed = _removal_questions(doc)
        if not removed:
            skipped += 1
            continue
        cf = f"{doc['key']}_remove.{ext}"
        (ctx.out / "images" / cf).write_bytes(parts[f"remove.{ext}"])
        cf_rows += [(cf, q["question"], "no") for q in removed]
        cf_rows += [(cf, _ask(c), "yes") for c in _intact(doc, parts, "remove")]
    freq: Counter = Counter()
    cooc: dict[str, Counter] = {}
    for img in images.values():
        freq.update(img.present)
        for p in img.present:
            cooc.setdefault(p, Counter()).update(img.present - {p})
    vocab = sorted(freq)
    counts: dict[str, int] = {}
    one_label = False
    for setting in POPE_SETTINGS:
        rows: list[tuple[str, str, str]] = []
        for img in images.values():
            pos = sorted(img.present)
            if len(pos) > POPE_PER_IMAGE:
                rng = _rng("pope", "positives", img.name)
                pos = [pos[i] for i in sorted(rng.permutation(len(pos))[:POPE_PER_IMAGE])]
            neg = _pope_negatives(img, setting, vocab, freq, cooc, len(pos))
            for i in range(max(len(pos), len(neg))):  # yes, no, yes, no ... as POPE's files
                rows += [(img.name, _ask(pos[i]), "yes")] if i < len(pos) else []
                rows += [(img.name, _ask(neg[i]), "no")] if i < len(neg) else []
        (ctx.out / f"{ctx.name}_pope_{setting}.json").write_text(_pope_lines(rows))
        counts[setting] = len(rows)
        one_label = one_label or len({label for _, _, label in rows}) < 2
    (ctx.out / f"{ctx.name}_pope_counterfactual.json").write_text(_pope_lines(cf_rows))
    counts["counterfactual"] = len(cf_rows)
    labels = Counter(label for _, _, label in cf_rows)
    one_label = one_label or len(labels) < 2
    warn = ("\n**A file above has one label only**: POPE's `evaluate.py` divides by zero on it for some "
            "answers. Absent objects are asked about only where the annotation is exhaustive (declare "
            "`exhaustive` in the manifest); the counterfactual file needs removals whose images hold "
            "other objects.\n" if one_label else "")
    _write_readme(ctx.out, f"{ctx.name}: POPE question files", f"""
One JSON object per line (`question_id`, `image`, `text`, `label`), as RUCAIBox/POPE's
`output/coco/coco_pope_*.json`; images in `images/` (give that folder as the image folder).

| file | questions | what |
|---|---|---|
| `{ctx.name}_pope_random.json` | {counts['random']} | per original: up to {POPE_PER_IMAGE} annotated objects (yes) and as many absent ones drawn at random |
| `{ctx.name}_pope_popular.json` | {counts['popular']} | the absent ones are the dataset's most frequent categories |
| `{ctx.name}_pope_adversarial.json` | {counts['adversarial']} | the absent ones co-occur most with the image's own objects |
| `{ctx.name}_pope_counterfactual.json` | {counts['counterfactual']} ({labels['yes']} yes, {labels['no']} no) | per removal: the removed object (no) and the objects the edit left intact (yes) |

An object is asked about as absent only where the annotation is exhaustive for its category.
Score answers (one JSON object per line with `answer`, in the question file's order) with POPE's
`evaluate.py` (set `ans_file` and `label_file`), or `counterfactory eval FILE --predictions ANSWERS`.
{warn}""")
    return {**counts, "skipped_samples": skipped}


# -- POPEv2 ------------------------------------------------------------------------------------
_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
_S = {"dtype": "string", "_type": "Value"}
POPEV2_FEATURES = {"example_id": _S, "image_id": {"dtype": "int64", "_type": "Value"}, "target_object": _S,
                   "question": _S, "counterfactual_image": {"_type": "Image"}, "counterfactual_label": _S,
                   "normal_image": {"_type": "Image"}, "normal_label": _S}
POPEV2_SCHEMA = pa.schema([("example_id", pa.string()), ("image_id", pa.int64()), ("target_object", pa.string()),
                           ("question", pa.string()), ("counterfactual_image", _IMAGE),
                           ("counterfactual_label", pa.string()), ("normal_image", _IMAGE),
                           ("normal_label", pa.string())])


def _popev2(samples, ctx: Context) -> dict[str, int]:
    rows = []
    skipped = 0
    for done, (doc, parts) in enumerate(samples, 1):
        if ctx.progress:
            ctx.progress(done)
        qs = _removal_questions(doc)
        if not qs:
            skipped += 1
            continue
        q = next((x for x in qs if x.get("source") == "template"), qs[0])  # one question per pair
        ext = _ext(parts)
        image_id = int(doc["key"][:15], 16)  # stable, unique per pair (the key hashes image and question)
        fname = f"{image_id:018d}.{ext}"
        rows.append({"example_id": f"{ctx.name}-{doc['key']}", "image_id": image_id,
                     "target_object": ", ".join(q.get("targets") or doc["targets"]), "question": q["question"],
                     "counterfactual_image": {"bytes": parts[f"remove.{ext}"], "path": f"images/{fname}"},
                     "counterfactual_label": "no",
                     "normal_image": {"bytes": parts[f"orig.{ext}"], "path": f"normal_images/{fname}"},
                     "normal_label": "yes"})
    schema = POPEV2_SCHEMA.with_metadata(
        {"huggingface": json.dumps({"info": {"features": POPEV2_FEATURES}}, sort_keys=True)})
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), ctx.out / "test.parquet", row_group_size=100)
    front = {"configs": [{"config_name": "default", "data_files": [{"split": "test", "path": "test.parquet"}]}],
             "dataset_info": {"features": [{"name": k, "dtype": "image" if v.get("_type") == "Image" else v["dtype"]}
                                           for k, v in POPEV2_FEATURES.items()]}}
    _write_readme(ctx.out, f"{ctx.name}: POPEv2 test split", f"""
The layout of the POPEv2 release (`test.parquet`, as AoiDragon/POPEv2's
`prepare_popev2_hf_parquet.py` writes it): {len(rows)} image pairs, one question each; the
images are embedded (`datasets.Image()`). Read it with
`datasets.load_dataset("{ctx.final}", split="test")`; score answers with
`counterfactory eval {ctx.final} --predictions ANSWERS.jsonl` (one line per answer:
`example_id`, `image` = normal or counterfactual, `answer`).
""", front)
    return {"test": len(rows), "skipped_samples": skipped}


# -- BEAF --------------------------------------------------------------------------------------
def _beaf(samples, ctx: Context) -> dict[str, int]:
    (ctx.out / "images").mkdir()
    kept: list[tuple[dict[str, Any], list[dict[str, Any]], list[str], set[str]]] = []
    vocab: set[str] = set()
    skipped = 0
    for done, (doc, parts) in enumerate(samples, 1):
        if ctx.progress:
            ctx.progress(done)
        present = {o["category"] for o in _annotated(doc)}
        vocab |= present
        removed = _removal_questions(doc)
        if not removed:
            skipped += 1
            continue
        ext = _ext(parts)
        stem = doc["key"]
        (ctx.out / "images" / f"{stem}.jpg").write_bytes(parts[f"orig.{ext}"] if ext == "jpg" else _jpg(parts[f"orig.{ext}"]))
        (ctx.out / "images" / f"{stem}_00.png").write_bytes(_png(parts[f"remove.{ext}"]))
        kept.append(({"key": stem, "source": doc["source"]}, removed, _intact(doc, parts, "remove"), present))
    rows: list[dict[str, Any]] = []
    for doc, removed, intact, present in kept:
        stem = doc["key"]
        absent = [c for c in sorted(vocab) if _absent_allowed(doc, c, present)]
        rng = _rng("beaf", stem)
        absent = [absent[i] for i in sorted(rng.permutation(len(absent))[:max(1, len(intact))])] if absent else []
        # (question, removed_q, answer before, answer after)
        qs = [(q["question"], True, "yes", "no") for q in removed]
        qs += [(_ask(c), False, "yes", "yes") for c in intact] + [(_ask(c), False, "no", "no") for c in absent]
        seen: set[str] = set()
        qs = [q for q in qs if not (q[0] in seen or seen.add(q[0]))]
        for image, is_orig in ((f"{stem}.jpg", True), (f"{stem}_00.png", False)):
            for text, removed_q, before, after in qs:
                rows.append({"id": len(rows), "image": image, "question": text, "orig_img": is_orig,
                             "removed_q": removed_q, "gt": before if is_orig else after})
    (ctx.out / "beaf_qna.json").write_text(json.dumps(rows) + "\n")
    n_removed = sum(1 for r in rows if not r["orig_img"] and r["removed_q"])
    n_other = sum(1 for r in rows if not r["orig_img"] and not r["removed_q"])
    _write_readme(ctx.out, f"{ctx.name}: BEAF questions", f"""
`beaf_qna.json`: {len(rows)} questions ({n_removed} about a removed object on its edited image,
{n_other} about objects left intact or absent on an edited image: InDecision's denominator),
each asked of the original too; images in `images/`.

postech-ami/BEAF's `beaf_metric.py` hard-codes its own sizes (26118 questions, 1727 removed-object
questions); run it on this export with ours:

    sed -e 's/26118/{len(rows)}/' -e 's/1727/{n_removed}/g' beaf_metric.py > beaf_metric_ours.py
    python beaf_metric_ours.py --qna-path beaf_qna.json --model-answers ANSWERS.json

`ANSWERS.json` is BEAF's answer format, `[{{"id": 0, "answer": "No."}}, ...]` in `id` order; or
`counterfactory eval {ctx.final} --predictions ANSWERS.json`.
""")
    return {"records": len(rows), "removed_questions": n_removed, "other_questions_on_edited": n_other,
            "skipped_samples": skipped}


# -- DeFacto -----------------------------------------------------------------------------------
def _defacto(samples, ctx: Context) -> dict[str, int]:
    n = skipped = unrewardable = 0
    rows = []
    for done, (doc, parts) in enumerate(samples, 1):
        if ctx.progress:
            ctx.progress(done)
        if not {"blackout", "random_mask"} <= set(doc["variants"]):
            skipped += 1
            continue
        ext = _ext(parts)
        evidence = [i["box"] for i in doc["instances"] if i.get("box")]
        every = [o["box"] for o in _annotated(doc)]
        outside = [b for b in every if b not in evidence]  # the annotated objects the question is not about
        rbox = _box_of(parts["control_mask.png"]) if "control_mask.png" in parts else None
        for q in doc["qa"]:
            answer = str(q["answers"]["orig"])
            if DEFACTO_NEGATIVE.search(answer) or str(q["answers"].get("random_mask")) != answer:
                unrewardable += 1
                continue
            n += 1
            d = ctx.out / str(n)
            d.mkdir()
            (d / f"original.{ext}").write_bytes(parts[f"orig.{ext}"])
            (d / f"original_smask.{ext}").write_bytes(parts[f"blackout.{ext}"])
            (d / f"original_rmask.{ext}").write_bytes(parts[f"random_mask.{ext}"])
            (d / "boxes.txt").write_text(_boxes(every))
            (d / "sboxes.txt").write_text(_boxes(evidence))
            (d / "outside_boxes.txt").write_text(_boxes(outside))
            (d / "random_boxes.txt").write_text(_boxes([rbox] if rbox else []))
            (d / "question.txt").write_text(q["question"] + "\n")
            (d / "answer.txt").write_text(answer + "\n")
            rows.append({"folder": str(n), "key": doc["key"], "question": q["question"], "kind": q["kind"],
                         "answer_original": answer, "answer_smask": ctx.abstain, "answer_rmask": answer})
    (ctx.out / "defacto.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    _write_readme(ctx.out, f"{ctx.name}: DeFacto folders", f"""
{n} folders `1` .. `{n}` in the layout of DeFacto's README: `original`, `original_smask` (the
question's evidence masked: the answer is "{ctx.abstain}"), `original_rmask` (an equal-area region
elsewhere masked: the answer stays), `boxes.txt` (every annotated box in the image),
`sboxes.txt` (the question's evidence), `outside_boxes.txt` (the other annotated boxes),
`random_boxes.txt` (the masked control region), `question.txt`, `answer.txt` (the original's
answer). `defacto.jsonl` lists each folder's answer per image. {unrewardable} questions are left
out: their answer contains "no", "none" or "unknown", which DeFacto's text reward
(`accuracy_reward_text`) penalizes on every evidence-intact image. Score responses with
`counterfactory eval {ctx.final} --predictions RESPONSES.jsonl` (`folder`, `image` = original,
smask or rmask, `response`).
""")
    return {"records": n, "skipped_samples": skipped, "skipped_questions": unrewardable}


# -- CounterCurate -----------------------------------------------------------------------------
def _caption(kind: str, target: str, answer: str) -> str | None:
    if kind == "position" and answer in ("left", "right"):
        return f"The {target} is on the {answer}."
    if kind == "count" and answer.isdigit():
        n = int(answer)
        return f"There {'is' if n == 1 else 'are'} {n} {target}{'' if n == 1 else 's'} in the image."
    return None


def _countercurate(samples, ctx: Context) -> dict[str, int]:
    (ctx.out / "images").mkdir()
    root = ctx.final.resolve()
    rows = []
    skipped = 0
    for done, (doc, parts) in enumerate(samples, 1):
        if ctx.progress:
            ctx.progress(done)
        ext = _ext(parts)
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
                (ctx.out / img).write_bytes(parts[f"orig.{ext}"])
                (ctx.out / neg_img).write_bytes(parts[f"{v}.{ext}"])
                rows.append({"captions": pos, "images": str(root / img), "neg_captions": neg,
                             "neg_images": str(root / neg_img)})
        skipped += len(rows) == before
    with open(ctx.out / "train_countercurate.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["captions", "images", "neg_captions", "neg_images"], delimiter="\t",
                           lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    _write_readme(ctx.out, f"{ctx.name}: CounterCurate pairs", f"""
`train_countercurate.csv`: {len(rows)} rows (tab-separated `captions`, `images`, `neg_captions`,
`neg_images`) for CounterCurate's OpenCLIP `CsvDataset` (`--train-data
{root / 'train_countercurate.csv'} --csv-img-key images --csv-caption-key captions
--csv-separator "\\t"`). The image paths are absolute (this folder: {root}): OpenCLIP opens them
from wherever training starts; export again with another `--out` to move it. Score CLIP scores
with `counterfactory eval {root} --predictions SCORES.jsonl` (`row`, `scores`: image x caption).
""")
    return {"records": len(rows), "skipped_samples": skipped}
