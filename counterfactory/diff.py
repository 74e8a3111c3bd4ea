"""``counterfactory diff``: what differs between two versions (config keys, with the ones that
change no byte marked by ``spec.output_neutral``; spec; counts; rejects; samples)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from counterfactory.layout import CONFIG, INDEX
from counterfactory.spec import output_neutral
from counterfactory.storage import read_parquet
from counterfactory.versions import Version


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Nested config -> dotted keys; lists of named items (stages) are keyed by name, so a
    change reads ``stages.edit.params.inpaint_radius``."""
    out: dict[str, Any] = {}
    if isinstance(node, dict):
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(node, list) and node and all(isinstance(x, dict) and "name" in x for x in node):
        for x in node:
            out.update(flatten({k: v for k, v in x.items() if k != "name"}, f"{prefix}{x['name']}."))
    elif isinstance(node, list) and node and all(isinstance(x, dict) for x in node):
        for i, x in enumerate(node):
            out.update(flatten(x, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = node
    return out


def config_changes(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    fa, fb = flatten(a), flatten(b)
    changes = []
    for k in sorted(set(fa) | set(fb)):
        if fa.get(k, "<absent>") != fb.get(k, "<absent>"):
            # where work runs, where it is written, when to give up: never a byte of output
            changes.append({"key": k, "a": fa.get(k, "<absent>"), "b": fb.get(k, "<absent>"),
                            "placement_only": output_neutral(k)})
    return changes


def version_config(vdir: Path) -> dict[str, Any]:
    return yaml.safe_load((vdir / CONFIG).read_text()) or {}


def _index(vdir: Path) -> dict[str, dict[str, Any]]:
    return {r["key"]: r for r in read_parquet(vdir / INDEX).to_pylist()}


def _reject_counts(manifest: dict[str, Any]) -> dict[str, int]:
    return {f"{r['stage']}/{r['reason']} ({r['scope']})": r["count"] for r in manifest["rejects"]}


def spec_changes(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    """Differences outside the config: inputs, limit, package version."""
    out = []
    sa, sb = a.get("spec") or {}, b.get("spec") or {}
    for key in ("input_set_hash", "limit", "package_version"):
        if sa.get(key) != sb.get(key):
            out.append({"key": key, "a": sa.get(key), "b": sb.get(key)})
    return out


def diff(a: Version, b: Version, *, samples: bool = True) -> dict[str, Any]:
    ma, mb = a.manifest(), b.manifest()
    ca, cb = ma["counts"], mb["counts"]
    counts = {}
    for k in ("inputs", "samples", "rejected_inputs", "rejected_variants"):
        counts[k] = {"a": ca[k], "b": cb[k], "delta": cb[k] - ca[k]}
    for group in ("variants", "question_kinds"):
        for k in sorted(set(ca[group]) | set(cb[group])):
            x, y = ca[group].get(k, 0), cb[group].get(k, 0)
            counts[f"{group}.{k}"] = {"a": x, "b": y, "delta": y - x}
    ra, rb = _reject_counts(ma), _reject_counts(mb)
    rejects = {k: {"a": ra.get(k, 0), "b": rb.get(k, 0), "delta": rb.get(k, 0) - ra.get(k, 0)}
               for k in sorted(set(ra) | set(rb)) if ra.get(k, 0) != rb.get(k, 0)}
    out: dict[str, Any] = {
        "a": f"{a.dataset}@{a.label}", "b": f"{b.dataset}@{b.label}",
        "content_identical": a.content_id() == b.content_id(),
        "config": config_changes(version_config(a.path), version_config(b.path)),
        "spec": spec_changes(a.info, b.info),
        "counts": counts,
        "rejects": rejects,
    }
    if samples:
        ia, ib = _index(a.path), _index(b.path)
        common = set(ia) & set(ib)
        fields = ("variants", "questions", "answers", "metrics", "mask_area_frac")
        out["samples"] = {
            "added": sorted(set(ib) - set(ia)),
            "removed": sorted(set(ia) - set(ib)),
            "changed": sorted(k for k in common if any(ia[k][f] != ib[k][f] for f in fields)),
            "unchanged": len([k for k in common if all(ia[k][f] == ib[k][f] for f in fields)]),
        }
    return out
