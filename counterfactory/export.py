"""``counterfactory export DATASET@vN --format llava|trl|sharegpt|parquet --out DIR``.

Every format is written from the version's per-source shards (read as streams, members kept in
memory, each shard's sha256 checked against the manifest on the way) in shard order, samples
in input order, images in the order original, then variants as the sample lists them: an export
of one version is the same bytes every time (countercurate's absolute paths: for the same ``--out``).

- ``llava``: ``SPLIT.json``, a list of ``{id, image, conversations: [{from: human|gpt, value}]}``
  (LLaVA's instruction-tuning format; ``<image>`` once, in the first human turn), images under
  ``images/`` (the ``image`` values begin with ``images/``: LLaVA's ``--image_folder`` is the export root).
- ``sharegpt``: ``SPLIT.json``, a list of ``{messages: [{role, content}], images: [path]}`` and a
  ``dataset_info.json`` entry per split (LLaMA-Factory's ShareGPT format: ``--dataset_dir`` the export),
  images under ``images/``.
- ``trl``: parquet rows ``{messages, images}`` with the images embedded (TRL's conversational
  vision format: content parts ``{"type": "image"}`` and ``{"type": "text", "text": ...}``) and a
  README whose front matter lets ``datasets.load_dataset(DIR)`` read them as PIL images.
- ``parquet``: the pairs, one row per original x variant, with ``orig``, ``counterfactual`` and
  ``mask`` embedded as ``Image`` features (the Hub's native form), and the same README.

One record is one image (the original or a variant) with every question of its sample as turns,
answered for that image by the dataset's answer rules. ``--split train=0.9,test=0.1`` assigns each
source image (by its sha256, so no image's variants cross splits) to a split.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from counterfactory import export_recipes
from counterfactory import versions as V
from counterfactory.diff import version_config
from counterfactory.index import pair_doc
from counterfactory.layout import CONFIG, HashingReader, UnsafeMember, tar_samples

TRAINER_FORMATS = ("llava", "trl", "sharegpt", "parquet")
FORMATS = (*TRAINER_FORMATS, *export_recipes.FORMATS)
MARKER = "counterfactory-export.json"  # says this folder is an export (it may be replaced)
ROWS_PER_FILE = 2000  # parquet rows per file (images embedded: a few hundred MB at most)


class ExportError(Exception):
    """An export that cannot be made (one line for the CLI); nothing is left in --out."""


# -- options ---------------------------------------------------------------------------------
def parse_splits(text: str | None) -> list[tuple[str, float]]:
    """``train=0.9,test=0.1`` -> [(train, 0.9), (test, 0.1)] (fractions summing to 1)."""
    if not text:
        return [("train", 1.0)]
    out = []
    for part in text.split(","):
        name, eq, frac = part.partition("=")
        name = name.strip()
        if not eq or not name.isidentifier():
            raise ExportError(f"--split {text!r}: expected NAME=FRACTION[,NAME=FRACTION...], e.g. train=0.9,test=0.1")
        try:
            f = float(frac)
        except ValueError:
            raise ExportError(f"--split {text!r}: {frac!r} is not a fraction") from None
        if not 0 < f <= 1:
            raise ExportError(f"--split {text!r}: {name}={frac} is not in (0, 1]")
        out.append((name, f))
    if len({n for n, _ in out}) != len(out):
        raise ExportError(f"--split {text!r}: a split is named twice")
    if abs(sum(f for _, f in out) - 1.0) > 1e-6:
        raise ExportError(f"--split {text!r}: the fractions add up to {sum(f for _, f in out):g}, not 1")
    return out


def split_of(source_sha256: str, splits: list[tuple[str, float]]) -> str:
    """A split for a source image: a fixed function of its bytes' hash (stable across versions)."""
    u = int(hashlib.sha256(source_sha256.encode()).hexdigest()[:15], 16) / 16**15
    acc = 0.0
    for name, f in splits:
        acc += f
        if u < acc:
            return name
    return splits[-1][0]


# -- reading -----------------------------------------------------------------------------------
def iter_samples(version: V.Version) -> Iterator[tuple[dict[str, Any], dict[str, bytes]]]:
    """(KEY.json document, {part: bytes}) per sample, in shard and input order. Members are read
    from the stream into memory (never extracted); a member that is not a plain ``KEY.part`` file
    or a shard whose bytes differ from the manifest stops the export."""
    for s in version.manifest()["shards"]:
        h = hashlib.sha256()
        with version.open(s["name"]) as f:
            reader = HashingReader(f, h)
            try:
                for key, parts in tar_samples(reader, strict=True, plain_names=True):
                    yield _doc(s["name"], key, parts), parts
            except UnsafeMember as exc:
                raise ExportError(f"{s['name']}: unexpected member {exc.name!r}; run verify") from None
            except tarfile.TarError as exc:
                raise ExportError(f"{s['name']}: unreadable tar ({exc}); run verify") from None
            reader.drain()
        if h.hexdigest() != s["sha256"]:
            raise ExportError(f"{s['name']}: sha256 differs from the manifest; run verify")


def _doc(shard: str, key: str, parts: dict[str, bytes]) -> dict[str, Any]:
    if "json" not in parts:
        raise ExportError(f"{shard}: sample {key} has no json member; run verify")
    return json.loads(parts["json"])


def _media(parts: dict[str, bytes]) -> str:
    orig = next((p for p in sorted(parts) if p.startswith("orig.")), None)
    if orig is None:
        raise ExportError("a sample without an original")
    return orig.split(".", 1)[1]


# -- records -------------------------------------------------------------------------------------
def image_records(doc: dict[str, Any], variants: list[str] | None) -> list[tuple[str, list[tuple[str, str]]]]:
    """(image name, [(question, answer for that image)]) for the original and each kept variant."""
    names = ["orig", *doc["variants"]]
    if variants is not None:
        names = [n for n in names if n in variants]
    return [(n, [(q["question"], "" if q["answers"].get(n) is None else str(q["answers"][n])) for q in doc["qa"]])
            for n in names]


def _llava(rid: str, image: str, turns: list[tuple[str, str]]) -> dict[str, Any]:
    conv = []
    for i, (q, a) in enumerate(turns):
        conv.append({"from": "human", "value": f"<image>\n{q}" if i == 0 else q})
        conv.append({"from": "gpt", "value": a})
    return {"id": rid, "image": image, "conversations": conv}


def _sharegpt(image: str, turns: list[tuple[str, str]]) -> dict[str, Any]:
    msgs = []
    for i, (q, a) in enumerate(turns):
        msgs.append({"role": "user", "content": f"<image>{q}" if i == 0 else q})
        msgs.append({"role": "assistant", "content": a})
    return {"messages": msgs, "images": [image]}


def _trl(turns: list[tuple[str, str]]) -> list[dict[str, Any]]:
    msgs = []
    for i, (q, a) in enumerate(turns):
        content = ([{"type": "image", "text": None}] if i == 0 else []) + [{"type": "text", "text": q}]
        msgs.append({"role": "user", "content": content})
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": a}]})
    return msgs


# -- parquet with Hugging Face features -------------------------------------------------------
_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
_QA = pa.struct([("question", pa.string()), ("kind", pa.string()), ("answer_orig", pa.string()),
                 ("answer_counterfactual", pa.string()), ("changed", pa.bool_())])
_PART = pa.struct([("type", pa.string()), ("text", pa.string())])
_MSG = pa.struct([("role", pa.string()), ("content", pa.list_(_PART))])

_V = {"dtype": "string", "_type": "Value"}
HF_FEATURES = {
    "parquet": {"key": _V, "variant": _V, "orig": {"_type": "Image"}, "counterfactual": {"_type": "Image"},
                "mask": {"_type": "Image"}, "source": _V, "source_sha256": _V,
                "qa": {"_type": "List", "feature": {"question": _V, "kind": _V, "answer_orig": _V,
                                                    "answer_counterfactual": _V,
                                                    "changed": {"dtype": "bool", "_type": "Value"}}},
                "targets": {"_type": "List", "feature": _V}, "edit_method": _V},
    "trl": {"messages": {"_type": "List", "feature": {"role": _V, "content": {"_type": "List", "feature": {
        "type": _V, "text": _V}}}}, "images": {"_type": "List", "feature": {"_type": "Image"}},
        "key": _V, "variant": _V},
}
SCHEMAS = {
    "parquet": pa.schema([("key", pa.string()), ("variant", pa.string()), ("orig", _IMAGE),
                          ("counterfactual", _IMAGE), ("mask", _IMAGE), ("source", pa.string()),
                          ("source_sha256", pa.string()), ("qa", pa.list_(_QA)), ("targets", pa.list_(pa.string())),
                          ("edit_method", pa.string())]),
    "trl": pa.schema([("messages", pa.list_(_MSG)), ("images", pa.list_(_IMAGE)), ("key", pa.string()),
                      ("variant", pa.string())]),
}
# front matter form of the same features (what the Hub and datasets read from README.md)
CARD_FEATURES = {
    "parquet": [{"name": "key", "dtype": "string"}, {"name": "variant", "dtype": "string"},
                {"name": "orig", "dtype": "image"}, {"name": "counterfactual", "dtype": "image"},
                {"name": "mask", "dtype": "image"}, {"name": "source", "dtype": "string"},
                {"name": "source_sha256", "dtype": "string"},
                {"name": "qa", "list": [{"name": n, "dtype": "bool" if n == "changed" else "string"}
                                        for n in ("question", "kind", "answer_orig", "answer_counterfactual", "changed")]},
                {"name": "targets", "list": "string"}, {"name": "edit_method", "dtype": "string"}],
    "trl": [{"name": "messages", "list": [{"name": "role", "dtype": "string"},
                                          {"name": "content", "list": [{"name": "type", "dtype": "string"},
                                                                       {"name": "text", "dtype": "string"}]}]},
            {"name": "images", "list": "image"}, {"name": "key", "dtype": "string"},
            {"name": "variant", "dtype": "string"}],
}


class _ParquetSplit:
    """Rows of one split, cut into files of ROWS_PER_FILE rows (named once the count is known)."""

    def __init__(self, out: Path, fmt: str, split: str) -> None:
        self.out, self.fmt, self.split = out, fmt, split
        self.rows: list[dict[str, Any]] = []
        self.files: list[Path] = []
        self.n = 0

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self.n += 1
        if len(self.rows) >= ROWS_PER_FILE:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        schema = SCHEMAS[self.fmt].with_metadata(
            {"huggingface": json.dumps({"info": {"features": HF_FEATURES[self.fmt]}}, sort_keys=True)})
        path = self.out / "data" / f".{self.split}-{len(self.files):05d}.parquet"
        path.parent.mkdir(exist_ok=True)
        pq.write_table(pa.Table.from_pylist(self.rows, schema=schema), path, row_group_size=100)
        self.files.append(path)
        self.rows = []

    def close(self) -> None:
        self.flush()
        for i, p in enumerate(self.files):  # the Hub's naming: SPLIT-00000-of-00003.parquet
            p.rename(p.with_name(f"{self.split}-{i:05d}-of-{len(self.files):05d}.parquet"))


# -- the export ----------------------------------------------------------------------------------
def check_out(out: Path) -> None:
    """--out must be absent, empty, or an earlier export (it has our marker file)."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise ExportError(f"--out {out} is a folder this command did not create and it is not empty; "
                          "give a new or empty folder")


def export(version: V.Version, fmt: str, out: Path, *, variants: list[str] | None = None,
           splits: list[tuple[str, float]] | None = None,
           progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Write ``version`` in ``fmt`` to ``out`` (written aside, then renamed into place)."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
    check_out(out)
    splits = splits or [("train", 1.0)]
    manifest = version.manifest()
    known = {"orig", *manifest["counts"].get("variants", {})}
    if variants is not None:
        unknown = [v for v in variants if v not in known]
        if unknown:
            raise ExportError(f"--variants: {', '.join(unknown)} not in {version.dataset}@{version.label} "
                              f"(it has {', '.join(sorted(known))})")
    parts_seen = manifest["counts"].get("parts", {})
    if any(p.endswith(".mp4") for p in parts_seen):
        raise ExportError(f"{version.dataset}@{version.label} is a video dataset: export writes image formats; "
                          "read its clips with counterfactory.loader")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.export-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if fmt in export_recipes.FORMATS:
            if variants is not None or len(splits) > 1:
                raise ExportError(f"--format {fmt} writes the paper's own layout: --variants and --split do not apply")
            abstain = version_config(version.path).get("abstain_answer", "unknown") \
                if (version.path / CONFIG).exists() else "unknown"
            ctx = export_recipes.Context(out=tmp, final=out.resolve(), name=version.dataset, abstain=abstain,
                                         progress=progress)
            counts = export_recipes.write(fmt, iter_samples(version), ctx)
        else:
            counts = _write(version, fmt, tmp, variants, splits, progress)
        meta = {"format": fmt, "dataset": version.dataset, "version": version.label,
                "content_id": version.info.get("content_id"), "variants": variants,
                "splits": dict(splits), "records": counts}
        _readme(version, fmt, tmp, splits, counts)
        (tmp / MARKER).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        if out.exists():  # empty, or an earlier export of ours
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _write(version: V.Version, fmt: str, tmp: Path, variants: list[str] | None,
           splits: list[tuple[str, float]], progress: Callable[[int], None] | None) -> dict[str, int]:
    names = [n for n, _ in splits]
    counts = dict.fromkeys(names, 0)
    records: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    tables = {n: _ParquetSplit(tmp, fmt, n) for n in names} if fmt in ("parquet", "trl") else {}
    if fmt in ("llava", "sharegpt"):
        (tmp / "images").mkdir()
    done = 0
    for doc, parts in iter_samples(version):
        split = split_of(doc["source"].get("sha256") or doc["key"], splits)
        ext = _media(parts)
        if fmt == "parquet":
            for v in doc["variants"]:
                if variants is not None and v not in variants:
                    continue
                own = "control_mask.png" if v == "random_mask" else f"{v}_mask.png"
                mask = own if own in parts else "mask.png"
                p = pair_doc(doc, v)
                tables[split].add({**p, "orig": {"bytes": parts[f"orig.{ext}"], "path": f"{doc['key']}.orig.{ext}"},
                                   "counterfactual": {"bytes": parts[f"{v}.{ext}"], "path": f"{doc['key']}.{v}.{ext}"},
                                   "mask": {"bytes": parts[mask], "path": f"{doc['key']}.{mask}"}})
                counts[split] += 1
        else:
            for name, turns in image_records(doc, variants):
                fname = f"{doc['key']}.{name}.{ext}"
                rid = f"{doc['key']}_{name}"
                if fmt == "trl":
                    tables[split].add({"messages": _trl(turns), "key": doc["key"], "variant": name,
                                       "images": [{"bytes": parts[f"{name}.{ext}"], "path": fname}]})
                else:
                    (tmp / "images" / fname).write_bytes(parts[f"{name}.{ext}"])
                    rec = (_llava(rid, f"images/{fname}", turns) if fmt == "llava"
                           else _sharegpt(f"images/{fname}", turns))
                    records[split].append(rec)
                counts[split] += 1
        done += 1
        if progress:
            progress(done)
    for t in tables.values():
        t.close()
    for n, recs in records.items() if fmt in ("llava", "sharegpt") else ():
        (tmp / f"{n}.json").write_text(json.dumps(recs, indent=1, ensure_ascii=False) + "\n")
    if fmt == "sharegpt":  # LLaMA-Factory reads datasets through this file (--dataset NAME)
        info = {f"{version.dataset}_{version.label}_{n}": {
            "file_name": f"{n}.json", "formatting": "sharegpt",
            "columns": {"messages": "messages", "images": "images"},
            "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}
            for n in names}
        (tmp / "dataset_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return counts


def _readme(version: V.Version, fmt: str, tmp: Path, splits: list[tuple[str, float]], counts: dict[str, int]) -> None:
    """Front matter that makes ``datasets.load_dataset(DIR)`` read the parquet formats natively."""
    if fmt not in ("parquet", "trl"):
        return
    lic = (version_config(version.path).get("card") or {}).get("license") if (version.path / CONFIG).exists() else None
    front = {
        "license": lic or "unknown",
        "task_categories": ["visual-question-answering"],
        "tags": ["counterfactual", "counterfactory", *(["trl"] if fmt == "trl" else [])],
        "configs": [{"config_name": "default",
                     "data_files": [{"split": n, "path": f"data/{n}-*.parquet"} for n, _ in splits if counts[n]]}],
        "dataset_info": {"features": CARD_FEATURES[fmt]},
    }
    what = ("one row per original x variant: orig, counterfactual and mask images, the questions with the "
            "answer for each" if fmt == "parquet" else
            "TRL conversational vision rows: messages (content parts image/text) and images")
    body = (f"# {version.dataset} {version.label} ({fmt} export)\n\n{what}. Exported by counterfactory from "
            f"content id `{(version.info.get('content_id') or '')[:12]}`; "
            + ", ".join(f"{n}: {c} rows" for n, c in counts.items()) + ".\n")
    (tmp / "README.md").write_text("---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n\n" + body)

