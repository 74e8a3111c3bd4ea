"""edit: instruction with tiny real FluxKontext / FluxKontextInpaint pipelines (built from
configs, saved, loaded from their folders): crop, paste-back inside the region only,
determinism, OOM back-off, provenance. No downloads, CPU only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from counterfactory.pipeline.runner import local_batches
from counterfactory.sample import Sample, decode_batch, encode_batch
from counterfactory.stages import get_backend
from counterfactory.stages.models.inpaint import crop_box
from tests import models_fixtures as fx
from tests import models_fixtures_new as fxn
from tests.conftest import load_records, make_config, scenes_input

FAST = {"device": "cpu", "native_size": 32, "steps": 2, "max_sequence_length": 16, "true_cfg_scale": 1.0}
VARIANTS = ["remove", "attribute", "replace", "blackout", "random_mask"]


@pytest.fixture(scope="module")
def pipes(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("instruct")
    return {"kontext": fxn.tiny_flux_kontext(d / "k"), "inpaint": fxn.tiny_flux_kontext(d / "ki", inpaint=True)}


@pytest.fixture(scope="module")
def segmented(tmp_path_factory) -> list[Sample]:
    cfg = make_config(tmp_path_factory.mktemp("seg"), [scenes_input(2, seed=5, questions=1)])
    out = [s for b in local_batches(cfg, load_records(cfg), stop_after="segment") for s in decode_batch(b)]
    assert all(s.ok for s in out)
    return out


def fresh(samples):
    return decode_batch(encode_batch(samples))


def edit(model: Path, **params):
    return get_backend("edit", "instruction")(params={"model": str(model), **FAST, **params},
                                              run={"seed": 0, "abstain_answer": "unknown"})


def test_instruction_edits_paste_back_inside_the_region_only(pipes, segmented):
    st = edit(pipes["kontext"], variants=VARIANTS, batch_size=4)
    samples = fresh(segmented)
    st.process_batch(samples)
    for s in samples:
        assert s.ok, s.meta.get("reject")
        img, mask = s.arrays["image"], s.arrays["mask"]
        for v in ("remove", "attribute", "replace"):
            if v not in s.meta["variants"]:
                assert any(r["variant"] == v and r["reason"] == "not_applicable" for r in s.meta["variant_rejects"])
                continue
            out, info = s.arrays[f"variant/{v}"], s.meta["edits"][v]
            assert np.array_equal(out[mask == 0], img[mask == 0])  # outside: the original, bit for bit
            assert np.abs(out[mask > 0].astype(int) - img[mask > 0]).mean() > 1  # inside: repainted
            assert info["method"] == "instruction:FluxKontextPipeline" and info["instruction"] == info["prompt"]
            # the same crop around the mask as diffusers-inpaint (for inpaint, around the edit region)
            assert tuple(info["crop_box"]) == crop_box(mask, st.params.crop_margin, 64)
        att = s.meta["edits"].get("attribute")
        if att:
            assert att["prompt"].startswith(f"Make the {s.meta['targets'][0]} {att['new_value']}.")
    rec = st.describe()["models"]["instruction_edit"]
    assert rec["pipeline"] == "FluxKontextPipeline" and rec["id"] == str(pipes["kontext"]) and rec["native_size"] == 32
    # deterministic, whatever the batch size; CUDA out-of-memory halves the batch and changes nothing
    again = edit(pipes["kontext"], variants=VARIANTS, batch_size=1)
    real = again.pipe
    sizes: list[int] = []

    class OomAboveOne:
        def __call__(self, **kw):
            sizes.append(len(kw["prompt"]))
            if len(kw["prompt"]) > 1:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")
            return real(**kw)

    again.pipe = OomAboveOne()
    again.params.batch_size = 4
    rerun = fresh(segmented)
    again.process_batch(rerun)
    assert sizes[0] > 1 and set(sizes[1:]) <= {1, 2} and sizes.count(1) >= 1
    for a, b in zip(samples, rerun, strict=True):
        assert a.meta["variants"] == b.meta["variants"]
        for v in a.meta["variants"]:
            assert np.array_equal(a.arrays[f"variant/{v}"], b.arrays[f"variant/{v}"]), v


def test_kontext_inpaint_sees_the_mask_and_pixel_verify_passes_outside(pipes, segmented):
    st = edit(pipes["inpaint"], pipeline_class="FluxKontextInpaintPipeline", variants=["attribute", "random_mask"])
    assert "mask_image" in st.call_args
    samples = fresh(segmented)
    st.process_batch(samples)
    verify = get_backend("verify", "default")(params={"min_inside_mad": 0.0}, run={})
    verify.process_batch(samples)
    for s in samples:
        assert s.meta["metrics"]["attribute"]["outside_changed_frac"] == 0.0
        assert s.meta["edits"].get("attribute", {}).get("method", "instruction:FluxKontextInpaintPipeline") == \
            "instruction:FluxKontextInpaintPipeline"


def test_a_folder_of_another_pipeline_is_refused(tmp_path):
    sd = fx.sd_inpaint(tmp_path / "sd")
    with pytest.raises(ValueError, match=r"a 'StableDiffusionInpaintPipeline' folder, but edit: instruction "
                                         r"loads FluxKontextPipeline") as e:
        edit(sd)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="pipeline_class"):
        edit(sd, pipeline_class="StableDiffusionInpaintPipeline")
