"""Procedural scenes: determinism, exact masks, spacing, and answers consistent with objects."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from counterfactory.scenes import (
    COLORS,
    SHAPES,
    parse_procedural_uri,
    polygon_mask,
    render_scene,
    scene_questions,
    scene_record,
    scene_spec,
)

CASES = [(seed, index) for seed in (0, 7, 12345) for index in range(12)]
SIZES = [(256, 256), (320, 200), (96, 128)]


def _masks(spec: dict) -> list[np.ndarray]:
    return [polygon_mask(o["polygon"], spec["width"], spec["height"]) for o in spec["objects"]]


def test_constants() -> None:
    assert len(SHAPES) >= 4 and len(set(SHAPES)) == len(SHAPES)
    assert len(COLORS) >= 5
    vals = np.array(list(COLORS.values()), float)
    dists = np.linalg.norm(vals[:, None] - vals[None], axis=-1)
    assert dists[~np.eye(len(vals), dtype=bool)].min() > 80  # well separated


@pytest.mark.parametrize("size", SIZES)
def test_deterministic(size: tuple[int, int]) -> None:
    for seed, index in CASES[:6]:
        a, b = scene_spec(seed, index, size), scene_spec(seed, index, size)
        assert a == b
        ia, ib = render_scene(a), render_scene(b)
        assert ia.dtype == np.uint8 and ia.shape == (size[1], size[0], 3)
        assert ia.tobytes() == ib.tobytes()


def test_deterministic_across_processes() -> None:
    code = (
        "import hashlib; from counterfactory.scenes import render_scene, scene_spec;"
        "print(hashlib.sha256(render_scene(scene_spec(3, 4)).tobytes()).hexdigest())"
    )
    # The child imports the same checkout, installed or not.
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert (
        out.stdout.strip() == hashlib.sha256(render_scene(scene_spec(3, 4)).tobytes()).hexdigest()
    )


@pytest.mark.parametrize("size", SIZES)
def test_painted_pixels_equal_masks(size: tuple[int, int]) -> None:
    for seed, index in CASES:
        spec = scene_spec(seed, index, size)
        img = render_scene(spec)
        bg = render_scene({**spec, "objects": []})
        union = np.zeros(img.shape[:2], bool)
        for obj, mask in zip(spec["objects"], _masks(spec), strict=True):
            assert mask.any()
            assert (img[mask] == COLORS[obj["attributes"]["color"]]).all()
            union |= mask
        assert (img[~union] == bg[~union]).all()
        # The background never takes an object color, so masks are recoverable from pixels.
        for color in COLORS.values():
            assert not (bg == color).all(axis=-1).any()


@pytest.mark.parametrize("size", SIZES)
def test_objects_spaced_and_inside(size: tuple[int, int]) -> None:
    w, h = size
    for seed in range(4):
        for index in range(40):
            spec = scene_spec(seed, index, size)
            assert 1 <= len(spec["objects"]) <= 5
            masks = _masks(spec)
            for i, a in enumerate(masks):
                # >= 4 untouched border pixels on every side.
                assert not (a[:4].any() or a[-4:].any() or a[:, :4].any() or a[:, -4:].any())
                # Distance from every pixel to the nearest pixel of `a`; >= 7 means >= 6 px gap.
                dist = cv2.distanceTransform(
                    (~a).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE
                )
                for b in masks[i + 1 :]:
                    assert dist[b].min() >= 7
                ys, xs = np.nonzero(a)
                extent = max(np.ptp(xs), np.ptp(ys)) + 1
                assert 0.05 * min(w, h) <= extent <= 0.27 * min(w, h)


def test_spec_json_and_fields() -> None:
    for seed, index in CASES:
        spec = scene_spec(seed, index)
        assert json.loads(json.dumps(spec)) == spec
        for obj in spec["objects"]:
            assert obj["category"] in SHAPES
            assert obj["attributes"]["color"] in COLORS
            assert all(round(v, 2) == v for pt in obj["polygon"] for v in pt)
        colors = [o["attributes"]["color"] for o in spec["objects"]]
        assert len(set(colors)) == len(colors)


def test_variety() -> None:
    specs = [scene_spec(0, i) for i in range(200)]
    assert len({json.dumps(s["objects"]) for s in specs}) == 200
    assert render_scene(specs[0]).tobytes() != render_scene(specs[1]).tobytes()
    assert scene_spec(1, 0)["objects"] != scene_spec(0, 0)["objects"]
    counts = [c for s in specs for c in Counter(o["category"] for o in s["objects"]).values()]
    assert {1, 2, 3} <= set(counts) and max(counts) <= 3
    assert {len(s["objects"]) for s in specs} == {1, 2, 3, 4, 5}
    assert {o["category"] for s in specs for o in s["objects"]} == set(SHAPES)


def test_questions_consistent() -> None:
    kinds: Counter[str] = Counter()
    for seed, index in CASES:
        spec = scene_spec(seed, index)
        objs = spec["objects"]
        by_shape = Counter(o["category"] for o in objs)
        qs = scene_questions(spec, 6, seed=index)
        assert qs == scene_questions(spec, 6, seed=index)
        assert len({q["question"] for q in qs}) == len(qs) <= 6
        assert qs, "every scene has at least one object, so at least one question"
        if len(qs) >= 3:
            assert len({q["kind"] for q in qs}) >= 2  # a mix of kinds
        for q in qs:
            kinds[q["kind"]] += 1
            (shape,) = q["targets"]
            group = [o for o in objs if o["category"] == shape]
            assert group
            if q["kind"] == "existence":
                assert q["answer"] == "yes"
                words = q["question"].split()
                if len(words) == 6:  # "Is there a {color} {shape} in the image?"
                    assert any(o["attributes"]["color"] == words[3] for o in group)
            elif q["kind"] == "count":
                assert q["question"] == f"How many {shape}s are there?"
                assert q["answer"] == str(by_shape[shape])
            elif q["kind"] == "color":
                assert len(group) == 1 and q["answer"] == group[0]["attributes"]["color"]
            else:
                assert q["kind"] == "position" and len(group) == 1
                cx = np.mean(np.asarray(group[0]["polygon"])[:, 0])
                assert q["answer"] == ("left" if cx < 0.4 * spec["width"] else "right")
                assert cx < 0.4 * spec["width"] or cx > 0.6 * spec["width"]
    assert set(kinds) == {"existence", "count", "color", "position"}
    assert scene_questions(scene_spec(0, 0), 0, seed=0) == []


def test_record_and_uri() -> None:
    rec = scene_record(5, 9, size=(200, 150), n_questions=3)
    assert rec["image"] == "procedural://5/9?size=200x150"
    assert (rec["width"], rec["height"]) == (200, 150)
    assert rec["objects"] == scene_spec(5, 9, (200, 150))["objects"]
    assert 1 <= len(rec["questions"]) <= 3
    assert json.loads(json.dumps(rec)) == rec
    assert rec == scene_record(5, 9, size=(200, 150), n_questions=3)
    assert parse_procedural_uri(rec["image"]) == (5, 9, (200, 150))
    assert parse_procedural_uri("procedural://1/2") == (1, 2, (256, 256))
    with pytest.raises(ValueError):
        parse_procedural_uri("file:///tmp/x.png")


def test_specs_and_pixels_pinned() -> None:
    """Issue 27 (s28verify): the scene spec's draws (``_pick`` for ``Generator.choice``) were made
    cheaper with the same bytes; this digest of 80 specs, their pixels and records (both
    patterns, three sizes) is what 386b596 made, so any change to a scene's bytes fails here,
    not only in a content id."""
    h = hashlib.sha256()
    cases = ([(1, i, (256, 256)) for i in range(40)] + [(5, i, (97, 61)) for i in range(20)]
             + [(9, i, (320, 200)) for i in range(20)])
    for seed, i, size in cases:
        s = scene_spec(seed, i, size)
        h.update(json.dumps(s, sort_keys=True).encode())
        h.update(render_scene(s).tobytes())
        h.update(json.dumps(scene_record(seed, i, size, 3), sort_keys=True).encode())
    assert h.hexdigest() == "1b9c2187028ecbfc8730744762de99c61f200ac1e0bafb58a2dae5a0d1cafd51"
