"""The full edit taxonomy on procedural scenes: every answer on every variant agrees with the
truth of the edited scene, computed from the scene description, not from the rule table."""

from __future__ import annotations

from collections import Counter

import cv2
import numpy as np
import pytest

from counterfactory import scenes
from counterfactory.pipeline.runner import local_batches
from counterfactory.rules import ANSWER_RULES, QUESTION_KINDS, answer_for, color_name, singular
from counterfactory.sample import decode_batch
from tests.conftest import load_records, make_config, scenes_input
from tests.test_stages import _evidence, _spec, _truth

ALL = ["remove", "blackout", "random_mask", "attribute", "flip", "count", "insert", "swap"]


@pytest.fixture(scope="module")
def processed(tmp_path_factory):
    cfg = make_config(tmp_path_factory.mktemp("tax"), [scenes_input(40, seed=5, questions=3)])
    cfg.stage("edit").set_params(variants=ALL)
    records = load_records(cfg)
    samples = [s for b in local_batches(cfg, records, stop_after="verify") for s in decode_batch(b)]
    return records, samples


def _edited_objects(v: str, rec: dict, s, spec: dict) -> list[dict] | None:
    """The scene's objects after edit ``v``; None where the evidence is hidden (blackout)."""
    objs, ev = spec["objects"], _evidence(rec)
    e = s.meta["edits"][v]
    if v == "remove":
        return [o for o in objs if o not in ev]
    if v == "count":
        gone = [ev[i] for i in e["removed_indices"]]
        return [o for o in objs if o not in gone]
    if v == "attribute":
        return [dict(o, attributes={"color": e["new_value"]}) if o in ev else o for o in objs]
    if v == "flip":
        w = spec["width"]
        return [dict(o, polygon=[[w - 1 - x, y] for x, y in o["polygon"]]) for o in objs]
    if v == "insert":
        new = {"category": e["inserted_category"], "attributes": {"color": e["new_value"]}, "polygon": e["polygon"]}
        return [*objs, new]
    if v == "swap":
        dx, dy = e["translation"]
        return [dict(o, polygon=[[x + dx, y + dy] for x, y in o["polygon"]]) if o in ev else o for o in objs]
    if v == "random_mask":
        return objs
    return None


def test_every_answer_matches_the_edited_scene(processed):
    checked = Counter()
    for rec, s in zip(*processed, strict=True):
        assert s.ok, s.meta.get("reject")
        spec = _spec(rec)
        for v in s.meta["variants"]:
            after = _edited_objects(v, rec, s, spec)
            for item in s.meta["qa"]:
                shape = singular(item["targets"][0])
                got = item["answers"][v]
                if after is None:  # blackout: hidden evidence is an abstention, the rest unchanged
                    hidden = set(item["targets"]) & set(s.meta["targets"])
                    assert got == ("unknown" if hidden else item["answers"]["orig"])
                    continue
                want = _truth(item["kind"], item["question"], shape, after, spec["width"])
                rule = ANSWER_RULES[v][item["kind"]]
                if v == "count" and item["kind"] == "position":
                    want = None  # which instance is meant is ambiguous once some are gone
                if v in ("flip", "swap") and want is None and item["kind"] == "position":
                    continue  # the mirrored centroid landed within a pixel of the 0.4/0.6 bands
                assert got == (want if want is not None else "unknown"), (v, rule, item)
                checked[v] += 1
    assert set(checked) == set(ALL) - {"blackout"}, checked


def test_edits_change_what_they_claim(processed):
    seen = Counter()
    for s in processed[1]:
        img = s.arrays["image"]
        for v in s.meta["variants"]:
            out, e = s.arrays[f"variant/{v}"], s.meta["edits"][v]
            seen[v] += 1
            if v == "flip":
                assert np.array_equal(out, img[:, ::-1])
                continue
            region = s.arrays.get(f"mask/{v}", s.arrays["mask"]) > 0
            assert np.array_equal(out[~region], img[~region]), v
            if v == "attribute":
                assert color_name(cv2.mean(out, mask=s.arrays["mask_core"])[:3]) == e["new_value"] != e["color_before"]
            if v == "insert":
                obj = scenes.polygon_mask(e["polygon"], img.shape[1], img.shape[0])
                assert not (obj & (s.arrays["mask"] > 0)).any()
                if e["new_value"]:
                    assert color_name(cv2.mean(out, mask=obj.astype(np.uint8))[:3]) == e["new_value"]
            if v == "count":
                assert 1 <= e["removed_instances"] < e["removed_instances"] + e["remaining_instances"]
    assert min(seen[v] for v in ALL) >= 5, seen


def test_not_applicable_edits_are_recorded(processed):
    reasons = Counter()
    for _, s in zip(*processed, strict=True):
        for r in s.meta.get("variant_rejects", []):
            reasons[(r["variant"], r["reason"])] += 1
    assert reasons[("count", "not_applicable")] > 0  # single-instance evidence
    assert all(reason in {"not_applicable", "no_room_for_control", "no_room_for_insert", "achromatic_evidence",
                          "answers_unchanged"}
               for (_, reason) in reasons), reasons


def test_rule_table_is_complete_and_mechanical():
    for edit, rules in ANSWER_RULES.items():
        assert set(rules) == set(QUESTION_KINDS), edit
    assert answer_for("count", "existence", "yes", remaining=0) == "no"
    assert answer_for("count", "existence", "yes", remaining=2) == "yes"
    assert answer_for("insert", "count", "2", inserted=1) == "3"
    assert answer_for("flip", "position", "left") == "right"
    assert answer_for("reverse", "order", "before") == "after"
    assert answer_for("attribute", "color", "red", new_value="blue") == "blue"
    with pytest.raises(ValueError):
        answer_for("attribute", "color", "red")
    with pytest.raises(ValueError):
        answer_for("remove", "count", "1", removed=2)


def test_left_and_right_are_mirror_symmetric():
    """A mask and its mirror image get opposite sides or both none: the centroid is taken at
    pixel centres (at 0.3976 of the width an object was 'left' and its mirror 'right')."""
    from counterfactory.rules import side_of

    rng = np.random.default_rng(0)
    for _ in range(300):
        w = int(rng.integers(20, 300))
        m = np.zeros((8, w), np.uint8)
        x0 = int(rng.integers(0, w - 2))
        m[:, x0:int(rng.integers(x0 + 1, w))] = 1
        a, b = side_of(m), side_of(m[:, ::-1])
        assert (a, b) in (("left", "right"), ("right", "left"), (None, None)), (w, x0, a, b)


def test_an_object_annotated_white_or_silver_gets_no_attribute_edit(tmp_path):
    """Warm light lifts a white rocket's measured saturation over the floor; the annotated color
    decides: no hue to change, so no recolored variant whose color answer the pixels deny."""
    import json

    from tests.conftest import save, square_line, square_scene

    save(square_scene(color=(235, 200, 160)), tmp_path / "warm.png")  # saturation ~0.32, 'orange'
    lines = [square_line("warm.png", objects=[{"category": "box", "box": [50, 30, 100, 80],
                                               "attributes": {"color": c}}],
                         question="What color is the box?", answer=c) for c in ("white", "orange")]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    cfg = make_config(tmp_path, [{"kind": "manifest", "path": str(tmp_path / "m.jsonl")}])
    cfg.stage("edit").set_params(variants=["remove", "attribute"])
    white, orange = [s for b in local_batches(cfg, load_records(cfg), stop_after="edit") for s in decode_batch(b)]
    assert white.ok and "attribute" not in white.meta["variants"]
    assert [r["reason"] for r in white.meta["variant_rejects"] if r["variant"] == "attribute"] == ["achromatic_evidence"]
    assert "attribute" in orange.meta["variants"]
    assert orange.meta["edits"]["attribute"]["new_value"] not in ("orange", orange.meta["edits"]["attribute"]["color_before"])


# -- no presupposition; absence only where the annotations are exhaustive (issue #16) ---------------
def test_no_question_presupposes_an_object_the_image_does_not_show(processed):
    """Color, position and other attribute questions are asked only about objects the original
    shows, never answered "unknown" there, and on a variant without their object only the
    abstention is right. The object insert brings in gets existence and count questions."""
    from counterfactory.stages.qa import PRESUPPOSING_KINDS, subject_present

    inserted = 0
    for _, s in zip(*processed, strict=True):
        m = s.meta
        for item in m["qa"]:
            if item["kind"] not in PRESUPPOSING_KINDS:
                continue
            assert subject_present(item, m, "orig"), item
            assert item["answers"]["orig"] != "unknown", item
            for v in m["variants"]:
                if not subject_present(item, m, v):
                    assert item["answers"][v] == "unknown", (v, item)
        for v in m["variants"]:
            cat = m["edits"][v].get("inserted_category")
            if cat:
                about = {q["kind"]: q["answers"] for q in m["qa"] if q["targets"] == [cat]}
                # procedural scenes annotate every object: "no"/"0" is ground truth there
                assert set(about) == {"existence", "count"}, about
                assert (about["existence"]["orig"], about["count"]["orig"]) == ("no", "0")
                assert (about["existence"][v], about["count"][v]) == ("yes", "1")
                inserted += 1
    assert inserted >= 5


def _manifest_samples(tmp_path, lines, variants):
    import json

    from tests.conftest import save, square_scene

    save(square_scene(), tmp_path / "sq.png")
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    cfg = make_config(tmp_path, [{"kind": "manifest", "path": str(tmp_path / "m.jsonl")}])
    # drawn shapes (the categories the exhaustive lists below name), not real cut-outs: the one
    # photo here has no object of another category to cut out (issue 31)
    cfg.stage("edit").set_params(variants=variants, cutouts=None)
    records = load_records(cfg)
    return records, [s for b in local_batches(cfg, records, stop_after="qa") for s in decode_batch(b)]


def test_absence_is_asserted_only_for_exhaustively_annotated_categories(tmp_path):
    """A photo annotated "box" says nothing about stars: the inserted star's existence abstains
    on the original and no count is asked, unless the line declares its annotations exhaustive;
    a line declaring nothing exhaustive gets no "no" after removal either; a malformed
    declaration is a rejected line."""
    from tests.conftest import square_line

    lines = [square_line("sq.png"),  # default: exhaustive for what it annotates (box)
             square_line("sq.png", question="Is there a red box in the image?", exhaustive=True),
             square_line("sq.png", question="Is there a box here?", exhaustive=False),
             square_line("sq.png", question="Is there a box at all?", exhaustive=["box", "star", "circle",
                                                                                   "square", "triangle",
                                                                                   "hexagon"]),
             square_line("sq.png", question="Any box?", exhaustive=3)]
    records, samples = _manifest_samples(tmp_path, lines, ["remove", "insert"])
    assert [r.get("exhaustive") for r in records[:4]] == [["box"], "*", [], ["box", "circle", "hexagon", "square",
                                                                            "star", "triangle"]]
    default, everything, nothing, listed, bad = samples
    assert not bad.ok and bad.meta["reject"]["reason"] == "bad_manifest_line"
    assert "exhaustive" in bad.meta["reject"]["detail"]

    def about(s, cat):
        return {q["kind"]: q["answers"] for q in s.meta["qa"] if q["targets"] == [cat]}

    for s, known in ((default, False), (everything, True), (nothing, False), (listed, True)):
        assert s.ok, s.meta.get("reject")
        cat = s.meta["edits"]["insert"]["inserted_category"]
        got = about(s, cat)
        if known:
            assert set(got) == {"existence", "count"} and got["existence"]["orig"] == "no"
            assert got["count"] == {"orig": "0", "remove": "0", "insert": "1"}
        else:  # no presupposed "no": the abstention, and no count question at all
            assert set(got) == {"existence"} and got["existence"]["orig"] == "unknown"
        assert got["existence"]["insert"] == "yes"
        assert s.meta["source"]["exhaustive"] == s.meta["exhaustive"]
    ev = about(nothing, "box")
    assert ev["existence"]["remove"] == "unknown" and "count" not in ev  # unannotated boxes may remain
    assert about(default, "box")["existence"]["remove"] == "no"


def test_coco_inputs_are_exhaustive_for_their_category_list(tmp_path):
    import json

    from tests.conftest import save, square_scene

    save(square_scene(), tmp_path / "a.png")
    coco = {"images": [{"id": 1, "file_name": "a.png", "width": 160, "height": 120}],
            "categories": [{"id": 1, "name": "box"}, {"id": 2, "name": "dog"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [50, 30, 50, 50]}]}
    (tmp_path / "c.json").write_text(json.dumps(coco))
    cfg = make_config(tmp_path, [{"kind": "coco", "path": str(tmp_path / "c.json")}])
    assert {tuple(r["exhaustive"]) for r in load_records(cfg)} == {("box", "dog")}
    cfg = make_config(tmp_path, [{"kind": "coco", "path": str(tmp_path / "c.json"), "exhaustive": False}])
    assert {tuple(r["exhaustive"]) for r in load_records(cfg)} == {()}
