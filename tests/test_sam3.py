"""localize: sam3 and segment: sam3 with a tiny real Sam3Model (built from config, saved,
loaded from its folder), checked against the raw library call. No downloads, CPU only."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from counterfactory.pipeline.config import validate_config
from counterfactory.pipeline.runner import local_batches
from counterfactory.sample import Sample, decode_batch, encode_batch
from counterfactory.stages import get_backend
from tests import models_fixtures as fx
from tests import models_fixtures_new as fxn
from tests.conftest import demo_dict, load_records, make_config, scenes_input

CPU = {"device": "cpu"}


@pytest.fixture(scope="module")
def sam3_dir(tmp_path_factory) -> Path:
    return fxn.tiny_sam3(tmp_path_factory.mktemp("sam3") / "m")


@pytest.fixture(scope="module")
def ingested(tmp_path_factory) -> list[Sample]:
    cfg = make_config(tmp_path_factory.mktemp("in"), [scenes_input(3, seed=5, questions=1)])
    out: list[Sample] = []
    for b in local_batches(cfg, load_records(cfg), stop_after="ingest"):
        out.extend(decode_batch(b))
    return out


def fresh(samples):
    return decode_batch(encode_batch(samples))


def localize(model: Path, **params):
    return get_backend("localize", "sam3")(params={"model": str(model), **CPU, **params}, run={"seed": 0})


def test_every_instance_of_the_raw_call_with_its_score_and_mask(sam3_dir, ingested):
    st = localize(sam3_dir, presence_threshold=0.0, instance_threshold=0.45, batch_size=2, min_mask_px=0)
    encoded: list[int] = []
    st.model.vision_encoder.register_forward_pre_hook(lambda mod, args: encoded.append(len(args[0])))
    samples = fresh(ingested)
    samples[0].meta["question"]["targets"] = ["circle", "red circle"]  # two phrases, one encoding
    st.process_batch(samples)
    assert sum(encoded) == len(samples)  # each image through the encoder once, whatever its phrases
    proc, model = st.processor, st.model
    for s in samples:
        assert s.ok, s.meta.get("reject")
        img = s.arrays["image"]
        want = []
        for phrase in s.meta["presence"]:
            raw_in = proc(images=[img], text=[phrase], return_tensors="pt")
            with torch.inference_mode():
                raw = model(**raw_in)
            q = raw.pred_logits.sigmoid()[0]
            assert s.meta["presence"][phrase] == pytest.approx(float(raw.presence_logits.sigmoid()[0, 0]), abs=1e-4)
            raw.presence_logits = None
            post = proc.post_process_instance_segmentation(raw, threshold=0.45, mask_threshold=0.5,
                                                           target_sizes=[img.shape[:2]])[0]
            assert torch.allclose(post["scores"], q[q > 0.45])
            want += [(phrase, float(sc), mk.numpy().astype(np.uint8)) for sc, mk in zip(post["scores"], post["masks"],
                                                                                      strict=True)]
        want.sort(key=lambda t: -t[1])
        got = s.meta["instances"]
        assert len(got) == len(want) == len(s.arrays["instance_masks"]) > 0
        for inst, mk, (phrase, score, wmk) in zip(got, s.arrays["instance_masks"], want, strict=True):
            assert inst["category"] == phrase and inst["score"] == pytest.approx(score, abs=1e-4)
            assert inst["detector"] == "sam3" and inst["mask_area"] == int(mk.sum())
            assert np.mean(mk != wmk) < 1e-3  # the same mask as the raw call, up to float rounding
            ys, xs = np.nonzero(mk)
            assert inst["box"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    assert {i["category"] for i in samples[0].meta["instances"]} <= {"circle", "red circle"}
    rec = st.describe()["models"]["sam3"]
    assert rec["id"] == str(sam3_dir) and rec["architecture"] == "transformers.Sam3Model" and rec["local_fingerprint"]


def test_presence_decides_absence_like_the_not_found_path(sam3_dir, ingested):
    samples = fresh(ingested)
    localize(sam3_dir, presence_threshold=0.99, instance_threshold=0.0).process_batch(samples)
    for s in samples:  # the same reason the detectors give when nothing is found
        assert not s.ok and s.meta["reject"]["reason"] == "target_not_found"
        assert "presence" in s.meta["reject"]["detail"]
    # thresholds: fewer instances as the instance threshold rises; max_instances caps them
    counts = []
    for thr in (0.0, 0.5):
        samples = fresh(ingested)
        localize(sam3_dir, presence_threshold=0.0, instance_threshold=thr, min_mask_px=0).process_batch(samples)
        counts.append(sum(len(s.meta.get("instances", [])) for s in samples))
    assert counts[0] == 10 * len(ingested) and counts[0] > counts[1]
    samples = fresh(ingested)
    localize(sam3_dir, presence_threshold=0.0, instance_threshold=0.0, max_instances=3).process_batch(samples)
    assert all(len(s.meta["instances"]) == 3 == len(s.arrays["instance_masks"]) for s in samples)


def test_segment_sam3_merges_and_dilates_the_localize_masks(sam3_dir, ingested):
    samples = fresh(ingested)
    localize(sam3_dir, presence_threshold=0.0, instance_threshold=0.5, max_instances=2).process_batch(samples)
    seg = get_backend("segment", "sam3")(params={"dilate_px": 2, "dilate_frac": 0.0}, run={})
    live = [s for s in samples if s.ok]
    assert live
    seg.process_batch(live)
    for s in live:
        core = s.arrays["instance_masks"].max(axis=0) > 0
        assert np.array_equal(s.arrays["mask_core"] > 0, core)
        assert (s.arrays["mask"] > 0).sum() >= core.sum() and s.meta["mask"]["dilate_px"] == 2
    # instances from another localize come without SAM 3 masks: a reject that says so
    other = fresh(ingested)
    get_backend("localize", "default")(params={}, run={}).process_batch(other)
    for s in other:
        s.arrays.pop("instance_masks", None)
    seg.process_batch([s for s in other if s.ok])
    assert all(s.meta["reject"]["reason"] == "no_instance_masks" for s in other if not s.ok)


def test_a_folder_of_another_architecture_is_refused(tmp_path):
    sam = fx.sam_hf(tmp_path / "sam")
    with pytest.raises(ValueError, match=r"a 'sam' model, but the sam3 backend loads 'sam3'") as e:
        localize(sam)
    assert "\n" not in str(e.value)


def test_config_with_sam3_runs_through_segment(sam3_dir, tmp_path):
    data = copy.deepcopy(demo_dict())
    data["inputs"] = [scenes_input(2, seed=1, questions=1)]
    data["output"]["root"] = str(tmp_path / "out")
    st = {s["name"]: s for s in data["stages"]}
    st["localize"].update(backend="sam3", params={"model": str(sam3_dir), "device": "cpu",
                                                  "presence_threshold": 0.0, "instance_threshold": 0.5})
    st["segment"].update(backend="sam3", params={"dilate_px": 3})
    cfg = validate_config(data, source="test", base_dir=tmp_path)
    out = [s for b in local_batches(cfg, load_records(cfg), stop_after="segment") for s in decode_batch(b)]
    assert out and all(s.ok and s.meta["mask"]["dilate_px"] >= 3 for s in out)
    assert all(s.meta["provenance"]["stages"]["localize"]["models"]["sam3"]["id"] == str(sam3_dir) for s in out)
