"""Turn the config's inputs into input records: one record per (image, question), or per clip.

The driver only plans (``plan_inputs``: how many records, which source files, and slices of
them: manifest byte ranges, scene ranges); each slice is read into records where it is
processed (``read_slice``, on a Ray worker). Records are small JSON-able dicts (the keys of
``sample.SampleMeta``: the image or clip under ``uri``, whatever the manifest called it); pixels
are read later, in the ingest stage. A malformed manifest line or an image without questions still
becomes a record (carrying an ``error``) so that ingest rejects it with a reason: every input
ends in the shards or the rejects ledger, never nowhere.

Longer than most modules because every input kind's reader and its defences against hostile
files (sizes, nesting, Unicode, malformed entries) live together with the planner that counts
their records; splitting them would split each format's rules across files.
"""

# Over ~450 lines on purpose: every input kind (manifest, COCO, procedural, video) is planned
# and read here behind one InputPlan, so hostile-input handling has one owner.

from __future__ import annotations

import functools
import hashlib
import json
import math
import stat
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from counterfactory import scenes, video_scenes
from counterfactory.pipeline.config import (
    CocoInput,
    ConfigError,
    ManifestInput,
    PipelineConfig,
    ProceduralInput,
    ProceduralVideoInput,
    VideoManifestInput,
)
from counterfactory.pipeline.refs import UnsupportedURI, _image_ref
from counterfactory.pipeline.slices import SliceTable
from counterfactory.rules import QUESTION_KINDS, classify_question, exhaustive_categories, plural

MAX_LINE_BYTES = 16 << 20  # one manifest line (an image, its questions and polygons)


def _uri_reject(origin: str, image: str, exc: UnsupportedURI, **extra: Any) -> dict[str, Any]:
    return {"origin": origin, "uri": image, **extra, "error": f"unsupported_uri: {exc}"}


def _question_items(line: dict[str, Any], classify: bool = True) -> list[dict[str, Any]]:
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
        if classify or "kind" in q:  # counting only: a classified question always has a valid kind
            q.setdefault("kind", classify_question(q["question"]))
        if "kind" in q and q["kind"] not in QUESTION_KINDS:  # an unknown kind would get no answer rule downstream
            raise ValueError(f"'kind' {str(q['kind'])[:40]!r} is not a question kind: one of {', '.join(QUESTION_KINDS)}")
        targets = q.get("targets")
        if isinstance(targets, str):  # "targets": "cup" means the one target "cup", not c, u, p
            q["targets"] = [targets]
        elif targets is not None and (not isinstance(targets, list)
                                      or not all(isinstance(t, str) and t for t in targets)):
            raise ValueError("'targets' must be a list of category names (strings)")
        if "answer" in q and q["answer"] is not None:
            if isinstance(q["answer"], dict | list):
                raise ValueError("'answer' must be a string or a number")
            q["answer"] = str(q["answer"])
    return items


def _check_unicode(doc: Any) -> None:
    """JSON may spell a lone surrogate (``"\\ud800"``), which no file system, hash or UTF-8
    writer accepts: such a line is a bad line here, not a crash in a later stage."""
    try:
        json.dumps(doc, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"not valid Unicode ({exc.reason}: {exc.object[exc.start:exc.end]!a})") from None


@dataclass
class _Line:
    origin: str  # "file:line"
    text: str  # decoded (invalid UTF-8 replaced, for the message)
    error: str | None  # why the bytes are not a line of text
    start: int  # byte offsets of the line in the file
    end: int
    lineno: int


def _lines(data: bytes, at: int, lineno: int, name: str) -> Iterator[_Line]:
    """The non-empty lines of ``data`` (which starts at byte ``at``, after line ``lineno``),
    split on ``\n``, ``\r\n`` and ``\r`` as text mode would, decoded one at a time: a line that
    is not UTF-8 becomes a bad line, not a crash."""
    for piece in data.splitlines(keepends=True):
        start, at = at, at + len(piece)
        lineno += 1
        if not piece.strip():
            continue
        error = None
        if len(piece) > MAX_LINE_BYTES:
            yield _Line(f"{name}:{lineno}", piece[:200].decode("utf-8", "replace"),
                        f"line of {len(piece)} bytes > {MAX_LINE_BYTES}", start, at, lineno)
            continue
        try:
            text = piece.decode("utf-8-sig" if start == 0 else "utf-8")
        except UnicodeDecodeError as exc:
            text, error = piece.decode("utf-8", "replace"), f"not UTF-8 ({exc.reason} at byte {exc.start})"
        yield _Line(f"{name}:{lineno}", text, error, start, at, lineno)


def _jsonl(path: Path) -> Iterator[_Line]:
    """Every non-empty line of a JSONL manifest, read as bytes so that a slice of it can be
    re-read from its byte offsets on a worker."""
    with open(path, "rb") as f:
        at = lineno = 0
        while raw := f.readline(MAX_LINE_BYTES + 1):  # a line ends at "\n" only: "\r\n" is never cut
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                # an overlong line is one bad line, skipped in chunks rather than held whole
                start, size = at, len(raw)
                while (more := f.readline(1 << 20)):
                    size += len(more)
                    if more.endswith(b"\n"):
                        break
                yield _Line(f"{path.name}:{lineno + 1}", raw[:200].decode("utf-8", "replace"),
                            f"line of {size} bytes > {MAX_LINE_BYTES}", start, start + size, lineno + 1)
                at, lineno = start + size, lineno + 1
                continue
            yield from _lines(raw, at, lineno, path.name)
            at += len(raw)
            lineno += raw.count(b"\n") + raw.count(b"\r") - raw.count(b"\r\n")


def _bad_line(origin: str, raw: str, exc: Exception | str, error: str = "bad_manifest_line",
              **extra: Any) -> dict[str, Any]:
    return {"origin": origin, "uri": raw.strip()[:200], **extra, "error": f"{error}: {exc}"}


@functools.lru_cache(maxsize=4096)
def _cached_ref(image: str, root: Path, home: str | None) -> str:
    return _image_ref(image, root, home)  # many lines (one per question) name one image


def _manifest_line(ln: _Line, root: Path, home: str | None, exhaustive: Any = "annotated",
                   classify: bool = True) -> list[dict[str, Any]]:
    """The records of one manifest line: one per question, or one carrying the line's error.
    ``exhaustive`` is the input's declaration; the line's own ``exhaustive`` replaces it.
    ``classify=False`` (the planner, which only counts) leaves a question without a kind."""
    origin, raw = ln.origin, ln.text
    try:
        if ln.error:
            raise ValueError(ln.error)
        line = json.loads(raw)
        if not isinstance(line, dict):
            raise ValueError("a manifest line must be a JSON object")
        if "\\u" in raw:  # decoded UTF-8 holds no surrogate: only a \u escape can spell one
            _check_unicode(line)
        image = line.get("image")
        image = _cached_ref(image, root, home) if isinstance(image, str) else _image_ref(image, root, home)
        questions = _question_items(line, classify)
        objects = line.get("objects", [])
        if not isinstance(objects, list):
            raise ValueError("'objects' must be a list")
        complete = exhaustive_categories(line.get("exhaustive", exhaustive), objects)
    except UnsupportedURI as exc:
        return [_uri_reject(origin, line["image"], exc)]
    except RecursionError:  # "[[[[..." 100,000 deep: json recurses once per level
        return [_bad_line(origin, raw, "nested too deeply")]
    except (ValueError, TypeError) as exc:
        return [_bad_line(origin, raw, exc)]
    if not questions:
        return [{"origin": origin, "uri": image, "error": "no_question: the line has no question"}]
    return [{"origin": f"{origin}#q{qi}", "uri": image, "question": q, "objects": objects,
             "exhaustive": complete} for qi, q in enumerate(questions)]


class InputError(ConfigError):
    """An input file that cannot be read at all, or more inputs than ``limits.max_inputs``: a
    config problem, one line, exit 2."""


def _read_json_document(path: Path, max_bytes: int) -> Any:
    """A whole JSON document (COCO annotations): a regular file under ``max_bytes``, UTF-8,
    nesting within Python's limits; anything else is an ``InputError`` naming the file."""
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"{path}: not a regular file")
        if st.st_size > max_bytes:
            raise InputError(f"{path}: {st.st_size} bytes > limits.max_annotation_bytes {max_bytes}")
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(raw) > max_bytes:
        raise InputError(f"{path}: over limits.max_annotation_bytes {max_bytes}")
    if not raw.strip():
        raise InputError(f"{path}: empty file, not COCO annotations")
    try:
        return json.loads(raw)
    except RecursionError:
        raise InputError(f"{path}: nested too deeply to be COCO annotations") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise InputError(f"{path}: not valid JSON: {exc}".splitlines()[0]) from None


def _coco_box(bbox: Any) -> list[float] | None:
    """COCO's [x, y, w, h] as [x0, y0, x1, y1]; None when it is not four finite numbers."""
    if not isinstance(bbox, list) or len(bbox) != 4:
        return None
    try:
        if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in bbox):
            return None
    except OverflowError:  # an int too large for a float
        return None
    x, y, w, h = bbox
    return [x, y, x + w, y + h]


def _coco_records(inp: CocoInput, cfg: PipelineConfig) -> Iterator[list[dict[str, Any]]]:
    """The records of each image, one list per image. A malformed image entry or annotation is
    that image's reject (``bad_annotation``); a file that is not COCO at all is an InputError."""
    path = cfg.path(inp.path)
    root = cfg.path(inp.images_root) if inp.images_root else path.parent
    data = _read_json_document(path, cfg.limits.max_annotation_bytes)
    if not isinstance(data, dict):
        raise InputError(f"{path}: COCO annotations are a JSON object, not a {type(data).__name__}")
    parts = {}
    for key in ("images", "annotations", "categories"):
        value = data.get(key, [])
        if not isinstance(value, list):
            raise InputError(f"{path}: '{key}' must be a list, not a {type(value).__name__}")
        parts[key] = value
    try:
        _check_unicode(data)
    except ValueError as exc:
        raise InputError(f"{path}: {exc}") from None
    cats: dict[Any, str] = {}
    for c in parts["categories"]:
        if isinstance(c, dict) and isinstance(c.get("id"), int | str) and isinstance(c.get("name"), str) and c["name"]:
            cats[c["id"]] = c["name"]
    anns: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for a in parts["annotations"]:
        if isinstance(a, dict) and isinstance(a.get("image_id"), int | str):
            anns[a["image_id"]].append(a)
    for n, img in enumerate(parts["images"]):
        if not isinstance(img, dict):
            origin = f"{path.name}:images[{n}]"
            yield [_bad_line(origin, json.dumps(img)[:200], "an image entry must be an object", error="bad_annotation")]
            continue
        origin = f"{path.name}:image_id={img.get('id')}"
        try:
            image = _image_ref(img.get("file_name"), root)
        except UnsupportedURI as exc:
            yield [_uri_reject(origin, img["file_name"], exc)]
            continue
        except ValueError as exc:
            yield [_bad_line(origin, json.dumps(img)[:200], exc, error="bad_annotation")]
            continue
        objects, problems = [], []
        image_id = img.get("id")
        for a in anns.get(image_id, []) if isinstance(image_id, int | str) else []:
            cid = a.get("category_id")
            name = cats.get(cid) if isinstance(cid, int | str) else None
            if name is None:
                problems.append(f"annotation {a.get('id')}: category {cid!r} has no name")
                continue
            obj: dict[str, Any] = {"category": name}
            seg = a.get("segmentation")
            if isinstance(seg, list) and seg and all(
                    isinstance(p, list) and len(p) >= 6 and all(isinstance(v, int | float) and not isinstance(v, bool)
                                                                for v in p) for p in seg):
                # COCO polygons are flat [x1, y1, x2, y2, ...]; several parts per instance allowed
                obj["polygons"] = [[[p[i], p[i + 1]] for i in range(0, len(p) - 1, 2)] for p in seg]
            if "bbox" in a:
                box = _coco_box(a["bbox"])
                if box is None:
                    problems.append(f"annotation {a.get('id')}: bbox {str(a['bbox'])[:60]} is not [x, y, w, h]")
                    continue
                obj["box"] = box
            objects.append(obj)
        if problems:
            yield [{"origin": origin, "uri": image,
                    "error": f"bad_annotation: {len(problems)} bad annotation(s), e.g. {problems[0]}"}]
            continue
        complete = exhaustive_categories(sorted(set(cats.values())) if inp.exhaustive is None else inp.exhaustive,
                                         objects)
        by_cat: dict[str, int] = defaultdict(int)
        for o in objects:
            by_cat[o["category"]] += 1
        if not by_cat:
            yield [{"origin": origin, "uri": image, "error": "no_question: no annotations for this image"}]
            continue
        recs = []
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
                recs.append({"origin": f"{origin}#{q['kind']}:{cat}", "uri": image, "question": q,
                             "objects": objects, "exhaustive": complete})
        yield recs


def _video_record(line: Any, root: Path, origin: str, home: str | None = None) -> dict[str, Any]:
    """One record per clip, all its questions in it (one WebDataset sample per clip)."""
    if not isinstance(line, dict):
        raise ValueError("a manifest line must be a JSON object")
    video = line.get("video", line.get("path"))
    if isinstance(video, str) and video.startswith("procedural-video://"):
        ref = video
    else:
        ref = _image_ref(video, root, home)
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
    rec: dict[str, Any] = {"origin": origin, "uri": ref, "media": "video", "questions": questions,
                           "objects": objects, "targets": targets, "span": span}
    if not questions:
        rec["error"] = "no_question: the line has no question"
    return rec


def _video_line(ln: _Line, root: Path, home: str | None) -> list[dict[str, Any]]:
    try:
        if ln.error:
            raise ValueError(ln.error)
        line = json.loads(ln.text)
        _check_unicode(line)
        return [_video_record(line, root, ln.origin, home)]
    except UnsupportedURI as exc:
        return [_uri_reject(ln.origin, line.get("video", line.get("path")), exc, media="video")]
    except RecursionError:
        return [_bad_line(ln.origin, ln.text, "nested too deeply", media="video")]
    except (ValueError, TypeError) as exc:
        return [_bad_line(ln.origin, ln.text, exc, media="video")]


# -- input plan: what the driver knows; slices the workers read ---------------------------------
@dataclass
class InputPlan:
    """The inputs of a run as the driver sees them: how many records there are, which source
    files they read (hashed into the spec id), and the slices to read them in.

    The driver never holds the records themselves: it makes one pass to count them (a manifest
    line is parsed, then dropped; a procedural scene is counted without being built) and records
    where each slice starts, compactly (``slices.SliceTable``: a few numbers per slice, the
    shared fields once per input). Each slice is read where it is processed, by ``read_slice`` on
    a Ray worker, so the reading runs in parallel. Record ``idx`` numbers are global and dense:
    slice ``k`` holds ``idx0 .. idx0 + n - 1``. COCO annotations are one JSON document that every
    slice would have to parse again, so their records travel inside their slices. A counting plan
    (``plan_inputs(..., count_only=True)``: a dry run, a progress total) keeps no slice at all."""

    n: int = 0
    slices: SliceTable = field(default_factory=SliceTable)
    sources: dict[str, str] = field(default_factory=dict)  # ref -> role ("annotations" | "media")


class _Planner:
    def __init__(self, plan: InputPlan, per_slice: int, limit: int | None, max_inputs: int | None = None,
                 keep: bool = True) -> None:
        self.plan, self.per_slice, self.limit = plan, max(1, per_slice), limit
        self.max_inputs = max_inputs
        self.keep = keep  # False: count only (no slice, no source list)
        self.open: int | None = None  # position of the slice being filled
        self.open_base: dict[str, Any] | None = None

    def full(self) -> bool:
        return self.limit is not None and self.plan.n >= self.limit

    def add(self, base: dict[str, Any], records: int, refs: Iterable[str] = (), *,
            first: int | None = None, start: int | None = None, end: int | None = None,
            lineno: int | None = None, inline: list[dict[str, Any]] | None = None) -> None:
        """One unit (a scene, a clip, a manifest line, a COCO image) of ``records`` records;
        a manifest line gives its byte range (``start``, ``end``) and the line number before it."""
        take = records if self.limit is None else min(records, self.limit - self.plan.n)
        if take <= 0:
            return
        if self.max_inputs is not None and self.plan.n + take > self.max_inputs:
            raise InputError(f"inputs: more than limits.max_inputs = {self.max_inputs} input records "
                             "(raise the limit, or use --limit, if this is meant)")
        if not self.keep:
            self.plan.n += take
            return
        t, i = self.plan.slices, self.open
        # at most per_slice records, unless one unit alone has more: a slice is one batch
        if i is None or self.open_base is not base or t.cols["n"][i] + take > self.per_slice:
            uses = (("first",) if first is not None else ()) + (("start", "end", "lineno") if start is not None else ())
            i = self.open = t.open(base, uses, inline=inline is not None, idx0=self.plan.n,
                                   first=first or 0, start=start or 0, lineno=lineno or 0)
            self.open_base = base
        t.cols["n"][i] += take
        t.cols["units"][i] += 1
        if end is not None:
            t.cols["end"][i] = end
        if inline is not None:
            t.inline[i].extend(inline[:take])
        self.plan.n += take
        for ref in refs:
            self.plan.sources.setdefault(ref, "media")


def _source_refs(records: list[dict[str, Any]]) -> list[str]:
    return [r["uri"] for r in records if isinstance(r.get("uri"), str) and r["uri"] and "error" not in r]


def _seal(path: Path, table: SliceTable, first: int) -> None:
    """Each manifest slice gets the digest of its bytes: a worker reading other bytes at those
    offsets (the file changed after planning) turns the slice's inputs into rejects."""
    start, end = table.cols["start"], table.cols["end"]
    with open(path, "rb") as f:
        for i in range(first, len(table)):
            f.seek(start[i])
            table.seal(i, hashlib.blake2b(f.read(end[i] - start[i]), digest_size=16).digest())


def plan_inputs(cfg: PipelineConfig, limit: int | None = None, per_slice: int = 8,
                count_only: bool = False) -> InputPlan:
    """Count the records of every input (the first ``limit``) and cut them into slices of whole
    units, at most ``per_slice`` records each (unless one unit alone has more): the runner uses
    the first stage's batch size, so a slice is one block and one batch of the pipeline.
    ``count_only``: the count alone, in memory that does not grow with the inputs (a dry run)."""
    plan = InputPlan()
    for inp in cfg.inputs:
        path = getattr(inp, "path", None)
        if path and not count_only:  # annotation files are sources too, read or not
            plan.sources[str(cfg.path(path))] = "annotations"
    pl = _Planner(plan, per_slice, limit, cfg.limits.max_inputs, keep=not count_only)
    for inp in cfg.inputs:
        if pl.full():
            break
        if isinstance(inp, ProceduralInput):
            base = {"kind": "procedural", "seed": inp.seed, "size": list(inp.size), "q": inp.questions_per_scene}
            w, h = inp.size
            for i in range(inp.count):
                if pl.full():
                    break
                # a scene always has >= 4 distinct questions (config caps questions_per_scene at 4)
                pl.add(base, inp.questions_per_scene, () if count_only else
                       [f"procedural://{inp.seed}/{i}?size={w}x{h}"], first=i)
        elif isinstance(inp, ProceduralVideoInput):
            base = {"kind": "procedural_video", "seed": inp.seed, "size": list(inp.size),
                    "frames": inp.frames, "fps": inp.fps}
            for i in range(inp.count):
                if pl.full():
                    break
                pl.add(base, 1, () if count_only else
                       [video_scenes.clip_uri(inp.seed, i, inp.size, inp.frames, inp.fps)], first=i)
        elif isinstance(inp, ManifestInput | VideoManifestInput):
            video = isinstance(inp, VideoManifestInput)
            mpath = cfg.path(inp.path)
            sub = inp.videos_root if video else inp.images_root
            root = cfg.path(sub) if sub else mpath.parent
            home = str(Path.home())
            base = {"kind": "video_manifest" if video else "manifest", "path": str(mpath), "root": str(root),
                    "home": home}
            if not video:
                base["exhaustive"] = inp.exhaustive
            first_slice = len(plan.slices)
            for ln in _jsonl(mpath):
                if pl.full():
                    break
                recs = (_video_line(ln, root, home) if video
                        else _manifest_line(ln, root, home, inp.exhaustive, classify=False))
                pl.add(base, len(recs), () if count_only else _source_refs(recs), start=ln.start, end=ln.end,
                       lineno=ln.lineno - 1)
            if not count_only:
                _seal(mpath, plan.slices, first_slice)
        elif isinstance(inp, CocoInput):
            base = {"kind": "records"}
            for recs in _coco_records(inp, cfg):
                if pl.full():
                    break
                pl.add(base, len(recs), () if count_only else _source_refs(recs), inline=recs)
    return plan


def read_slice(sl: dict[str, Any]) -> list[dict[str, Any]]:
    """The records of one slice of an ``InputPlan``, in order (on whichever node processes it)."""
    kind, n = sl["kind"], sl["n"]
    out: list[dict[str, Any]] = []
    if kind == "records":
        out = sl["records"]
    elif kind == "procedural":
        w, h = sl["size"]
        for i in range(sl["first"], sl["first"] + sl["units"]):
            rec = scenes.scene_record(sl["seed"], i, (w, h), sl["q"])
            out += [{"origin": f"procedural:{sl['seed']}/{i}#q{qi}", "uri": rec["image"], "question": q,
                     "objects": rec["objects"], "exhaustive": rec["exhaustive"]}
                    for qi, q in enumerate(rec["questions"])]
    elif kind == "procedural_video":
        for i in range(sl["first"], sl["first"] + sl["units"]):
            line = video_scenes.clip_record(sl["seed"], i, tuple(sl["size"]), sl["frames"], sl["fps"])
            out.append(_video_record(line, Path("."), f"procedural_video:{sl['seed']}/{i}"))
    else:  # a manifest: re-read the slice's bytes, the same bytes that were counted
        path, root = Path(sl["path"]), Path(sl["root"])
        problem = None
        try:
            with open(path, "rb") as f:
                f.seek(sl["start"])
                data = f.read(sl["end"] - sl["start"])
        except OSError as exc:
            problem = f"read_error: manifest not readable here: {exc}"
        else:
            if hashlib.blake2b(data, digest_size=16).hexdigest() != sl["blake2b"]:
                problem = "source_changed: the manifest changed after the run was planned"
            else:
                for ln in _lines(data, sl["start"], sl["lineno"], path.name):
                    out += (_video_line(ln, root, sl["home"]) if kind == "video_manifest"
                            else _manifest_line(ln, root, sl["home"], sl.get("exhaustive", "annotated")))
        if problem:  # every record of the slice still ends in the rejects ledger, with the reason
            extra = {"media": "video"} if kind == "video_manifest" else {}
            out = [{"origin": f"{path.name}@{sl['start']}+{k}", "uri": str(path), **extra, "error": problem}
                   for k in range(n)]
    if len(out) < n:
        raise RuntimeError(f"input slice at idx {sl['idx0']} gave {len(out)} records, planned {n}")
    return out[:n]


def pipeline_rows(records: list[dict[str, Any]], first_idx: int, start: int, seed: int,
                  chash: str) -> list[dict[str, Any]]:
    """Pipeline rows (``counterfactory.sample`` row format) for ``records`` numbered from
    ``first_idx``, leaving out the inputs before ``start`` (a resumed run starts late)."""
    return [
        {"idx": i, "key": "", "status": "ok", "blob": b"",
         "meta": json.dumps({**rec, "run_seed": seed, "config_hash": chash})}
        for i, rec in enumerate(records, first_idx) if i >= start
    ]


def slices_from(plan: InputPlan, start: int) -> SliceTable:
    """The slices holding inputs at or after ``start`` (a resumed run skips whole slices)."""
    t = plan.slices
    i = t.position(start)
    if i < len(t) and t.cols["idx0"][i] + t.cols["n"][i] <= start:
        i += 1
    return t.view(i, len(t))
