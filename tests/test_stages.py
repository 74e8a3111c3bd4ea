"""Each stage on procedural scenes, checked against the scene's ground truth."""

from __future__ import annotations

import numpy as np
import pytest

from counterfactory import scenes
from counterfactory.pipeline.runner import local_batches
from counterfactory.rules import classify_question, match_categories, side_of_x, singular
from counterfactory.sample import Sample, decode_batch, encode_batch
from counterfactory.stages.verify import PixelVerify
from tests.conftest import load_records, make_config, scenes_input

N_SCENES = 30


@pytest.fixture(scope="module")
def processed(tmp_path_factory) -> tuple[list[dict], list[Sample]]:
    tmp = tmp_path_factory.mktemp("stages")
    cfg = make_config(tmp, [scenes_input(N_SCENES, seed=3, questions=3)])
    cfg.stage("edit").set_params(variants=["remove", "blackout", "random_mask"])  # the rest: test_taxonomy
    records = load_records(cfg)
    samples: list[Sample] = []
    for b in local_batches(cfg, records, stop_after="verify"):
        samples.extend(decode_batch(b))
    return records, samples


def _spec(rec) -> dict:
    seed, index, size = scenes.parse_procedural_uri(rec["uri"])
    return scenes.scene_spec(seed, index, size)


def _evidence(rec) -> list[dict]:
    """Ground truth: the objects the question is about (shape, and color when it names one)."""
    q = rec["question"]
    objs = rec["objects"]
    shape = q["targets"][0]
    color_words = set(scenes.COLORS) & set(q["question"].lower().replace("?", "").split())
    return [o for o in objs if o["category"] == shape
            and (q["kind"] == "color" or not color_words or o["attributes"]["color"] in color_words)]


def test_every_scene_sample_is_accepted(processed):
    records, samples = processed
    assert len(samples) == len(records) >= 2 * N_SCENES
    bad = [(s.meta.get("reject")) for s in samples if not s.ok]
    assert not bad


def test_localize_finds_exactly_the_evidence(processed):
    for rec, s in zip(*processed, strict=True):
        want = sorted(tuple(map(tuple, o["polygon"])) for o in _evidence(rec))
        got = sorted(tuple(map(tuple, i["polygons"][0])) for i in s.meta["instances"])
        assert got == want, rec["question"]


def test_segment_masks_are_exact_and_dilated(processed):
    for rec, s in zip(*processed, strict=True):
        w, h = rec["objects"] and _spec(rec)["width"], _spec(rec)["height"]
        truth = np.zeros((h, w), bool)
        for o in _evidence(rec):
            truth |= scenes.polygon_mask(o["polygon"], w, h)
        core = s.arrays["mask_core"] > 0
        mask = s.arrays["mask"] > 0
        assert np.array_equal(core, truth)
        assert mask[truth].all() and mask.sum() > truth.sum()  # dilated beyond the object
        assert s.meta["mask"]["dilate_px"] >= 4


def test_edits_leave_outside_pixels_identical_and_remove_the_object(processed):
    for rec, s in zip(*processed, strict=True):
        img = s.arrays["image"]
        mask = s.arrays["mask"] > 0
        core = s.arrays["mask_core"] > 0
        for v in s.meta["variants"]:
            out = s.arrays[f"variant/{v}"]
            region = s.arrays["mask/random_mask"] > 0 if v == "random_mask" else mask
            assert np.array_equal(out[~region], img[~region]), v
            assert not np.array_equal(out[region], img[region]), v
        removed = s.arrays["variant/remove"]
        for o in _evidence(rec):
            color = np.array(scenes.COLORS[o["attributes"]["color"]])
            close = np.abs(removed[core].astype(int) - color).max(axis=1) < 40
            assert close.mean() < 0.02, "the removed object's color is still there"
        if "random_mask" in s.meta["variants"]:
            assert not ((s.arrays["mask/random_mask"] > 0) & mask).any()
            # an equal-area rectangle or ellipse (integer sides: within a few %)
            assert abs((s.arrays["mask/random_mask"] > 0).sum() / mask.sum() - 1) < 0.06


def _truth(kind: str, text: str, shape: str, objects: list[dict], width: int) -> str | None:
    color_words = set(scenes.COLORS) & set(text.lower().replace("?", "").split())
    match = [o for o in objects if o["category"] == shape
             and (kind == "color" or not color_words or o["attributes"]["color"] in color_words)]
    if kind == "existence":
        return "yes" if match else "no"
    if kind == "count":
        return str(len(match))
    if not match:
        return None  # the object is gone: only an abstention is right
    if kind == "color":
        return match[0]["attributes"]["color"] if len(match) == 1 else None
    return side_of_x(float(np.mean([p[0] for p in match[0]["polygon"]])), width)


def test_answers_follow_the_rules_against_scene_truth(processed):
    """Every answer, for every variant, agrees with the truth of the (edited) scene; where
    the evidence is hidden (blackout) the answer is the abstention."""
    kinds = set()
    for rec, s in zip(*processed, strict=True):
        spec = _spec(rec)
        gone = _evidence(rec)
        remaining = [o for o in spec["objects"] if o not in gone]
        for item in s.meta["qa"]:
            kinds.add(item["kind"])
            shape = singular(item["targets"][0])
            a = item["answers"]
            assert a["orig"] == _truth(item["kind"], item["question"], shape, spec["objects"], spec["width"])
            after = _truth(item["kind"], item["question"], shape, remaining, spec["width"])
            assert a["remove"] == (after if after is not None else "unknown"), item
            assert a["blackout"] == "unknown"
            if "random_mask" in a:
                assert a["random_mask"] == a["orig"]
            assert a["remove"] != a["orig"]  # the same question, a different answer
    assert kinds == {"existence", "count", "color", "position"}


def test_question_classification_and_matching():
    assert classify_question("How many cats are there?") == "count"
    assert classify_question("What color is the cup?") == "color"
    assert classify_question("Is the rocket on the left or the right?") == "position"
    assert classify_question("Is there a dog in the image?") == "existence"
    assert classify_question("Why is the sky blue?") == "other"
    assert match_categories("How many coins are on the table?", {"coin", "table", "cat"}) == ["coin", "table"]
    assert match_categories("Is there a woman?", {"person"}) == ["person"]
    assert match_categories("Does the knowledge hold?", {"no", "know"}) == []


def test_verify_rejects_tampered_and_unchanged_variants(processed):
    _, samples = processed
    s = Sample(samples[0].idx, samples[0].key, "ok", dict(samples[0].meta), dict(samples[0].arrays))
    s.meta["variants"] = ["remove", "blackout", "random_mask"][: len(s.meta["variants"])]
    img = s.arrays["image"]
    s.arrays["variant/blackout"] = s.arrays["variant/blackout"].copy()
    s.arrays["variant/blackout"][0, 0] = 255 - s.arrays["variant/blackout"][0, 0]  # outside the mask
    s.arrays["variant/remove"] = img.copy()  # "removal" that changed nothing
    out = decode_batch(PixelVerify()(encode_batch([s])))[0]
    reasons = {r["variant"]: r["reason"] for r in out.meta.get("variant_rejects", [])}
    assert reasons == {"blackout": "pixels_outside_changed", "remove": "region_unchanged"}
    assert not out.ok and out.meta["reject"]["reason"] == "no_valid_counterfactual"
