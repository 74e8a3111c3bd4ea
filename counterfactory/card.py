"""The data card of a version: ``README.md`` (Hugging Face dataset-card style, YAML front matter),
``card.json`` with the same figures, and PNG histograms under ``plots/``.

Every figure is computed from the files of the version folder: ``index.parquet`` (samples,
variants, question kinds, answers, metrics), ``rejects.parquet`` (the yield of every filter),
``manifest.json`` (shards, content id), ``config.yaml`` (seed, stages, models), ``summary.json``
(time per stage) and ``version.json`` (spec, parent). Card files are not listed in the manifest,
so they never change a content id; the PNGs are written without software/date metadata anyway.

The markdown skeleton is ``CARD_TEMPLATE``; ``data_cards/TEMPLATE.md`` is a copy kept equal
by a test.

One module (~750 lines, a third of it the markdown template and the plot code) because the
figures are computed once into one ``card`` dict that the markdown, ``card.json`` and the plots
all render; it sits below the pipeline (the runner calls ``write_card`` at publish).
"""

from __future__ import annotations

import io
import json
import os
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import yaml

from counterfactory import audit, helper_process
from counterfactory.audit_features import finish_prewarm
from counterfactory.diff import diff
from counterfactory.index import answers_of, metrics_of, pair_features
from counterfactory.layout import (
    CARD_JSON,
    CONFIG,
    INDEX,
    MANIFEST,
    PAIRS_DIR,
    PLOTS_DIR,
    README,
    REJECTS,
    SUMMARY,
    VERSION_FILE,
    atomic_write,
    tar_members,
)
from counterfactory.rules import ANSWER_RULES, QUESTION_KINDS, RULE_TEXT
from counterfactory.spec import model_refs
from counterfactory.versions import Version, read_version

CARD_TEMPLATE = """\
---
{front_matter}
---

# {dataset} {version}

{summary}

{license_line}

| spec id | content id | parent | created by |
|---|---|---|---|
| `{spec_id_short}` | `{content_id_short}` | {parent} | counterfactory {package_version} |

## Load it

{load_section}

## Counts

{counts_table}

Samples by variant and question kind (a sample carries every question of its input, answered
for the original and for every variant it kept):

{kind_variant_table}

Abstentions ("{abstain}") by variant and question kind:

{abstain_table}

## Answer rules

{rule_table}

## Inputs and what their annotations assert

{inputs_table}

## Shortcut audit

{audit}

## Filters and rejects (the yield of every filter)

Whole inputs, in stage order:

{yield_table}

Variants dropped from otherwise good samples:

{variant_reject_table}

## Mask area and verification metrics

![mask area](plots/mask_area.png)

![verification metrics](plots/metrics.png)

{histogram_table}

## Sample schema

{schema}

## Models

{models}

## Time per stage

{timing_table}

## Reproduce

- seed: {seed}
- config hash: `{config_hash}`
- spec id: `{spec_id}`
- content id (sha256 of manifest.json): `{content_id}`

```bash
{commands}
```

## Parent version and what changed

{changes}
"""

def schema_members(parts: dict[str, int] | list[str], variants: list[str]) -> list[tuple[str, str]]:
    """The members of a sample as the shards hold them (the manifest counts every part)."""
    names = sorted(parts)
    originals = [p for p in names if p.startswith("orig.")]
    video = any(p.endswith(".mp4") for p in originals)
    out = [(f"KEY.{p}", "the original clip (H.264, frames sampled at the ingest fps, turned upright)" if video
            else "the original image (8-bit RGB, EXIF orientation applied)") for p in originals]
    done = set(originals)
    for ext in sorted({p.split(".", 1)[1] for p in originals}):
        kinds = [v for v in variants if f"{v}.{ext}" in parts]
        done.update(f"{v}.{ext}" for v in kinds)
        if kinds:
            out.append((f"KEY.<variant>.{ext}", f"one per kept variant ({', '.join(kinds)}); the answer each "
                                                "gets per question kind is in the answer rules above"))
    known = [
        ("mask.png", "evidence mask (all instances, dilated), 0/255"),
        ("control_mask.png", "the control region (only with random_mask)"),
        ("masks.npz", "per-frame masks: masks (evidence, dilated), masks_core, labels (instance ids), each "
                      "T x H x W uint8, and times (seconds from the clip's start)"),
    ]
    out += [(f"KEY.{p}", d) for p, d in known if p in parts]
    done.update(p for p, _ in known)
    own = [v for v in variants if f"{v}_mask.png" in parts]
    if own:
        out.append(("KEY.<variant>_mask.png", f"the region an edit changed of its own ({', '.join(own)}), 0/255"))
        done.update(f"{v}_mask.png" for v in own)
    if "json" in parts:
        out.append(("KEY.json", "key, source (path, sha256, size, origin), qa (question, kind, source, answers "
                                "per variant), targets, instances, variants, edits, mask, metrics, provenance, "
                                "variant_rejects"))
        done.add("json")
    return out + [(f"KEY.{p}", "") for p in names if p not in done]


def _short(x: str | None) -> str:
    return (x or "-")[:12]


def _table(head: list[str], rows: list[list[Any]]) -> str:
    if not rows:
        return "_none_"
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def rule_table(variants: list[str]) -> str:
    cols = ["orig", *variants]
    return _table(["question kind", *cols],
                  [[k, *(RULE_TEXT[ANSWER_RULES[v][k]] for v in cols)] for k in QUESTION_KINDS
                   if all(k in ANSWER_RULES.get(v, {}) for v in cols)])


def _hist(values: list[float], edges: np.ndarray | None = None, bins: int = 20) -> dict[str, Any]:
    arr = np.asarray(values, dtype=np.float64)
    if edges is None:
        edges = np.histogram_bin_edges(arr, bins=bins) if arr.size else np.linspace(0, 1, bins + 1)
    counts, edges = np.histogram(arr, bins=edges)
    return {"n": int(arr.size), "edges": [round(float(e), 6) for e in edges],
            "counts": [int(c) for c in counts],
            "min": round(float(arr.min()), 6) if arr.size else None,
            "median": round(float(np.median(arr)), 6) if arr.size else None,
            "max": round(float(arr.max()), 6) if arr.size else None}


def _parquet_rows(path: Path, columns: list[str]) -> Iterator[dict[str, Any]]:
    """The rows of a parquet file a batch at a time: a card never holds a whole index."""
    for batch in pq.ParquetFile(path, pre_buffer=False).iter_batches(batch_size=4096, columns=columns, use_threads=False):
        yield from batch.to_pylist()


def compute_card(vdir: Path, *, with_audit: bool = True) -> dict[str, Any]:
    """All figures of the card, from the files of one version folder (``with_audit=False``:
    the audit's place left empty, for ``attach_audit``)."""
    manifest = json.loads((vdir / MANIFEST).read_text())
    cfg = yaml.safe_load((vdir / CONFIG).read_text())
    info = json.loads((vdir / VERSION_FILE).read_text()) if (vdir / VERSION_FILE).exists() else {}
    summary = json.loads((vdir / SUMMARY).read_text()) if (vdir / SUMMARY).exists() else {}
    abstain = cfg.get("abstain_answer", "unknown")
    stage_names = [s["name"] for s in cfg.get("stages", [])]

    variants_c: Counter[str] = Counter()
    kinds_c: Counter[str] = Counter()
    kind_variant: dict[str, Counter[str]] = defaultdict(Counter)
    abstentions: dict[str, Counter[str]] = defaultdict(Counter)
    metric_values: dict[str, list[float]] = defaultdict(list)
    mask_areas: list[float] = []
    for row in _parquet_rows(vdir / INDEX,
                             ["variants", "question_kinds", "answers", "metrics", "mask_area_frac"]):
        mask_areas.append(row["mask_area_frac"])
        variants_c.update(row["variants"])
        kinds_c.update(row["question_kinds"])
        answers = answers_of(row["answers"])
        for kind, ans in zip(row["question_kinds"], answers, strict=True):
            for v in ["orig", *row["variants"]]:
                kind_variant[kind][v] += 1
                if ans.get(v) == abstain:
                    abstentions[kind][v] += 1
        metrics = metrics_of(row["metrics"])
        for v, m in sorted(metrics.items()):
            if isinstance(m, dict):
                for name, val in sorted(m.items()):
                    if isinstance(val, int | float):
                        metric_values[f"{v}.{name}"].append(float(val))

    per_stage: dict[str, Counter[str]] = defaultdict(Counter)
    vrej: Counter[tuple[str, str, str]] = Counter()
    for r in _parquet_rows(vdir / REJECTS, ["stage", "variant", "reason"]):
        if r["variant"] is None:
            per_stage[r["stage"]][r["reason"]] += 1
        else:
            vrej[(r["stage"], r["variant"], r["reason"])] += 1
    rejected_inputs = sum(sum(c.values()) for c in per_stage.values())
    order = stage_names + sorted(s for s in per_stage if s not in stage_names)
    entered = manifest["counts"]["inputs"]
    filters = []
    for st in order:
        rej = sum(per_stage[st].values())
        passed = entered - rej
        filters.append({"stage": st, "entered": entered, "rejected": rej, "passed": passed,
                        "yield": round(passed / entered, 4) if entered else None,
                        "reasons": dict(sorted(per_stage[st].items()))})
        entered = passed
    variant_rejects = [{"stage": s, "variant": v, "reason": why, "count": n}
                       for (s, v, why), n in sorted(vrej.items())]

    histograms = {"mask_area_frac": _hist(mask_areas, np.linspace(0, 1, 21))}
    for k in sorted(metric_values):
        histograms[k] = _hist(metric_values[k])

    stages_cfg = cfg.get("stages", [])
    prov = first_sample_provenance(vdir, manifest)
    models = model_refs([{"name": n, **p} for n, p in prov.items()]) or model_refs(stages_cfg)
    variants_order = [v for v in ("remove", "blackout", "random_mask") if v in variants_c]
    variants_order += sorted(v for v in variants_c if v not in variants_order)
    label = info.get("label") or vdir.name
    dataset = manifest["dataset"]
    root = info.get("root")
    root_arg = _display_root(root)
    commands = [f"counterfactory regenerate {dataset}@{label} --root {root_arg}   "
                "# re-run this spec in a scratch folder, compare content ids",
                f"counterfactory verify {dataset}@{label} --root {root_arg}"]
    if info.get("command"):
        commands.insert(0, f"{info['command']}   # the command that made it")
    changes = _changes(vdir, info)
    parts = manifest["counts"].get("parts") or {}
    media = next((p.split(".", 1)[1] for p in sorted(parts) if p.startswith("orig.")), "jpg")
    card_cfg = cfg.get("card") or {}
    card = {
        "format": "counterfactory-card/1",
        "dataset": dataset,
        "version": label,
        "spec_id": info.get("spec_id"),
        "content_id": info.get("content_id"),
        "parent": info.get("parent"),
        "package_version": manifest["package_version"],
        "config_hash": manifest["config_hash"],
        "seed": cfg.get("seed"),
        "abstain_answer": abstain,
        "license": card_cfg.get("license"),
        "extra_tags": list(card_cfg.get("tags") or []),
        "media": media,
        "pairs": manifest["counts"].get("pairs"),
        # what the pairs/ copy costs beside the per-source shards (issue 26: it doubles the bytes)
        "bytes": {"shards": sum(s["bytes"] for s in manifest["shards"]),
                  "pairs": sum(f["bytes"] for n, f in manifest.get("files", {}).items() if n.startswith(f"{PAIRS_DIR}/"))},
        "counts": {
            "inputs": manifest["counts"]["inputs"],
            "samples": len(mask_areas),
            "shards": len(manifest["shards"]),
            "rejected_inputs": rejected_inputs,
            "rejected_variants": sum(vrej.values()),
            "questions": sum(kinds_c.values()),
            "variants": dict(sorted(variants_c.items())),
            "question_kinds": dict(sorted(kinds_c.items())),
            "by_kind_and_variant": {k: dict(sorted(c.items())) for k, c in sorted(kind_variant.items())},
            "abstentions": {k: dict(sorted(c.items())) for k, c in sorted(abstentions.items())},
        },
        "variants": variants_order,
        "filters": filters,
        "variant_rejects": variant_rejects,
        "histograms": histograms,
        "plots": ["plots/mask_area.png", "plots/metrics.png"],
        "schema": [{"member": m, "description": d}
                   for m, d in schema_members(manifest["counts"].get("parts") or ["orig.jpg", "mask.png", "json"],
                                              variants_order)],
        "models": models,
        "stages": [{"name": s["name"], "backend": s.get("backend", "default")} for s in stages_cfg],
        "timing": {"wall_seconds": summary.get("wall_seconds"), "stage_seconds": summary.get("stage_seconds", {}),
                   "audit_seconds": None, "audit_stream_seconds": None},
        "regenerate": commands,
        "changes": changes,
        "inputs": input_kinds(cfg),
        "audit": None,
    }
    return attach_audit(card, audit.card_audit(vdir, cfg)) if with_audit else card


def attach_audit(card: dict[str, Any], audit: dict[str, Any] | None) -> dict[str, Any]:
    """The audit's block and its timing (at publish; in the stream, on the workers: the rest of
    the card is reproducible) put into a card."""
    card["audit"] = audit
    card["timing"]["audit_seconds"] = audit["cost"].pop("seconds", None) if audit else None
    card["timing"]["audit_stream_seconds"] = audit["cost"].pop("stream_seconds", None) if audit else None
    return card


# -- inputs and the shortcut audit (counterfactory.audit) ------------------------------------------
def input_kinds(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Each input's kind and which categories its annotations are exhaustive for: where an
    answer may say "no"/"0" about a category (elsewhere it abstains)."""
    out = []
    for i, inp in enumerate(cfg.get("inputs", [])):
        kind = inp.get("kind", "?")
        ex = inp.get("exhaustive")
        if kind in ("procedural", "procedural_video"):
            what = "every category (all objects of a scene are annotated)"
        elif kind == "coco":
            what = "the categories listed in the file" if ex is None else _exhaustive_text(ex)
        elif kind == "manifest":
            what = _exhaustive_text(ex if ex is not None else "annotated") + "; a line may declare its own"
        else:
            what = "as the video stage asserts"
        out.append({"input": i, "kind": kind, "source": inp.get("path") or f"{inp.get('count', 0)} generated",
                    "exhaustive": what})
    return out


def _exhaustive_text(ex: Any) -> str:
    if ex is True:
        return "every category"
    if ex is False:
        return "none (absence is never asserted)"
    if ex == "annotated":
        return "the categories each image annotates"
    return ", ".join(str(c) for c in ex) or "none"


def _display_root(root: str | None) -> str:
    if not root:
        return "ROOT"
    try:
        rel = os.path.relpath(root)
    except ValueError:
        return root
    return rel if not rel.startswith("..") else root


def _changes(vdir: Path, info: dict[str, Any]) -> dict[str, Any] | None:
    """What changed since the parent (the version ``latest`` named when this one was made)."""
    parent = info.get("parent")
    if not parent:
        return None
    pdir = vdir.parent / parent
    if not (pdir / MANIFEST).exists():
        return {"parent": parent, "missing": True}
    me = Version(info.get("label", vdir.name), vdir, info)
    d = diff(read_version(pdir), me)
    s = d["samples"]
    return {"parent": parent, "config": d["config"], "spec": d["spec"],
            "counts": {k: v for k, v in d["counts"].items() if v["delta"]},
            "rejects": d["rejects"],
            "samples": {"added": len(s["added"]), "removed": len(s["removed"]),
                        "changed": len(s["changed"]), "unchanged": s["unchanged"]}}


# -- rendering ---------------------------------------------------------------------------------
def _fmt(x: Any) -> str:
    return json.dumps(x) if not isinstance(x, str) else x


def render_markdown(card: dict[str, Any]) -> str:
    c = card["counts"]
    variants = card["variants"]
    cols = ["orig", *variants]
    video = any(m["member"].endswith(".mp4") for m in card["schema"])
    pairs = card.get("pairs") is not None
    # the pairs layout is what the Hub's viewer, datasets.load_dataset(folder) and Ray read as is;
    # a version written without it points at the per-source shards
    data_files = f"{PAIRS_DIR}/*.tar" if pairs else f"{card['dataset']}-*.tar"
    front = {
        "pretty_name": f"{card['dataset']} {card['version']}",
        "license": card.get("license") or "unknown",
        "task_categories": ["video-text-to-text"] if video else ["visual-question-answering"],
        "tags": ["counterfactual", "webdataset", "counterfactory",
                 *(t for t in card.get("extra_tags", []) if t not in ("counterfactual", "webdataset", "counterfactory"))],
        "size_categories": ["n<1K" if c["samples"] < 1000 else "1K<n<10K" if c["samples"] < 10_000 else "10K<n<100K"
                            if c["samples"] < 100_000 else "100K<n"],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": data_files}]}],
        **({"dataset_info": pair_features(card.get("media", "jpg"))} if pairs else {}),
        "counterfactory": {"version": card["version"], "spec_id": card["spec_id"],
                           "content_id": card["content_id"], "parent": card["parent"]},
    }
    summary = (
        f"Paired counterfactual data made by counterfactory: {c['samples']} samples in {c['shards']} "
        f"WebDataset shard(s), from {c['inputs']} inputs. Each sample holds an original "
        f"{'clip' if video else 'image'}, variants in which the evidence a question depends on was removed, "
        "masked, altered or moved (plus controls), the evidence "
        f"{'masks of every frame' if video else 'mask'}, and the same questions answered for every variant "
        "by an explicit rule."
    )
    counts_table = _table(["inputs", "samples", "questions", "rejected inputs", "rejected variants", "shards"],
                          [[c["inputs"], c["samples"], c["questions"], c["rejected_inputs"],
                            c["rejected_variants"], c["shards"]]])
    kinds = sorted(c["by_kind_and_variant"])
    kv = _table(["question kind", *cols, "questions"],
                [[k, *(c["by_kind_and_variant"][k].get(v, 0) for v in cols), c["question_kinds"].get(k, 0)]
                 for k in kinds] + [["samples", c["samples"], *(c["variants"].get(v, 0) for v in variants), ""]])
    ab = _table(["question kind", *cols], [[k, *(c["abstentions"].get(k, {}).get(v, 0) for v in cols)]
                                          for k in kinds])
    yt = _table(["stage", "entered", "rejected", "passed", "yield", "reasons"],
                [[f["stage"], f["entered"], f["rejected"], f["passed"],
                  "-" if f["yield"] is None else f"{100 * f['yield']:.1f}%",
                  ", ".join(f"{r} {n}" for r, n in f["reasons"].items()) or "-"] for f in card["filters"]])
    vt = _table(["stage", "variant", "reason", "count"],
                [[r["stage"], r["variant"], r["reason"], r["count"]] for r in card["variant_rejects"]])
    ht = _table(["figure", "n", "min", "median", "max"],
                [[k, h["n"], h["min"], h["median"], h["max"]] for k, h in card["histograms"].items()])
    schema = _table(["member", "content"], [[f"`{s['member']}`", s["description"]] for s in card["schema"]])
    if card["models"]:
        models = _table(["stage", "backend", "model ids and revisions"],
                        [[m["stage"], m["backend"], ", ".join(f"{k}={v}" for k, v in m.items()
                                                              if k not in ("stage", "backend"))]
                         for m in card["models"]])
    else:
        models = ("No learned weights: every stage runs the embedded default ("
                  + ", ".join(f"{s['name']}={s['backend']}" for s in card["stages"])
                  + "): annotation matching, polygon/GrabCut masks, OpenCV inpainting, template QA.")
    t = card["timing"]
    timing = _table(["stage", "seconds (summed over samples)"],
                    [[k, f"{v:.3f}"] for k, v in sorted(t["stage_seconds"].items())]
                    + [["wall", "-" if t["wall_seconds"] is None else f"{t['wall_seconds']:.3f}"]]
                    + ([["audit", f"{t['audit_seconds']:.3f}"]] if t.get("audit_seconds") is not None else [])
                    + ([["audit_in_stream", f"{t['audit_stream_seconds']:.3f}"]]
                       if t.get("audit_stream_seconds") is not None else []))
    ch = card["changes"]
    if ch is None:
        changes = "None: this is the first version of the dataset."
    elif ch.get("missing"):
        changes = f"Parent {ch['parent']} (no longer on disk)."
    else:
        parts = [f"Parent: {ch['parent']}.", ""]
        diffs = [f"- `{x['key']}`: {_fmt(x['a'])} → {_fmt(x['b'])}"
                 + (" (placement only)" if x.get("placement_only") else "") for x in ch["config"] + ch["spec"]]
        parts += diffs or ["- spec: unchanged"]
        parts += [f"- `{k}`: {v['a']} → {v['b']} ({v['delta']:+d})" for k, v in ch["counts"].items()]
        parts += [f"- rejects {k}: {v['a']} → {v['b']}" for k, v in ch["rejects"].items()]
        s = ch["samples"]
        parts.append(f"- samples: {s['added']} added, {s['removed']} removed, {s['changed']} changed, "
                     f"{s['unchanged']} unchanged")
        changes = "\n".join(parts)
    if card.get("license"):
        license_line = f"License: `{card['license']}` (the config's `card.license`)."
    else:
        license_line = ("License: **none declared** (front matter `license: unknown`); set `card.license` in the "
                        "config to the license of the inputs before sharing this dataset.")
    return CARD_TEMPLATE.format(
        license_line=license_line, load_section=_load_section(card, pairs),
        front_matter=yaml.safe_dump(front, sort_keys=False).strip(),
        dataset=card["dataset"], version=card["version"], summary=summary,
        spec_id_short=_short(card["spec_id"]), content_id_short=_short(card["content_id"]),
        parent=card["parent"] or "-", package_version=card["package_version"],
        counts_table=counts_table, kind_variant_table=kv, abstain=card["abstain_answer"], abstain_table=ab,
        rule_table=rule_table(variants or ["remove", "blackout", "random_mask"]),
        inputs_table=_table(["input", "kind", "source", "absence asserted for"],
                            [[i["input"], i["kind"], i["source"], i["exhaustive"]] for i in card.get("inputs", [])]),
        audit=_audit_markdown(card.get("audit")),
        yield_table=yt, variant_reject_table=vt, histogram_table=ht, schema=schema, models=models,
        timing_table=timing, seed=card["seed"], config_hash=card["config_hash"],
        spec_id=card["spec_id"] or "-", content_id=card["content_id"] or "-",
        commands="\n".join(card["regenerate"]), changes=changes,
    )


def _audit_markdown(a: dict[str, Any] | None) -> str:
    if a and a.get("error"):
        return f"**The audit could not be computed:** {a['error']}"
    return audit.render_markdown(a) if a else "_not computed (audit.sample_pairs: 0)_"


def _pairs_cost(card: dict[str, Any]) -> str:
    b = card.get("bytes") or {}
    if not b.get("pairs"):
        return ""
    return (f" Their cost: {b['pairs'] / 1e6:.1f} MB of `pairs/` beside {b['shards'] / 1e6:.1f} MB of shards "
            "(each original is stored once per variant; `output.pairs: false` leaves them out).")


def _load_section(card: dict[str, Any], pairs: bool) -> str:
    ext = card.get("media", "jpg")
    if not pairs:
        return ("This version has no `pairs/` folder (written with `output.pairs: false`): read the per-source "
                "shards with `counterfactory.loader` or `webdataset`.")
    return f"""`pairs/` holds one sample per original x variant ({card['pairs']} pairs), each with the same members:
`orig.{ext}`, `counterfactual.{ext}`, {'`masks.npz`' if ext == 'mp4' else '`mask.png` (the region the edit changed)'}
and `json` (key, variant, source, qa with the answer for the original and for the counterfactual, targets,
edit method). They are written from the same bytes as the per-source shards, and listed with their
sha256 in `manifest.json`.{_pairs_cost(card)}

```python
from datasets import load_dataset            # this folder, or the Hub repo it was pushed to
pairs = load_dataset("path/to/{card['dataset']}/{card['version']}", split="train")

import ray                                     # default decoder: every sample has the same members
ray.data.read_webdataset("path/to/{card['dataset']}/{card['version']}/pairs")

import webdataset as wds                       # per-source samples: the original and all its variants
wds.WebDataset("path/to/{card['dataset']}/{card['version']}/{card['dataset']}-{{000000..{card['counts']['shards'] - 1:06d}}}.tar")
```

Exports for trainers: `counterfactory export {card['dataset']}@{card['version']} --format llava|trl|sharegpt|parquet --out DIR`."""


# -- plots -------------------------------------------------------------------------------------
# what each verification metric measures, as an axis label with its unit
METRIC_UNITS = {
    "mask_area_frac": "evidence mask area (fraction of the image)",
    "inside_mad": "mean abs. change inside the region (0-255 levels)",
    "outside_changed_frac": "changed pixels outside the region (fraction)",
    "contrast_ratio": "object contrast left / before (ratio)",
    "object_contrast": "object contrast before (0-255 levels)",
    "control_overlap_px": "control region overlapping the evidence (pixels)",
    "mirror_exact": "mirror exact (1 = yes)",
    "redetect_score": "detector score on the edited image (0-1)",
    "redetect_score_orig": "detector score on the original (0-1)",
    # the footprint checks (footprint.py; verify's thresholds): the fill or insert against its ring
    "texture_ratio": "fill's high-pass energy / its ring's (ratio)",
    "flat_patch": "flat patch in the fill (1 = yes)",
    "flat_share": "flat share of the region (fraction)",
    "flat_share_ring": "flat share of the ring (fraction)",
    "color_distance": "region vs ring colour histograms (Hellinger, 0-1)",
    "boundary_score": "edges along the removed object's outline / the ring's (ratio)",
    "seam_score": "edges along the region's border / the ring's (ratio)",
    "fill_contrast": "object contrast left in the fill (0-255 levels)",
    "invented_ncc": "best match of another object inside the fill (NCC, -1 to 1)",
    "invented_score": "detector score of an object found in the fill (0-1)",
    "insert_texture_ratio": "insert's high-pass energy / its ring's (ratio)",
    "insert_flat_patch": "flat patch in the insert (1 = yes)",
    "insert_flat_share": "flat share of the insert (fraction)",
    "insert_flat_share_ring": "flat share of the insert's ring (fraction)",
    "insert_seam_score": "edges along the insert's border / the ring's (ratio)",
    "insert_chroma": "insert's channel spread (0-255 levels; 0 = gray)",
    "achromatic": "grayscale image (1 = yes)",
    "object_texture_ratio": "the original object's high-pass energy / its ring's (ratio)",
    "object_flat_patch": "flat patch in the original object (1 = yes)",
    "cutout": "a real cut-out inserted (1 = yes)",
}


def constant_metrics(hs: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Metrics whose every value, over every variant, is the same number: a histogram of them
    is one bar that says nothing a sentence does not (``outside_changed_frac`` is 0 by design)."""
    by_metric: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for k, h in hs.items():
        if k != "mask_area_frac":
            by_metric[k.partition(".")[2]].append(h)
    out = {}
    for metric, hists in sorted(by_metric.items()):
        values = {h["min"] for h in hists if h["n"]} | {h["max"] for h in hists if h["n"]}
        if len(values) == 1:
            out[metric] = values.pop()
    return out


PLOT_METADATA = {"Software": None}  # no matplotlib version in the PNG bytes
PLOT_RC = {"axes.titlesize": 9, "xtick.labelsize": 7, "ytick.labelsize": 7, "legend.fontsize": 7}


def render_plots(card: dict[str, Any]) -> dict[str, bytes]:
    """PNG bytes of the histograms (matplotlib Agg, no pyplot state, no metadata): mask area
    alone, then one panel per verification metric with every variant that reports it overlaid
    as a step outline, so variants compare on one axis. A variant has one colour in every panel
    and one legend names them all. Matplotlib's per-axes tick and text layout is what a card
    costs, so panels are few (one per metric, not per variant and metric: 21 panels took ~1.2 s
    of every run), with at most 4 ticks per axis and one legend instead of one per panel."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    def png(fig: Figure) -> bytes:
        FigureCanvasAgg(fig)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=80, metadata=PLOT_METADATA)
        return buf.getvalue()

    def style(ax: Any, title: str, xlabel: str) -> None:
        # y given: matplotlib otherwise measures the tick labels to place every title
        ax.set_title(title, y=1.0, pad=4)
        ax.set_xlabel(xlabel, fontsize=7, labelpad=1)
        ax.set_ylabel("samples", fontsize=7, labelpad=1)
        ax.xaxis.set_major_locator(MaxNLocator(4))
        ax.yaxis.set_major_locator(MaxNLocator(4, integer=True))

    # sizes set before the axes exist (tick_params after would rebuild every tick)
    with matplotlib.rc_context(PLOT_RC):
        hs = card["histograms"]
        fig = Figure(figsize=(5, 3))
        ax = fig.add_subplot(1, 1, 1)
        h = hs["mask_area_frac"]
        ax.stairs(h["counts"], h["edges"], fill=True, color="#4c72b0")
        style(ax, f"evidence mask area (n={h['n']})", METRIC_UNITS["mask_area_frac"])
        # fixed margins instead of tight_layout, which measures every label (the bulk of its cost)
        fig.subplots_adjust(left=0.12, right=0.97, bottom=0.17, top=0.88)
        out = {"plots/mask_area.png": png(fig)}
        constant = constant_metrics(hs)
        by_metric: dict[str, list[tuple[str, dict[str, Any]]]] = defaultdict(list)
        for k, h in hs.items():
            if k != "mask_area_frac":
                variant, _, metric = k.partition(".")
                if metric not in constant:
                    by_metric[metric].append((variant, h))
        variants = sorted({v for pairs in by_metric.values() for v, _ in pairs})
        colour = {v: f"C{i % 10}" for i, v in enumerate(variants)}
        ncol = 3
        nrow = max(1, -(-len(by_metric) // ncol))
        fig = Figure(figsize=(4 * ncol, 2.6 * nrow))
        for i, metric in enumerate(sorted(by_metric)):
            ax = fig.add_subplot(nrow, ncol, i + 1)
            _outlines(ax, [(h, colour[variant]) for variant, h in by_metric[metric]])
            style(ax, f"{metric} (n={max(h['n'] for _, h in by_metric[metric])})",
                  METRIC_UNITS.get(metric, metric))
        if by_metric:
            from matplotlib.lines import Line2D

            fig.legend([Line2D([], [], color=colour[v], linewidth=1.5) for v in variants], variants,
                       loc="lower center", ncol=min(len(variants), 9), frameon=False)
        else:
            fig.text(0.5, 0.5, "no verification metric varies" if constant else "no verification metrics",
                     ha="center")
        if constant:  # said in a line, not drawn as one-bar histograms
            fig.text(0.01, 0.995, "constant: " + ", ".join(f"{m} = {v:g}" for m, v in constant.items()),
                     ha="left", va="top", fontsize=7)
        height = 2.6 * nrow  # inches: 0.45 above the top titles, 0.85 below for tick and axis labels and the legend
        fig.subplots_adjust(left=0.05, right=0.98, bottom=0.85 / height, top=1 - 0.45 / height, hspace=0.8, wspace=0.25)
        out["plots/metrics.png"] = png(fig)
        return out


def _outlines(ax: Any, hists: list[tuple[dict[str, Any], str]]) -> None:
    """Each histogram's step outline (what ``ax.stairs(counts, edges)`` draws: up from 0 at the
    first edge, along the counts, down to 0 at the last) in one LineCollection, one colour per
    histogram, and the limits ``stairs`` would autoscale to (x: the edges with 5 % margins; y:
    from 0, its sticky baseline, with a 5 % margin on top): one artist per panel instead of one per variant (issue 27: the card's figures
    are matplotlib artists, created and drawn one by one)."""
    from matplotlib.collections import LineCollection

    lines = []
    for h, _ in hists:
        edges, counts = np.asarray(h["edges"], np.float64), np.asarray(h["counts"], np.float64)
        xy = np.empty((2 * len(counts) + 2, 2))
        xy[:, 0] = np.repeat(edges, 2)
        xy[0, 1] = xy[-1, 1] = 0.0
        xy[1:-1, 1] = np.repeat(counts, 2)
        lines.append(xy)
    ax.add_collection(LineCollection(lines, colors=[c for _, c in hists], linewidths=1.2), autolim=False)
    lo, hi = min(float(x[0, 0]) for x in lines), max(float(x[-1, 0]) for x in lines)
    top = max(float(x[:, 1].max()) for x in lines)
    pad = 0.05 * (hi - lo) if hi > lo else 0.5  # matplotlib's default 5 % margins (no sticky x edge)
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_ylim(0.0, 1.05 * top if top > 0 else 1.0)


def write_card(vdir: Path, **_: Any) -> dict[str, Any]:
    """Write README.md, card.json and plots/ into a version folder (or its staging folder).

    The runner calls it on the staging folder just before the publish rename: a dataset over
    the audit's thresholds with ``failure_budget.refuse_on_audit`` (``run --strict``) raises
    ``AuditFailed`` here, so nothing is published and no card is written."""
    cfg = yaml.safe_load((vdir / CONFIG).read_text())
    # the audit (~2 s of fits at N=1,000) on the helper process while this one computes the rest
    # and draws the plots (~1 s); computed here when there is no helper (helper_process)
    pending = helper_process.submit(audit.card_audit, vdir, cfg)
    card = compute_card(vdir, with_audit=pending is None)
    finish_prewarm()  # the driver's publish imports (audit_features.prewarm_publish): done by now
    plots = render_plots(card)
    if pending is not None:
        attach_audit(card, helper_process.result(pending, audit.card_audit, vdir, cfg))
    _gate(card, cfg)
    (vdir / PLOTS_DIR).mkdir(exist_ok=True)
    for name, data in plots.items():
        atomic_write(vdir / name, data)
    atomic_write(vdir / CARD_JSON, json.dumps(card, indent=2, sort_keys=True, ensure_ascii=False).encode())
    atomic_write(vdir / README, render_markdown(card).encode())
    return card


def _gate(card: dict[str, Any], cfg: dict[str, Any]) -> None:
    warnings = (card.get("audit") or {}).get("warnings") or []
    if warnings and (cfg.get("failure_budget") or {}).get("refuse_on_audit"):
        more = f" (and {len(warnings) - 1} more)" if len(warnings) > 1 else ""
        raise audit.AuditFailed(f"audit: {warnings[0]}{more}; nothing published (--strict)")


def first_sample_provenance(vdir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Stage provenance of the first sample (every sample of a version has the same stages)."""
    for s in manifest.get("shards", []):
        p = vdir / s["name"]
        if not p.exists():
            continue
        with open(p, "rb") as f:
            for m, data in tar_members(f, want=lambda name: name.endswith(".json")):
                if m.name.endswith(".json"):
                    return json.loads(data).get("provenance", {}).get("stages", {})
    return {}
