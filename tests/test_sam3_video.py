"""segment: sam3-video with a tiny real Sam3VideoModel (SAM 3 detector + SAM 3 tracker) built
from a Sam3VideoConfig with a fixed seed, saved with save_pretrained and loaded from its folder
by the stage, run on the procedural clips after the video localize. No downloads, CPU only.

Random tiny weights do not segment the clips, so no IoU quality is asserted here: the contract
(arrays, per-frame ids, meta), the rejects, determinism, and that the quality measures run."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest

from counterfactory.sample import Sample
from counterfactory.stages import get_backend
from counterfactory.stages.models.track import track_quality
from tests import models_fixtures_new as fxn
from tests import test_track
from tests.test_track import truth_of
from tests.test_video import clips_input, video_config


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return fxn.tiny_sam3_video(tmp_path_factory.mktemp("s3v") / "m")


localized = test_track.localized  # the same module-scoped fixture: two clips after localize


SMALL = {"min_area_px": 1, "max_objects": 8}  # random masks: keep every pixel, few tracks (fast)


def segment(model: Path, samples: list[Sample], **params) -> list[Sample]:
    st = get_backend("segment", "sam3-video")(params={"model": str(model), "device": "cpu", **params},
                                              run={"seed": 0})
    out = copy.deepcopy(samples)
    st.process_batch(out)
    return out


@pytest.fixture(scope="module")
def tracked(model_dir, localized) -> list[Sample]:
    return segment(model_dir, localized[1], **SMALL)


def test_sam3_video_segments_and_tracks_every_instance_with_per_frame_ids(localized, tracked):
    records, _ = localized
    out = tracked
    for rec, s in zip(records, out, strict=True):
        assert s.ok, s.meta.get("reject")
        n, h, w = s.arrays["video"].shape[:3]
        labels, core, masks = s.arrays["labels"], s.arrays["masks_core"], s.arrays["masks"]
        assert labels.shape == core.shape == masks.shape == (n, h, w)
        assert labels.dtype == core.dtype == masks.dtype == np.uint8
        insts = s.meta["instances"]
        assert 1 <= len(insts) <= SMALL["max_objects"]
        assert set(np.unique(labels)) <= {0, *range(1, len(insts) + 1)}
        assert np.array_equal(core > 0, labels > 0) and (masks >= core).all()
        for k, inst in enumerate(insts):
            assert inst["track"] == k and inst["mask_method"] == "sam3-video"
            assert inst["category"] in s.meta["targets"]
            on = [t for t in range(n) if (labels[t] == k + 1).any()]
            path = [p[0] for p in inst["path"]]
            assert path == sorted(path) and set(on) <= set(path)  # a later track may cover part of it
            assert inst["frames"] == [path[0], path[-1]] and inst["t_end"] >= inst["t_start"] >= 0
            assert 0 <= inst["score"] <= 1 and isinstance(inst["sam3_id"], int)
        assert len({i["sam3_id"] for i in insts}) == len(insts)  # one track per SAM 3 identity
        if len(s.meta["targets"]) == 1:  # masks of one phrase never overlap: every id is on its frames
            for t in range(n):
                assert set(np.unique(labels[t])) - {0} == {k + 1 for k, i in enumerate(insts)
                                                           if t in [p[0] for p in i["path"]]}
        assert set(s.meta["mask"]) == {"area_frac", "max_area_frac", "frames_with_evidence", "core_area", "dilate_px"}
        assert "detections" not in s.meta
        tr = s.meta["tracking"]
        assert tr["tracker"] == "sam3-video" and tr["prompts"] == "text" and tr["phrases"] == s.meta["targets"]
        assert tr["tracks"] == len(insts) and sum(tr["instances_per_phrase"].values()) == len(insts)
        assert tr["detection_frames"] and 0 <= tr["keyframe_iou_mean"] <= 1  # localize's keys kept
        assert set(s.meta["presence"]) == set(s.meta["targets"]) and min(s.meta["presence"].values()) > 0.99
        # the ground-truth measure the trackers are held to runs on this output (random weights:
        # no quality claim)
        q = track_quality(labels, truth_of(rec, s.meta["targets"]))
        assert 0 <= q["mean_iou"] <= 1 and q["identity_switches"] >= 0


def test_deterministic_same_output_twice(model_dir, localized, tracked):
    a = tracked[0]
    b = segment(model_dir, localized[1][:1], **SMALL)[0]  # a new stage, the same clip
    assert a.ok and b.ok
    for key in ("labels", "masks_core", "masks"):
        assert np.array_equal(a.arrays[key], b.arrays[key])
    assert a.meta == b.meta


def test_the_edit_qa_verify_stages_run_unchanged_on_its_output(tracked, tmp_path):
    out = copy.deepcopy(tracked[:1])
    # random masks cover most of the frame: verify's area bound would end it before its checks
    cfg = video_config(tmp_path, [clips_input(1, seed=2, frames=8)], verify={"max_area_frac": 1.0})
    run = cfg.run_settings()
    for sc in cfg.stages[3:]:
        get_backend(sc.name, sc.backend)(params=sc.params, run=run).process_batch([s for s in out if s.ok])
    s = out[0]
    assert s.ok, s.meta.get("reject")
    assert s.meta["variants"] and s.meta["qa"] and s.meta["metrics"]["tracking_keyframe_iou"] is not None
    for v in s.meta["variants"]:
        assert s.arrays[f"variant/{v}"].shape == s.arrays["video"].shape


def test_no_instance_of_the_phrase_is_target_not_found(model_dir, localized, tmp_path):
    _, samples = localized
    # the presence head says 0.99995 at most: a threshold of 1 makes every phrase absent
    absent = segment(model_dir, samples[:1], presence_threshold=1.0)[0]
    assert not absent.ok and absent.meta["reject"]["reason"] == "target_not_found"
    assert "found no instance of" in absent.meta["reject"]["detail"] and "presence_threshold=1.0" in absent.meta["reject"]["detail"]
    blind = segment(fxn.tiny_sam3_video(tmp_path / "blind", sees=False), samples[:1])[0]  # random weights see nothing
    assert not blind.ok and blind.meta["reject"]["reason"] == "target_not_found"


def test_a_clip_over_the_cap_is_rejected(model_dir, localized):
    _, samples = localized
    capped = segment(model_dir, samples[:1], max_frames=5)[0]
    assert not capped.ok and capped.meta["reject"]["reason"] == "clip_too_long_for_tracker"
    assert capped.meta["reject"]["detail"] == "8 sampled frames > max_frames=5 of sam3-video"


def test_a_folder_of_another_architecture_is_refused(tmp_path):
    other = fxn.tiny_sam2_video(tmp_path / "s2v")
    with pytest.raises(ValueError, match=r"a 'sam2_video' model, but the sam3-video backend loads 'sam3_video'") as e:
        get_backend("segment", "sam3-video")(params={"model": str(other), "device": "cpu"}, run={})
    assert "\n" not in str(e.value)


def test_hub_kernels_are_off_unless_asked(model_dir):
    from transformers.models.sam3_video import modeling_sam3_video as mod

    mod.cv_utils_kernel = None  # "not tried yet": the library would fetch it at the first detection
    get_backend("segment", "sam3-video")(params={"model": str(model_dir), "device": "cpu"}, run={})
    assert mod.cv_utils_kernel is False  # the library will not fetch code from the Hub


def test_the_commented_gpu_config_choice_validates():
    """configs/gpu.yaml offers segment: sam3-video as a commented choice: uncommented, its
    params are valid for the backend (a hub id with a revision)."""
    import yaml

    lines = (Path(__file__).resolve().parents[1] / "configs" / "gpu.yaml").read_text().splitlines()
    at = next(i for i, ln in enumerate(lines) if ln.strip() == "#     backend: sam3-video")
    block = yaml.safe_load("\n".join(ln.replace("#", " ", 1) for ln in lines[at - 1:at + 3]))[0]
    assert block["name"] == "segment" and block["resources"]["num_gpus"] > 0
    params = get_backend("segment", "sam3-video").Params.model_validate(block["params"])
    assert params.model == "facebook/sam3" and params.revision
