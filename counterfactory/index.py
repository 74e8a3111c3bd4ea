"""The rows of a version's ``index.parquet`` and ``rejects.parquet`` (schemas, typed answers and
metrics, read back from typed columns or the JSON text older versions hold) and the documents of
the ``pairs/`` layout. Written by ``pipeline/writer.py``, read by the card, audit, eval, export."""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from counterfactory.rules import ANSWER_RULES

# Typed index columns: the answers of a question as one field per variant name (every variant
# the answer-rule table knows; a sample's absent variants are null), the metrics in long form
# (variant, metric, value), so parquet readers filter and aggregate them without parsing JSON.
ANSWER_VARIANTS = tuple(ANSWER_RULES)
ANSWERS_TYPE = pa.list_(pa.struct([(v, pa.string()) for v in ANSWER_VARIANTS]))
METRICS_TYPE = pa.list_(pa.struct([("variant", pa.string()), ("metric", pa.string()), ("value", pa.float64())]))

INDEX_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("shard", pa.string()),
    ("input_index", pa.int64()),
    ("source", pa.string()),  # the image's or the clip's path or URI (``source_uri``)
    ("source_sha256", pa.string()),
    ("variants", pa.list_(pa.string())),
    ("questions", pa.list_(pa.string())),
    ("question_kinds", pa.list_(pa.string())),
    ("answers", ANSWERS_TYPE),  # one struct per question, in question order
    ("targets", pa.list_(pa.string())),
    ("n_instances", pa.int32()),
    ("mask_area_frac", pa.float64()),
    ("metrics", METRICS_TYPE),  # numeric and boolean metrics; KEY.json keeps every field
])

REJECT_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("input_index", pa.int64()),
    ("source", pa.string()),  # as in the index; an input rejected before ingest: its reference as read
    ("origin", pa.string()),
    ("stage", pa.string()),
    ("reason", pa.string()),
    ("detail", pa.string()),
    ("variant", pa.string()),  # null: the whole input was rejected
])

# The key of a sample's ``source`` record (``KEY.json``) that names its input: an image's URI
# under "image", a clip's under "video". Every reader takes it through ``source_uri``.
SOURCE_URI_KEYS = ("image", "video")


def source_uri(source: dict[str, Any]) -> str:
    """The input reference (path or URI) of a ``source`` record, image or clip; "" if none."""
    return str(next((source[k] for k in SOURCE_URI_KEYS if source.get(k)), ""))



def index_answers(qa: list[dict[str, Any]]) -> list[dict[str, str]]:
    out = []
    for q in qa:
        unknown = sorted(set(q["answers"]) - set(ANSWER_VARIANTS))
        if unknown:  # a variant the rule table does not know has no column: never drop it silently
            raise ValueError(f"variant(s) {', '.join(unknown)} not in the answer-rule table")
        out.append({v: None if a is None else str(a) for v, a in q["answers"].items()})
    return out


def index_metrics(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for v, m in sorted(metrics.items()):
        items = sorted(m.items()) if isinstance(m, dict) else [(v, m)]
        variant = v if isinstance(m, dict) else None
        rows += [{"variant": variant, "metric": k, "value": float(x)} for k, x in items
                 if isinstance(x, int | float) and not isinstance(x, str)]
    return rows


def answers_of(value: Any) -> list[dict[str, str]]:
    """{variant: answer} per question from an index row (typed, or the JSON text older versions hold)."""
    if isinstance(value, str):
        return json.loads(value)
    return [{k: a for k, a in q.items() if a is not None} for q in value]


def metrics_of(value: Any) -> dict[str, Any]:
    """The metrics of an index row as ``{variant: {metric: value}}`` (typed or older JSON text)."""
    if isinstance(value, str):
        return json.loads(value)
    out: dict[str, Any] = {}
    for r in value:
        if r["variant"] is None:
            out[r["metric"]] = r["value"]
        else:
            out.setdefault(r["variant"], {})[r["metric"]] = r["value"]
    return out




def pair_doc(doc: dict[str, Any], variant: str) -> dict[str, Any]:
    """The ``json`` member of one pair: the same fields, of the same types, in every pair of every
    dataset, so readers that infer or declare one schema (Hugging Face ``datasets``, Ray Data)
    read every row. Per-variant metrics, whose fields differ by edit, stay in ``KEY.json`` and
    ``index.parquet``."""
    src = doc.get("source", {})
    edit = doc.get("edits", {}).get(variant, {})
    return {
        "key": doc["key"],
        "variant": variant,
        "source": source_uri(src),
        "source_sha256": str(src.get("sha256") or ""),
        "qa": [{"question": q["question"], "kind": q["kind"],
                "answer_orig": _text(q["answers"].get("orig")),
                "answer_counterfactual": _text(q["answers"].get(variant)),
                "changed": q["answers"].get("orig") != q["answers"].get(variant)} for q in doc["qa"]],
        "targets": [str(t) for t in doc.get("targets", [])],
        "edit_method": str(edit.get("method") or ""),
    }


def _text(x: Any) -> str | None:
    return None if x is None else str(x)


def pair_samples(doc: dict[str, Any], parts: dict[str, bytes]) -> list[tuple[str, dict[str, bytes]]]:
    """The pairs of one sample, in the order of its variants: ``KEY_VARIANT`` with the original,
    the counterfactual, the region the edit changed (its own mask, the control region for
    ``random_mask``, else the evidence mask; per-frame masks for a clip) and ``json``."""
    orig = next(p for p in sorted(parts) if p.startswith("orig."))
    ext = orig.split(".", 1)[1]
    out = []
    for v in doc["variants"]:
        members = {f"orig.{ext}": parts[orig], f"counterfactual.{ext}": parts[f"{v}.{ext}"]}
        if ext == "mp4":
            members["masks.npz"] = parts["masks.npz"]
        else:
            own = "control_mask.png" if v == "random_mask" else f"{v}_mask.png"
            members["mask.png"] = parts.get(own) or parts["mask.png"]
        members["json"] = json.dumps(pair_doc(doc, v), sort_keys=True, ensure_ascii=False).encode()
        out.append((f"{doc['key']}_{v}", members))
    return out


def pair_features(ext: str) -> dict[str, Any]:
    """The Hugging Face ``datasets`` features of a pair (the card's front matter declares them, so
    nothing is inferred from the first rows): the members by their names in the tar."""
    media = {"dtype": "video"} if ext == "mp4" else {"dtype": "image"}
    qa = [{"name": n, "dtype": t} for n, t in (("question", "string"), ("kind", "string"),
                                                ("answer_orig", "string"), ("answer_counterfactual", "string"),
                                                ("changed", "bool"))]
    doc = [{"name": "key", "dtype": "string"}, {"name": "variant", "dtype": "string"},
           {"name": "source", "dtype": "string"}, {"name": "source_sha256", "dtype": "string"},
           {"name": "qa", "list": qa}, {"name": "targets", "list": "string"},
           {"name": "edit_method", "dtype": "string"}]
    feats = [{"name": f"orig.{ext}", **media}, {"name": f"counterfactual.{ext}", **media}]
    feats.append({"name": "masks.npz", "dtype": "binary"} if ext == "mp4" else {"name": "mask.png", "dtype": "image"})
    return {"features": [*feats, {"name": "json", "struct": doc},
                         {"name": "__key__", "dtype": "string"}, {"name": "__url__", "dtype": "string"}]}
