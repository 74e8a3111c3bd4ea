"""Data validity benchmark (issue 16): do the pairs pass a researcher's look? `make bench-validity`.

Runs procedural scenes (exact masks, object-free renders) and the demo photos through the
stage code in a plain loop (``runner.local_batches``, as bench/run.py's floor) and prints, per
variant:

  made / kept     variants the edit stage made, and those verify kept (pass rate)
  px ok           kept scene variants whose pixels outside the edited region are the original's
  ans ok          kept scene answers equal to the scene's ground truth (orig, remove, blackout,
                  random_mask, insert: the kinds whose truth this script computes; others "-")
  tex             mean texture-energy ratio of the fill to its ring (remove, count; 1.0 = the
                  real background's, Telea ~0.2), over every fill made; insert: of the inserted
                  object's interior to the ring outside its blended region
  flat            share of fills (inserted objects) the flat-texture detector finds
                  (counterfactory.footprint)
  obj tex         insert: the same texture ratio of the real object (the evidence, in the
                  original): what an object in that image looks like (procedural ~0, photos >= 0.2)
  gray!           insert: colored objects pasted into an achromatic (grayscale) original
  err             mean |fill - object-free render| inside the mask (remove, scenes)
  ctl/obj         controls touching another annotated object; silhouette: controls that are
                  the evidence's own silhouette moved

The shortcut audit's figures (probe AUC, blind-answerer accuracy, presupposing questions) come
from ``counterfactory.audit`` on a published version: pass ``--version-dir outputs/demo/vN``.

``--photo-table`` (issue 31): each demo photo input and variant, kept or rejected with its stage
and reason, as a markdown table.

Usage: python bench/validity.py [--scenes 100] [--method patch|telea|ns] [--no-photos] [--photo-table]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from counterfactory import footprint, scenes  # noqa: E402
from counterfactory.index import source_uri  # noqa: E402
from counterfactory.pipeline.config import validate_config  # noqa: E402
from counterfactory.pipeline.runner import local_batches  # noqa: E402
from counterfactory.rules import side_of_x, singular  # noqa: E402
from counterfactory.sample import decode_batch  # noqa: E402
from tests.conftest import load_records  # noqa: E402


def config(n_scenes: int, photos: bool, method: str, root: Path):
    import yaml

    data = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    data["inputs"] = ([{"kind": "manifest", "path": "pkg:counterfactory/demo/photos.jsonl"}] if photos else []) + [
        {"kind": "procedural", "count": n_scenes, "seed": 1, "size": [256, 256], "questions_per_scene": 1}]
    data["output"]["root"] = str(root)
    next(s for s in data["stages"] if s["name"] == "edit")["params"]["inpaint_method"] = method
    return validate_config(data, source="bench-validity", base_dir=REPO)


def audit_figures(version_dir: Path) -> dict:
    """The shortcut audit's figures for a published version folder (``counterfactory.audit``):
    per variant, probe AUC (edit detectability), the blind answerers' accuracies and the
    abstention share, plus the presupposing-question counts and the audit's warnings."""
    from counterfactory.audit import audit_version

    a = audit_version(version_dir)
    out: dict = {}
    for v in sorted(set(a.get("detectability", {})) | set(a.get("blind", {}))):
        d, b = a.get("detectability", {}).get(v, {}), a.get("blind", {}).get(v, {})
        out[v] = {"probe_auc": d.get("auc"), "blind_original_answer": b.get("original_answer"),
                  "blind_majority_per_kind": b.get("majority_per_kind"), "blind_text_only": b.get("text_only"),
                  "abstain_share": a.get("balance", {}).get(v, {}).get("abstain_share")}
    out["presupposition"] = a.get("presupposition")
    out["warnings"] = a.get("warnings")
    return out


def _spec(s) -> dict | None:
    uri = source_uri(s.meta["source"])
    if not uri.startswith("procedural://"):
        return None
    seed, index, size = scenes.parse_procedural_uri(uri)
    return scenes.scene_spec(seed, index, size)


def _truth(kind: str, text: str, shape: str, objects: list[dict], width: int) -> str | None:
    color_words = set(scenes.COLORS) & set(text.lower().replace("?", "").split())
    match = [o for o in objects if o["category"] == shape
             and (kind == "color" or not color_words or o["attributes"]["color"] in color_words)]
    if kind == "existence":
        return "yes" if match else "no"
    if kind == "count":
        return str(len(match))
    if not match:
        return "unknown"
    if kind == "color":
        return match[0]["attributes"]["color"] if len(match) == 1 else "unknown"
    return side_of_x(float(np.mean([p[0] for p in match[0]["polygon"]])), width) or "unknown"


def _objects_mask(spec: dict, skip: list[dict]) -> np.ndarray:
    w, h = spec["width"], spec["height"]
    m = np.zeros((h, w), bool)
    for o in spec["objects"]:
        if o not in skip:
            m |= scenes.polygon_mask(o["polygon"], w, h)
    return m


def _is_silhouette(ctrl: np.ndarray, mask: np.ndarray) -> bool:
    import cv2

    x, y, w, h = cv2.boundingRect(ctrl.astype(np.uint8))
    ex, ey, ew, eh = cv2.boundingRect(mask.astype(np.uint8))
    return (h, w) == (eh, ew) and np.array_equal(ctrl[y : y + h, x : x + w], mask[ey : ey + eh, ex : ex + ew])


def measure(cfg) -> dict:
    records = load_records(cfg)
    t0 = time.perf_counter()
    edited = [s for b in local_batches(cfg, records, stop_after="edit") for s in decode_batch(b)]
    edit_s = time.perf_counter() - t0
    st = defaultdict(lambda: defaultdict(list))
    for s in edited:
        if not s.ok:
            continue
        spec = _spec(s)
        src = "scene" if spec else "photo"
        img, mask = s.arrays["image"], s.arrays["mask"] > 0
        for v in s.meta["variants"]:
            st[(src, v)]["made"].append(1)
            out = s.arrays[f"variant/{v}"]
            if v in ("remove", "count"):
                region = s.arrays.get(f"mask/{v}", s.arrays["mask"])
                core = np.where(region > 0, s.arrays["mask_core"], 0).astype(np.uint8)
                m = footprint.footprint_metrics(img, out, region, core)
                st[(src, v)]["tex"].append(m["texture_ratio"])
                st[(src, v)]["flat"].append(m["flat_patch"])
                if spec and v == "remove":
                    truth = scenes.render_background(spec).astype(int)
                    st[(src, v)]["err"].append(float(np.abs(out[mask].astype(int) - truth[mask]).mean()))
            if v == "insert" and s.meta["edits"][v].get("polygon"):
                h, w = img.shape[:2]
                obj = scenes.polygon_mask(s.meta["edits"][v]["polygon"], w, h)
                m = footprint.insert_metrics(img, out, obj, s.arrays["mask/insert"], s.arrays["mask_core"])
                st[(src, v)]["tex"].append(m["insert_texture_ratio"])
                st[(src, v)]["flat"].append(m["insert_flat_patch"])
                if m["object_texture_ratio"] is not None:
                    st[(src, v)]["obj_tex"].append(m["object_texture_ratio"])
                st[(src, v)]["gray_col"].append(m["achromatic"] and m["insert_chroma"] > 12)
            if v == "random_mask" and spec:
                ctrl = s.arrays["mask/random_mask"] > 0
                ev = [o for o in spec["objects"] if o["category"] in s.meta["targets"]]
                st[(src, v)]["ctl_obj"].append(bool((ctrl & _objects_mask(spec, ev)).any()))
                st[(src, v)]["silhouette"].append(_is_silhouette(ctrl, mask))
    verified = [s for b in local_batches(cfg, records, stop_after="verify") for s in decode_batch(b)]
    for s in verified:
        spec = _spec(s)
        src = "scene" if spec else "photo"
        for r in s.meta.get("variant_rejects", []):
            if r.get("stage") in ("verify", "qa"):
                st[(src, r["variant"])]["rejected"].append(r["reason"])
        if not s.ok:
            continue
        img = s.arrays["image"]
        for v in s.meta["variants"]:
            st[(src, v)]["kept"].append(1)
            if not spec:
                continue
            out = s.arrays[f"variant/{v}"]
            edit = s.meta["edits"][v]
            if edit.get("region") != "global":
                region = s.arrays.get(f"mask/{v}", s.arrays["mask"]) > 0
                st[(src, v)]["px_ok"].append(bool(np.array_equal(out[~region], img[~region])))
            gone = [o for o in spec["objects"] if o["category"] in s.meta["targets"]] if v == "remove" else []
            rest = [o for o in spec["objects"] if o not in gone]
            if v == "insert":  # the scene now holds the inserted object too
                rest = [*rest, {"category": edit["inserted_category"], "polygon": edit["polygon"],
                                "attributes": {"color": edit["new_value"]}}]
            for q in s.meta["qa"]:
                if v not in q["answers"] or v not in ("orig", "remove", "blackout", "random_mask", "insert"):
                    continue
                shape = singular(q["targets"][0])
                hidden = v == "blackout" and shape in s.meta["targets"]  # the evidence is covered
                want = "unknown" if hidden else _truth(q["kind"], q["question"], shape, rest, spec["width"])
                st[(src, v)]["ans_ok"].append(q["answers"][v] == want)
        for q in s.meta.get("qa", []) if spec else []:
            st[(src, "orig")]["ans_ok"].append(
                q["answers"]["orig"] == _truth(q["kind"], q["question"], singular(q["targets"][0]),
                                               spec["objects"], spec["width"]))
    return {"stats": st, "edit_ms_per_input": 1000 * edit_s / max(len(records), 1), "inputs": len(records)}


def photo_table(root: Path) -> list[tuple[str, str, dict[str, str]]]:
    """Issue 31: every demo photo input (image, question) and, per variant, what became of it:
    "kept", or the stage and reason it was rejected ("no input" when the whole input was)."""
    import yaml

    data = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    data["inputs"] = [{"kind": "manifest", "path": "pkg:counterfactory/demo/photos.jsonl"}]
    data["output"]["root"] = str(root)
    cfg = validate_config(data, source="bench-validity", base_dir=REPO)
    variants = next(s for s in data["stages"] if s["name"] == "edit")["params"]["variants"]
    rows = []
    for s in (s for b in local_batches(cfg, load_records(cfg), stop_after="verify") for s in decode_batch(b)):
        src = s.meta.get("source", {}).get("image") or s.meta.get("uri", "?")
        row = {v: "kept" if s.ok and v in s.meta.get("variants", []) else "-" for v in variants}
        for r in s.meta.get("variant_rejects", []):
            row[r["variant"]] = f"{r['stage']}:{r['reason']}"
        if not s.ok:
            row = {v: (x if x != "kept" else "no input") for v, x in row.items()}
            row["input"] = f"{s.meta.get('reject', {}).get('reason', '?')}"
        ins = s.meta.get("edits", {}).get("insert", {})
        if s.ok and "insert" in s.meta.get("variants", []):
            row["insert"] = f"kept ({ins.get('inserted_category')})"
        rows.append((Path(str(src)).name, s.meta["question"]["question"], row))
    return rows


def _fmt(vals, pct=False, nd=2) -> str:
    if not vals:
        return "-"
    x = float(np.mean(vals))
    return f"{100 * x:.0f}%" if pct else f"{x:.{nd}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenes", type=int, default=100)
    ap.add_argument("--method", default="patch", choices=["patch", "telea", "ns"])
    ap.add_argument("--no-photos", action="store_true")
    ap.add_argument("--version-dir", default=None, help="a published version for the audit hook")
    ap.add_argument("--photo-table", action="store_true", help="issue 31: each demo photo input and variant, "
                    "kept or the stage and reason it was rejected (markdown), then exit")
    a = ap.parse_args()
    import tempfile

    if a.photo_table:
        with tempfile.TemporaryDirectory() as tmp:
            rows = photo_table(Path(tmp))
        variants = [v for v in rows[0][2] if v != "input"]
        print("| photo | question | " + " | ".join(variants) + " |")
        print("|---|---|" + "---|" * len(variants))
        for name, q, row in rows:
            print(f"| {name} | {q} | " + " | ".join(row.get(v, "-") for v in variants) + " |")
        return

    with tempfile.TemporaryDirectory() as tmp:
        res = measure(config(a.scenes, not a.no_photos, a.method, Path(tmp)))
    print(f"validity: {res['inputs']} inputs, fill {a.method}, edit {res['edit_ms_per_input']:.1f} ms/input")
    cols = ["source", "variant", "made", "kept", "pass", "px ok", "ans ok", "tex", "flat", "obj tex", "gray!", "err",
            "ctl/obj", "silh", "top reject"]
    print(" | ".join(cols))
    for (src, v), d in sorted(res["stats"].items()):
        made, kept = len(d["made"]), len(d["kept"])
        top = max(set(d["rejected"]), key=d["rejected"].count) if d["rejected"] else "-"
        print(" | ".join([src, v, str(made), str(kept), f"{100 * kept / made:.0f}%" if made and v != "orig" else "-",
                          _fmt(d["px_ok"], True), _fmt(d["ans_ok"], True), _fmt(d["tex"]), _fmt(d["flat"], True),
                          _fmt(d["obj_tex"]), str(sum(d["gray_col"])) if d["gray_col"] else "-", _fmt(d["err"]), _fmt(d["ctl_obj"], True), str(sum(d["silhouette"])) if d["silhouette"] else "-",
                          top]))
    if a.version_dir:
        print("audit:", audit_figures(Path(a.version_dir)) )


if __name__ == "__main__":
    main()
