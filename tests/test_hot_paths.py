"""Issue 27, hot paths: each per-sample speed-up outside the fill is pinned here to the
whole-image code it replaced (the same masks, the same numbers, bit for bit), so it cannot move
a verify decision, an answer or a byte of the output."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from counterfactory import footprint as fp
from counterfactory.rules import side_of, side_of_x
from counterfactory.stages import verify as verify_mod
from counterfactory.stages.invented import copied_object
from counterfactory.stages.shared import flat_fill
from tests.test_footprint_crop import _blob, _image

WHERE = ["inside", "border", "border", "inside"]


def _ring_whole(region: np.ndarray, px: int) -> np.ndarray:
    """footprint.ring before issue 27: the dilation of the whole image."""
    out = cv2.dilate(region, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * px + 1, 2 * px + 1)))
    out[region > 0] = 0
    return out


@pytest.mark.parametrize("seed", range(12))
def test_ring_on_the_crop_is_the_whole_image_ring(seed):
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(40, 200)), int(rng.integers(40, 200))
    region = _blob(rng, h, w, WHERE[seed % 4])
    if seed % 3 == 0:  # two parts, one of them 0/1 valued (the video masks' kind)
        region = cv2.bitwise_or(region, _blob(rng, h, w, "border")) // 255
    for px in (1, 6, 8, 30):
        assert np.array_equal(fp.ring(region, px), _ring_whole(region, px))
    assert not fp.ring(np.zeros((9, 7), np.uint8), 3).any()


def _metrics_whole(img, out, region):
    """PixelVerify._metrics before issue 27."""
    absdiff = cv2.absdiff(out, img)
    changed = cv2.transform(absdiff, np.ones((1, 3), np.float32))
    changed[region > 0] = 0
    n_out = img.shape[0] * img.shape[1] - cv2.countNonZero(region)
    inside = cv2.mean(absdiff, mask=region)[:3]
    return {"outside_changed_frac": round(cv2.countNonZero(changed) / n_out, 6) if n_out else 0.0,
            "inside_mad": round(float(np.mean(inside)), 3)}


@pytest.mark.parametrize("seed", range(8))
def test_verify_pixel_figures_on_the_box_are_the_whole_image_ones(seed):
    rng = np.random.default_rng(seed)
    h, w = 96, 128
    img = _image(rng, h, w)
    region = _blob(rng, h, w, WHERE[seed % 4])
    out = img.copy()
    out[region > 0] = rng.integers(0, 255, 3, dtype=np.uint8)
    if seed % 2:  # a few pixels outside changed too
        out[rng.integers(0, h, 9), rng.integers(0, w, 9)] += 1
    stage = verify_mod.PixelVerify()
    assert stage._metrics(img, out, region) == _metrics_whole(img, out, region)
    empty = np.zeros((h, w), np.uint8)
    assert stage._metrics(img, out, empty) == _metrics_whole(img, out, empty)
    assert np.array_equal(verify_mod._mean_color(out, region), np.array(cv2.mean(out, mask=region)[:3]))
    assert np.array_equal(verify_mod._mean_color(out, empty), np.array(cv2.mean(out, mask=empty)[:3]))


@pytest.mark.parametrize("seed", range(10))
def test_side_of_from_moments_is_the_mean_of_the_columns(seed):
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(20, 300)), int(rng.integers(20, 300))
    m = _blob(rng, h, w, WHERE[seed % 4])
    for mask in (m, m > 0, (m > 0).astype(np.float32), np.asfortranarray(m)):
        xs = np.nonzero(mask)[1]
        want = side_of_x(float(xs.mean()), w, 0.4, 0.6) if len(xs) else None
        assert side_of(mask) == want
        for lo in (0.3, 0.45, 0.49):  # thresholds near the centroid: the float must be the same
            assert side_of(mask, lo, 1 - lo) == (side_of_x(float(xs.mean()), w, lo, 1 - lo) if len(xs) else None)
    assert side_of(np.zeros((5, 5), bool)) is None


@pytest.mark.parametrize("seed", range(6))
def test_flat_fill_on_the_box(seed):
    rng = np.random.default_rng(seed)
    img = _image(rng, 64, 80)
    region = _blob(rng, 64, 80, WHERE[seed % 4])
    want = img.copy()
    want[region > 0] = (1, 2, 3)
    assert np.array_equal(flat_fill(img, region, (1, 2, 3)), want)
    clip = np.stack([img, img[::-1]])
    want = clip.copy()
    want[np.stack([region, region]) > 0] = (4, 5, 6)
    assert np.array_equal(flat_fill(clip, np.stack([region, region]), (4, 5, 6)), want)


def test_copied_object_finds_a_copy_and_no_copy_on_crops():
    rng = np.random.default_rng(3)
    img = _image(rng, 120, 160)
    obj = np.zeros((120, 160), bool)
    obj[20:40, 20:44] = True
    region = np.zeros((120, 160), np.uint8)
    region[60:100, 90:140] = 255
    out = img.copy()
    out[67:93, 97:127] = img[17:43, 17:47]  # the object (and its outline band) copied into the fill
    hit = copied_object(img, out, region, [("box", obj)])
    assert hit["invented_category"] == "box" and hit["invented_ncc"] > 0.99
    clean = img.copy()
    clean[region > 0] = 128
    assert copied_object(img, clean, region, [("box", obj)])["invented_ncc"] < 0.5
    assert copied_object(img, out, np.zeros_like(region), [("box", obj)]) == {"invented_ncc": 0.0,
                                                                              "invented_category": None}


def _sample(rng: np.random.Generator):
    from counterfactory.sample import Sample

    img = _image(rng, 96, 128)
    core = (_blob(rng, 96, 128, "inside") > 0).astype(np.uint8)
    return Sample(idx=0, key="k", status="ok", meta={"run_seed": 0}, arrays={"image": img, "mask_core": core})


def test_sample_memo_computes_once_per_array_and_is_never_serialized():
    from counterfactory.sample import decode_batch, encode_batch

    s = _sample(np.random.default_rng(0))
    calls = []

    def fig():
        calls.append(1)
        return float(s.arrays["image"].mean())

    first = s.memo("mean", fig, "image")
    assert s.memo("mean", fig, "image") == first and len(calls) == 1
    s.arrays["image"] = s.arrays["image"] + 1  # a stage replaces an array: computed again
    assert s.memo("mean", fig, "image") == first + 1 and len(calls) == 2
    s.arrays.pop("image")
    s.arrays["image"] = np.zeros((4, 4, 3), np.uint8)
    assert s.memo("mean", fig, "image") == 0.0 and len(calls) == 3
    (back,) = decode_batch(encode_batch([s]))
    assert back._memo == {} and back.key == s.key  # the memo is not shipped
    assert np.array_equal(back.arrays["image"], s.arrays["image"])


@pytest.mark.parametrize("seed", range(4))
def test_original_look_is_what_edit_and_verify_computed_each(seed):
    from counterfactory.stages.shared import original_look

    rng = np.random.default_rng(seed)
    s = _sample(rng)
    img, core = s.arrays["image"], s.arrays["mask_core"]
    look = original_look(s)
    assert look == (fp.object_texture(img, core), fp.achromatic(img))
    assert original_look(s) is look  # once per sample
    assert original_look(s, 6) == (fp.object_texture(img, core, 6), fp.achromatic(img))
    out = img.copy()
    region = _blob(rng, 96, 128, "border")
    obj = cv2.erode(region, np.ones((7, 7), np.uint8)) > 0
    out[obj] = (200, 30, 30)
    assert fp.insert_metrics(img, out, obj, region, core, 8, look) == fp.insert_metrics(img, out, obj, region, core, 8)


def test_scenes_drawn_in_place_are_their_polygon_masks():
    from counterfactory import scenes

    for seed, index, size in [(0, i, (256, 256)) for i in range(40)] + [(5, i, (97, 301)) for i in range(40)]:
        spec = scenes.scene_spec(seed, index, size)
        want = scenes.render_background(spec)
        for obj in spec["objects"]:  # render_scene before issue 27
            want[scenes.polygon_mask(obj["polygon"], *size)] = np.asarray(scenes.COLORS[obj["attributes"]["color"]],
                                                                          np.uint8)
        assert np.array_equal(scenes.render_scene(spec), want)


def test_annotated_keepout_draws_each_polygon_once():
    from counterfactory import scenes
    from counterfactory.sample import Sample
    from counterfactory.stages.shared import annotated_keepout, annotated_mask

    spec = scenes.scene_spec(2, 7, (160, 128))
    ann = [{"category": o["category"], "polygons": [o["polygon"]],
            "box": [int(min(p[0] for p in o["polygon"])), int(min(p[1] for p in o["polygon"])),
                    int(max(p[0] for p in o["polygon"])) + 3, int(max(p[1] for p in o["polygon"])) + 3]}
           for o in spec["objects"]]
    ann.append({"category": "loose", "polygons": [], "box": [5, 5, 20, 30]})
    core = np.zeros((128, 160), np.uint8)
    core[60:70, 60:80] = 1
    s = Sample(idx=0, key="k", status="ok", meta={"annotated": ann, "instances": []},
               arrays={"mask": core * 255, "mask_core": core})
    for skip in ((), (0,), (0, len(ann) - 1)):
        want = annotated_mask(s) if not skip else np.zeros((128, 160), np.uint8)  # the code before issue 27
        for i, o in enumerate(ann):
            if i in skip:
                continue
            for poly in o.get("polygons") or []:
                want[scenes.polygon_mask(poly, 160, 128)] = 255
            x0, y0, x1, y1 = o["box"]
            want[max(0, y0):max(0, y1), max(0, x0):max(0, x1)] = 255
        assert np.array_equal(annotated_keepout(s, skip=skip), want)
