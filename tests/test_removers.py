"""Issue 31 (model side): removers built for removal in their diffusers classes (SDXL inpainting
with LCM sampling, FLUX.1 Fill + removal LoRA, FLUX.2 klein inpainting + erase LoRA), and the
``object_invented`` check of the re-detection verifier. Real classes at tiny sizes (random
weights, fixed seeds) saved and loaded with ``from_pretrained(path)``; CPU only, no downloads.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from counterfactory.pipeline.config import ConfigError, load_config, validate_config
from counterfactory.sample import Sample
from counterfactory.stages import get_backend
from counterfactory.stages.models.invented import invented_hit, invented_phrases
from tests import models_fixtures as fx
from tests import models_fixtures_removers as fr
from tests.conftest import (
    build_stage,
    demo_dict,
    fresh,
    segmented_scenes,
)

CPU = {"device": "cpu"}
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pipes(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("removers")
    out = {"sdxl": fr.tiny_sdxl_inpaint(d / "sdxl"), "fill": fr.tiny_flux_fill(d / "fill"),
           "klein": fr.tiny_flux2_klein(d / "klein")}
    out["fill-lora"] = fr.transformer_lora(d / "fill-lora", out["fill"], "FluxFillPipeline")
    out["klein-lora"] = fr.transformer_lora(d / "klein-lora", out["klein"], "Flux2KleinInpaintPipeline")
    return out


@pytest.fixture(scope="module")
def segmented(tmp_path_factory) -> list[Sample]:
    return segmented_scenes(tmp_path_factory.mktemp("seg"), questions=1)


stage = build_stage


def remover(pipes: dict[str, Path], backend: str, **extra):
    params = {
        "remover-sdxl": {"model": str(pipes["sdxl"]), "steps": 2},
        "remover-flux-fill": {"model": str(pipes["fill"]), "steps": 1, "native_size": 32, "max_sequence_length": 16,
                              "loras": [{"id": str(pipes["fill-lora"])}]},
        "remover-flux2-klein": {"model": str(pipes["klein"]), "steps": 2, "native_size": 32,
                                "max_sequence_length": 32, "text_encoder_out_layers": [1],
                                "loras": [{"id": str(pipes["klein-lora"])}]},
    }[backend]
    return stage("edit", backend, **(params | {"variants": ["remove", "random_mask"]} | extra), **CPU)


def forward_rows(module) -> list[int]:
    """Rows of each forward pass of ``module`` (its first tensor argument's batch size)."""
    rows: list[int] = []

    def hook(mod, args, kw):
        x = args[0] if args else next(v for v in kw.values() if hasattr(v, "shape"))
        rows.append(int(x.shape[0]))

    module.register_forward_pre_hook(hook, with_kwargs=True)
    return rows


# --- removers ----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,pipeline,text_encoder,guidance", [
    ("remover-sdxl", "StableDiffusionXLInpaintPipeline", "text_encoder_2", "none"),
    ("remover-flux-fill", "FluxFillPipeline", "text_encoder_2", "distilled"),
    ("remover-flux2-klein", "Flux2KleinInpaintPipeline", "text_encoder", "distilled"),
])
def test_a_remover_repaints_inside_the_mask_only_loaded_once_prompt_encoded_once(pipes, segmented, backend,
                                                                                  pipeline, text_encoder, guidance):
    st = remover(pipes, backend)
    assert st.native == 32
    encoded = forward_rows(getattr(st.pipe, text_encoder))
    a, b = fresh(segmented), fresh(segmented)
    st.process_batch(a)
    st.process_batch(b)
    for sa, sb in zip(a, b, strict=True):
        assert sa.ok and sa.meta["variants"] == ["remove", "random_mask"], sa.meta.get("variant_rejects")
        img, mask = sa.arrays["image"], sa.arrays["mask"] > 0
        out = sa.arrays["variant/remove"]
        assert np.array_equal(out[~mask], img[~mask])  # outside the mask: the original, bit for bit
        assert not np.array_equal(out[mask], img[mask])
        assert np.array_equal(out, sb.arrays["variant/remove"])  # same seed, same pixels (and batch-independent)
        e = sa.meta["edits"]["remove"]
        assert e["method"] == f"diffusers:{pipeline}" and e["seed"] == sa.seed % 2**32
    # each distinct remove prompt (klein's names the target) encoded once, alone, for the actor's
    # life: not again for the second batch (no CFG: no negative)
    assert encoded == [1] * len({s.meta["edits"]["remove"]["prompt"] for s in a})
    rec = st.describe()["models"]["inpaint"]
    assert rec["pipeline"] == pipeline and rec["guidance"] == guidance and rec["native_size"] == 32
    if backend != "remover-sdxl":
        assert rec["loras"][0]["id"] == str(pipes[f"{backend.split('-')[-1]}-lora"]) and rec["loras"][0]["modules"] == ["transformer"]
        # fused: the transformer holds plain layers again
        assert not any("lora" in n for n, _ in st.pipe.transformer.named_parameters())


def test_sdxl_remover_is_the_rorem_recipe_lcm_four_steps_one_unet_pass_each(pipes, segmented):
    st = remover(pipes, "remover-sdxl", steps=4)
    assert type(st.pipe.scheduler).__name__ == "LCMScheduler" and st.params.guidance_scale == 1.0
    rows = forward_rows(st.pipe.unet)
    samples = fresh(segmented)[:2]
    st.process_batch(samples)
    assert all("remove" in s.meta["variants"] for s in samples)
    assert rows == [2] * 4  # 4 steps, the 2 crops in one pass each: no unconditional branch
    # with CFG (RORem's 50-step recipe) each step sees the conditional and the unconditional half
    cfg = remover(pipes, "remover-sdxl", steps=2, scheduler="default", guidance_scale=3.0)
    rows = forward_rows(cfg.pipe.unet)
    cfg.process_batch(fresh(segmented)[:2])
    assert rows == [4] * 2 and cfg.describe()["models"]["inpaint"]["guidance"] == "cfg"


def test_the_removal_lora_changes_the_fill_and_a_lora_of_another_family_is_refused(pipes, segmented, tmp_path):
    with_lora = remover(pipes, "remover-flux-fill")
    other = remover(pipes, "remover-flux-fill", loras=[{"id": str(pipes["fill-lora"]), "scale": 0.0}])
    a, b = fresh(segmented)[:1], fresh(segmented)[:1]
    with_lora.process_batch(a)
    other.process_batch(b)
    assert not np.array_equal(a[0].arrays["variant/remove"], b[0].arrays["variant/remove"])
    sd_lora = fx.sd_lora(tmp_path / "sd-lora", fx.sd_inpaint(tmp_path / "sd"))  # a UNet LoRA: no transformer key
    with pytest.raises(ValueError, match="another base model") as e:
        remover(pipes, "remover-flux-fill", loras=[{"id": str(sd_lora)}])
    assert "\n" not in str(e.value)
    # a LoRA of a deeper FLUX (same widths: its first blocks fit, the others name blocks this one
    # lacks) is refused, not loaded in part; diffusers drops those layers without a word
    from safetensors.torch import load_file, save_file

    sd = load_file(str(pipes["fill-lora"] / "pytorch_lora_weights.safetensors"))
    deeper = tmp_path / "deeper-lora"
    deeper.mkdir()
    save_file(sd | {k.replace("transformer_blocks.0.", "transformer_blocks.5."): v.clone() for k, v in sd.items()
                    if k.startswith("transformer.transformer_blocks.0.")}, str(deeper / "pytorch_lora_weights.safetensors"))
    with pytest.raises(ValueError, match=r"4 of its \d+ layers are not in this FluxFillPipeline's transformer "
                       r"\(e.g. transformer_blocks.5.attn") as e:
        remover(pipes, "remover-flux-fill", loras=[{"id": str(deeper)}])
    assert "\n" not in str(e.value)


def test_klein_reads_the_highlighted_crop_as_a_reference_image(pipes, segmented):
    plain = remover(pipes, "remover-flux2-klein")
    marked = remover(pipes, "remover-flux2-klein", reference="highlight")
    tokens: dict[str, list[int]] = {"plain": [], "marked": []}
    for key, st in (("plain", plain), ("marked", marked)):
        st.pipe.transformer.register_forward_pre_hook(
            lambda mod, args, kw, k=key: tokens[k].append(kw["hidden_states"].shape[1]), with_kwargs=True)
    a, b = fresh(segmented)[:1], fresh(segmented)[:1]
    plain.process_batch(a)
    marked.process_batch(b)
    # the joint sequence: target latents + the crop (+ the highlighted crop): 16 x 16 tokens each at 32 px
    assert tokens["plain"] == [512, 512] and tokens["marked"] == [768, 768]
    assert not np.array_equal(a[0].arrays["variant/remove"], b[0].arrays["variant/remove"])
    job = {"crop": np.full((4, 4, 3), 100, np.uint8), "mask": np.pad(np.full((2, 2), 255, np.uint8), 1)}
    ref = marked._conditioning([job])["image_reference"][0].numpy()  # (3, 4, 4) in [0, 1]
    assert np.allclose(ref[:, 0, 0], 100 / 255) and np.allclose(ref[:, 1, 1], [(100 / 255 + 1) / 2, 50 / 255, 50 / 255])


def test_remover_config_errors_are_one_line_before_any_weight_loads(pipes, tmp_path):
    def cfg_with(backend: str, **params):
        data = copy.deepcopy(demo_dict())
        st = {s["name"]: s for s in data["stages"]}
        st["edit"].update(backend=backend, params=params)
        return validate_config(data, source="t.yaml", base_dir=tmp_path)

    with pytest.raises(ConfigError, match="loras") as e:  # a FLUX remover without its removal LoRA
        cfg_with("remover-flux-fill", model=str(pipes["fill"]))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="variants"):  # removers only remove (and make the controls)
        cfg_with("remover-sdxl", model=str(pipes["sdxl"]), variants=["attribute"])
    with pytest.raises(ConfigError, match="pipeline_class"):
        cfg_with("remover-sdxl", model=str(pipes["sdxl"]), pipeline_class="StableDiffusionInpaintPipeline")
    with pytest.raises(ValidationError):
        get_backend("edit", "remover-flux2-klein").Params(model=str(pipes["klein"]), loras=[], reference="blur")
    with pytest.raises(ConfigError, match="multiple of 16") as e:
        cfg_with("remover-flux2-klein", model=str(pipes["klein"]), native_size=1000,
                 loras=[{"id": str(pipes["klein-lora"])}])
    assert "\n" not in str(e.value)
    # a folder of another pipeline: named in one line, nothing loaded
    with pytest.raises(ValueError, match="a 'FluxFillPipeline' folder, but edit: remover-sdxl loads") as e:
        stage("edit", "remover-sdxl", model=str(pipes["fill"]), **CPU)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="'StableDiffusionXLInpaintPipeline' folder"):
        stage("edit", "remover-flux2-klein", model=str(pipes["sdxl"]), loras=[{"id": str(pipes["klein-lora"])}], **CPU)


def test_gpu_config_names_a_pinnable_remover_and_the_invented_check():
    import yaml

    from counterfactory import pin

    cfg = load_config(REPO / "configs" / "gpu.yaml")
    st = {s.name: s for s in cfg.stages}
    assert st["edit"].backend.startswith("remover-")
    edit = get_backend("edit", st["edit"].backend).Params.model_validate(st["edit"].params)
    refs = {r.repo for r in pin.hub_refs(yaml.safe_load((REPO / "configs" / "gpu.yaml").read_text()))}
    assert edit.model in refs and edit.loras and all(lo.id in refs for lo in edit.loras)  # `pin` pins them all
    assert edit.steps == 4 and edit.scheduler == "lcm" and edit.guidance_scale == 1.0
    verify = get_backend("verify", st["verify"].backend).Params.model_validate(st["verify"].params)
    assert verify.invented_threshold == 0.3 and verify.invented_iou == 0.3 and "object" in verify.invented_prompts


def test_the_commented_remover_choices_of_the_gpu_config_validate():
    """configs/gpu.yaml lists the FLUX Fill and FLUX.2 klein removers as commented choices:
    uncommented, each is valid for its backend (hub ids with a revision, a removal LoRA)."""
    import re

    import yaml

    text = (REPO / "configs" / "gpu.yaml").read_text()
    found = {}
    for block in re.findall(r"  #   - name: edit\n((?:  #     .*\n)+)", text):
        doc = yaml.safe_load("\n".join(ln[len("  #     "):] for ln in block.splitlines()))
        if doc["backend"].startswith("remover-"):
            found[doc["backend"]] = get_backend("edit", doc["backend"]).Params.model_validate(doc["params"])
    assert set(found) == {"remover-flux-fill", "remover-flux2-klein"}
    for p in found.values():
        assert p.revision and p.loras and all(lo.revision for lo in p.loras)
    assert found["remover-flux2-klein"].reference == "mask" and found["remover-flux2-klein"].steps == 4


# --- object_invented ---------------------------------------------------------------------------
def test_invented_hit_is_a_box_in_the_edited_region():
    region = np.zeros((100, 100), np.uint8)
    region[20:80, 20:80] = 255
    det = lambda box, score, phrase="object": {"box": box, "score": score, "phrase": phrase}  # noqa: E731
    small_inside = det([40, 40, 50, 50], 0.5)  # IoU with the region's box 0.03, but all inside it
    overlapping = det([5, 5, 65, 65], 0.4)  # IoU 0.39 with the region's box, 56 % inside
    touching = det([75, 75, 100, 100], 0.9)  # 4 % inside, IoU 0.006
    outside = det([85, 0, 100, 15], 0.95)
    assert invented_hit([touching, outside], region, 0.3, 0.8) == (0.0, None)
    assert invented_hit([small_inside, touching], region, 0.3, 0.8) == (0.5, small_inside)
    assert invented_hit([small_inside, overlapping], region, 0.3, 1.0)[0] == 0.5  # best qualifying
    assert invented_hit([overlapping], region, 0.3, 1.0) == (0.4, overlapping)  # OSOR's IoU 0.3
    assert invented_hit([overlapping], region, 0.5, 0.6) == (0.0, None)  # IoU 0.39 < 0.5, 56 % < 60 % inside
    assert invented_hit([touching], region, 0.0, 1.0)[0] == 0.9  # any overlap at IoU 0
    assert invented_hit([outside], region, 0.0, 0.01) == (0.0, None)  # never a box off the region
    assert invented_hit([small_inside], np.zeros_like(region), 0.0, 0.01) == (0.0, None)


def test_invented_phrases_are_the_other_annotated_categories_and_the_generic_prompts():
    from types import SimpleNamespace

    s = SimpleNamespace(meta={"targets": ["cup"], "annotated": [
        {"category": "cup", "box": [0, 0, 4, 4]}, {"category": "Person", "box": [5, 5, 9, 9]},
        {"category": "cup", "box": [10, 0, 14, 4]}, {"category": "laptop", "box": [0, 10, 4, 14]},
        {"category": "person", "box": [20, 20, 24, 24]}]})
    # the removed target is re-detection's business (target_still_detected), not this check's
    assert invented_phrases(s, ["object", "Thing"]) == ["person", "laptop", "object", "thing"]
    assert invented_phrases(SimpleNamespace(meta={"targets": ["cup"]}), ["object"]) == ["object"]


@pytest.fixture(scope="module")
def detectors(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("detectors")
    return {"owl": fx.owlv2(d / "owl"), "gd": fx.grounding_dino(d / "gd")}


@pytest.mark.parametrize("kind", ["owlv2", "grounding-dino"])
def test_redetect_rejects_a_removal_with_an_object_in_its_region(detectors, segmented, kind):
    model = str(detectors["owl" if kind == "owlv2" else "gd"])
    # the pixel checks never reject here: what is measured is the new check
    loose = dict(min_inside_mad=0.0, max_contrast_ratio=100.0, redetect_threshold=1.0, text_threshold=0.0,
                 score_original=False, **CPU)

    def verify(**params):
        st = stage("verify", "redetect", model=model, detector=kind, **loose, **params)
        seen: list[tuple[list, list]] = []
        detect = st.detector.detect

        def recording(images, phrases, **kw):  # the real detector runs; its inputs are recorded
            seen.append(([im.copy() for im in images], phrases))
            return detect(images, phrases, **kw)

        st.detector.detect = recording
        samples = fresh(segmented)
        st.process_batch(samples)
        return samples, seen

    def rejected_exactly_at_or_above(samples, scores, cut):
        for s, score in zip(samples, scores, strict=True):
            # (a tiny detector may also score the target itself 1.0: target_still_detected, not this check)
            rejects = [r for r in s.meta.get("variant_rejects", []) if r["reason"] == "object_invented"]
            if score >= cut:
                assert "remove" not in s.meta["variants"] and rejects[0]["variant"] == "remove"
                assert kind in rejects[0]["detail"] and "in the edited region" in rejects[0]["detail"]
            else:
                assert not rejects

    # measure: the best score of a box in each removal's region, kept whether or not it rejects
    samples, seen = verify(invented_threshold=1.0, invented_iou=0.0)
    scores = [s.meta["metrics"]["remove"]["invented_score"] for s in samples]
    assert max(scores) > 0, scores  # the tiny detector's boxes touch the edited regions
    rejected_exactly_at_or_above(samples, scores, 1.0)
    # what it was asked: the EDITED images, the other annotated categories and "object"
    asked = [call for call in seen if all("object" in ph for ph in call[1])]
    assert len(asked) == 1  # one detector batch for every removal of the batch (the other call: re-detection)
    images, phrases = asked[0]
    assert len(images) == len(samples)
    for s, im, ph in zip(segmented, images, phrases, strict=True):
        assert np.array_equal(im, s.arrays["variant/remove"]) and ph == invented_phrases(s, ["object"])
    # at a threshold between the scores, exactly the removals scoring at or above it are rejected
    distinct = sorted(set(scores))
    assert len(distinct) >= 2, scores
    samples, _ = verify(invented_threshold=distinct[1], invented_iou=0.0)
    assert [s.meta["metrics"]["remove"]["invented_score"] for s in samples] == scores
    rejected_exactly_at_or_above(samples, scores, distinct[1])
    # off: nothing asked, nothing rejected
    samples, seen = verify(invented_threshold=None)
    assert all("object" not in ph for _, phs in seen for ph in phs)  # only the target re-detection ran
    assert not any(r["reason"] == "object_invented" for s in samples for r in s.meta.get("variant_rejects", []))
    assert all("invented_score" not in s.meta["metrics"].get("remove", {}) for s in samples)


def test_a_sample_left_without_a_counterfactual_by_object_invented_is_rejected(detectors, segmented):
    st = stage("verify", "redetect", model=str(detectors["owl"]), detector="owlv2", min_inside_mad=0.0,
               max_contrast_ratio=100.0, redetect_threshold=1.0, text_threshold=0.0, invented_threshold=0.0,
               invented_iou=0.0, **CPU)
    samples = fresh(segmented)[1:]  # the tiny OWLv2 puts a box in these two removals' regions
    for s in samples:  # remove is the only counterfactual these samples have
        s.meta["variants"] = [v for v in s.meta["variants"] if v in ("remove", "random_mask")]
    st.process_batch(samples)
    for s in samples:
        assert not s.ok and s.meta["reject"]["reason"] == "no_valid_counterfactual"
        assert [r["reason"] for r in s.meta["variant_rejects"] if r["variant"] == "remove"] == ["object_invented"]


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_diffusers_inpaint_on_sdxl_weights_encodes_prompts_with_pooled_embeddings(pipes, segmented, guidance_scale):
    """``edit: diffusers-inpaint`` with an SDXL inpainting model: its ``encode_prompt`` takes
    ``prompt_2`` second and returns pooled embeddings the pipeline requires (the SD 1.5 argument
    order sent the device as ``prompt_2``)."""
    st = stage("edit", "diffusers-inpaint", model=str(pipes["sdxl"]), steps=2, guidance_scale=guidance_scale,
               variants=["remove"], batch_size=2, **CPU)
    a, b = fresh(segmented)[:2], fresh(segmented)[:2]
    st.process_batch(a)
    st.process_batch(b)  # the cached embeddings give the same pixels
    for sa, sb in zip(a, b, strict=True):
        assert sa.ok and "remove" in sa.meta["variants"], sa.meta.get("reject")
        assert np.array_equal(sa.arrays["variant/remove"], sb.arrays["variant/remove"])
    assert st.describe()["models"]["inpaint"]["guidance"] == ("cfg" if guidance_scale > 1 else "none")
