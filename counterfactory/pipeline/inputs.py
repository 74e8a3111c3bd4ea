"""Turn the config's inputs into input records: one record per (image, question).

Records are small JSON-able dicts; pixels are read later, in the ingest stage, on the workers.
A malformed manifest line or an image without questions still becomes a record (carrying an
``error``) so that ingest rejects it with a reason: every input ends in the shards or the
rejects ledger, never nowhere.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from counterfactory import scenes, video_scenes
from counterfactory.pipeline.config import (
    CocoInput,
    ManifestInput,
    PipelineConfig,
    ProceduralInput,
    ProceduralVideoInput,
    VideoManifestInput,
)
from counterfactory.rules import classify_question, plural


def _image_ref(image: Any, root: Path) -> str:
    if not isinstance(image, str) or not image:
        raise ValueError("'image' must be a non-empty string")
    if image.startswith(("procedural://", "pkg:")):
        return image
    p = Path(image).expanduser()
    return str(p if p.is_absolute() else (root / p))


def _question_items(line: dict[str, Any]) -> list[dict[str, Any]]:
    if "questions" in line:
        qs = line["questions"]
        if not isinstance(qs, list):
            raise ValueError("'questions' must be a list")
        items = [q if isinstance(q, dict) else {"question": q} for q in qs]
    elif "question" in line:
        items = [{k: line[k] for k in ("question", "answer", "kind", "targets") if k in line}]
    else:
        items = []
    for q in items:
        if not isinstance(q.get("question"), str) or not q["question"].strip():
            raise ValueError("every question needs a non-empty 'question' string")
        q.setdefault("kind", classify_question(q["question"]))
        if "answer" in q and q["answer"] is not None:
            q["answer"] = str(q["answer"])
    return items


def _jsonl(path: Path) -> Iterator[tuple[str, str]]:
    """(origin "file:line", raw text) for every non-empty line of a JSONL manifest."""
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, 1):
            if raw.strip():
                yield f"{path.name}:{lineno}", raw


def _bad_line(origin: str, raw: str, exc: Exception, **extra: Any) -> dict[str, Any]:
    return {"origin": origin, "image": raw.strip()[:200], **extra, "error": f"bad_manifest_line: {exc}"}


def _manifest_records(inp: ManifestInput, cfg: PipelineConfig) -> Iterator[dict[str, Any]]:
    path = cfg.path(inp.path)
    root = cfg.path(inp.images_root) if inp.images_root else path.parent
    for origin, raw in _jsonl(path):
        try:
            line = json.loads(raw)
            if not isinstance(line, dict):
                raise ValueError("a manifest line must be a JSON object")
            image = _image_ref(line.get("image"), root)
            questions = _question_items(line)
            objects = line.get("objects", [])
            if not isinstance(objects, list):
                raise ValueError("'objects' must be a list")
        except (ValueError, TypeError) as exc:
            yield _bad_line(origin, raw, exc)
            continue
        if not questions:
            yield {"origin": origin, "image": image, "error": "no_question: the line has no question"}
            continue
        for qi, q in enumerate(questions):
            yield {"origin": f"{origin}#q{qi}", "image": image, "question": q, "objects": objects}


def _coco_records(inp: CocoInput, cfg: PipelineConfig) -> Iterator[dict[str, Any]]:
    path = cfg.path(inp.path)
    root = cfg.path(inp.images_root) if inp.images_root else path.parent
    data = json.loads(path.read_text())
    cats = {c["id"]: c["name"] for c in data.get("categories", [])}
    anns: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for a in data.get("annotations", []):
        anns[a.get("image_id")].append(a)
    for img in data.get("images", []):
        origin = f"{path.name}:image_id={img.get('id')}"
        image = _image_ref(img.get("file_name"), root)
        objects = []
        for a in anns.get(img.get("id"), []):
            obj: dict[str, Any] = {"category": cats.get(a.get("category_id"), str(a.get("category_id")))}
            seg = a.get("segmentation")
            if isinstance(seg, list) and seg and isinstance(seg[0], list) and len(seg[0]) >= 6:
                # COCO polygons are flat [x1, y1, x2, y2, ...]; several parts per instance allowed
                obj["polygons"] = [[[p[i], p[i + 1]] for i in range(0, len(p) - 1, 2)] for p in seg]
            if "bbox" in a:
                x, y, w, h = a["bbox"]
                obj["box"] = [x, y, x + w, y + h]
            objects.append(obj)
        by_cat: dict[str, int] = defaultdict(int)
        for o in objects:
            by_cat[o["category"]] += 1
        if not by_cat:
            yield {"origin": origin, "image": image, "error": "no_question: no annotations for this image"}
            continue
        chosen = sorted(by_cat, key=lambda c: (-by_cat[c], c))[: inp.max_categories_per_image]
        for cat in chosen:
            n = by_cat[cat]
            qs: list[dict[str, Any]] = []
            if "existence" in inp.question_kinds:
                qs.append({"question": f"Is there a {cat} in the image?", "answer": "yes", "kind": "existence"})
            if "count" in inp.question_kinds:
                qs.append({"question": f"How many {plural(cat)} are there?", "answer": str(n), "kind": "count"})
            # color needs an attribute COCO lacks; position is derived from the mask by the qa stage.
            if "position" in inp.question_kinds and n == 1:
                qs.append({"question": f"Is the {cat} on the left or the right?", "kind": "position"})
            for q in qs:
                q["targets"] = [cat]
                yield {"origin": f"{origin}#{q['kind']}:{cat}", "image": image, "question": q, "objects": objects}


def _procedural_records(inp: ProceduralInput) -> Iterator[dict[str, Any]]:
    for i in range(inp.count):
        rec = scenes.scene_record(inp.seed, i, inp.size, inp.questions_per_scene)
        for qi, q in enumerate(rec["questions"]):
            yield {
                "origin": f"procedural:{inp.seed}/{i}#q{qi}",
                "image": rec["image"],
                "question": q,
                "objects": rec["objects"],
            }


def _video_record(line: Any, root: Path, origin: str) -> dict[str, Any]:
    """One record per clip, all its questions in it (one WebDataset sample per clip). The
    source goes under ``image``, the key the writer reads a source reference from."""
    if not isinstance(line, dict):
        raise ValueError("a manifest line must be a JSON object")
    video = line.get("video", line.get("path"))
    if isinstance(video, str) and video.startswith("procedural-video://"):
        ref = video
    else:
        ref = _image_ref(video, root)
    raw_qs = line.get("questions")
    given = ([isinstance(q, dict) and "kind" in q for q in raw_qs] if isinstance(raw_qs, list)
             else ["kind" in line])
    questions = _question_items(line)
    for q, has_kind in zip(questions, given, strict=False):
        if not has_kind:
            q["kind_auto"] = True  # the video qa stage re-classifies with motion/time kinds
    objects = line.get("objects", [])
    if not isinstance(objects, list):
        raise ValueError("'objects' must be a list")
    for o in objects:
        if not isinstance(o, dict) or not isinstance(o.get("keyframes", []), list):
            raise ValueError("every object needs a 'keyframes' list")
    targets = line.get("targets")
    if targets is not None and (not isinstance(targets, list) or not all(isinstance(t, str) for t in targets)):
        raise ValueError("'targets' must be a list of strings")
    span = line.get("span")
    if span is not None:
        ok = (isinstance(span, list) and len(span) == 2 and isinstance(span[0], int | float)
              and (span[1] is None or (isinstance(span[1], int | float) and span[1] > span[0])) and span[0] >= 0)
        if not ok:
            raise ValueError("'span' must be [start_s, end_s] with 0 <= start < end (end may be null)")
    rec: dict[str, Any] = {"origin": origin, "image": ref, "media": "video", "questions": questions,
                           "objects": objects, "targets": targets, "span": span}
    if not questions:
        rec["error"] = "no_question: the line has no question"
    return rec


def _video_manifest_records(inp: VideoManifestInput, cfg: PipelineConfig) -> Iterator[dict[str, Any]]:
    path = cfg.path(inp.path)
    root = cfg.path(inp.videos_root) if inp.videos_root else path.parent
    for origin, raw in _jsonl(path):
        try:
            yield _video_record(json.loads(raw), root, origin)
        except (ValueError, TypeError) as exc:
            yield _bad_line(origin, raw, exc, media="video")


def _procedural_video_records(inp: ProceduralVideoInput) -> Iterator[dict[str, Any]]:
    for i in range(inp.count):
        line = video_scenes.clip_record(inp.seed, i, inp.size, inp.frames, inp.fps)
        yield _video_record(line, Path("."), f"procedural_video:{inp.seed}/{i}")


def iter_records(cfg: PipelineConfig) -> Iterator[dict[str, Any]]:
    for inp in cfg.inputs:
        if isinstance(inp, ManifestInput):
            yield from _manifest_records(inp, cfg)
        elif isinstance(inp, CocoInput):
            yield from _coco_records(inp, cfg)
        elif isinstance(inp, ProceduralInput):
            yield from _procedural_records(inp)
        elif isinstance(inp, VideoManifestInput):
            yield from _video_manifest_records(inp, cfg)
        elif isinstance(inp, ProceduralVideoInput):
            yield from _procedural_video_records(inp)


def load_records(cfg: PipelineConfig, limit: int | None = None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for rec in iter_records(cfg):
        if limit is not None and len(out) >= limit:
            break
        out.append(rec)
    return out
