"""Model backends with their real classes at tiny sizes (random weights, fixed seeds), saved and
loaded through ``from_pretrained(path)`` exactly as a user's config does. Only a process boundary
is faked: an OpenAI-compatible HTTP server on loopback. No downloads, CPU only.
"""

from __future__ import annotations

import copy
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from counterfactory.pipeline.config import validate_config
from counterfactory.pipeline.runner import local_batches, run_pipeline
from counterfactory.sample import RunSettings, Sample
from counterfactory.stages import get_backend
from counterfactory.stages.models.common import MissingDependency, require, run_batched
from counterfactory.stages.models.grounding import extract_targets
from tests import models_fixtures as fx
from tests.conftest import (
    build_stage,
    demo_dict,
    fresh,
    load_records,
    make_config,
    scenes_input,
    segmented_scenes,
)

CPU = {"device": "cpu"}


# --- tiny models, built once per session ------------------------------------------------
@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("tiny-models")
    return {
        "gd": fx.grounding_dino(d / "gd"),
        "owl": fx.owlv2(d / "owl"),
        "sam": fx.sam_checkpoint(d / "sam" / "sam.safetensors"),
        "sam_hf": fx.sam_hf(d / "sam_hf"),
        "sd": fx.sd_inpaint(d / "sd"),
        "llm": fx.tiny_llm(d / "llm"),
    }


@pytest.fixture(scope="module")
def segmented(tmp_path_factory) -> list[Sample]:
    return segmented_scenes(tmp_path_factory.mktemp("seg"), questions=2)


stage = build_stage


# --- shared helpers ---------------------------------------------------------------------
def test_oom_backoff_halves_to_one_then_fails_only_that_item():
    calls: list[list[int]] = []

    def step(chunk):
        calls.append(list(chunk))
        if len(chunk) > 2 or 5 in chunk:  # item 5 never fits, even alone
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [x * 10 for x in chunk]

    run = run_batched(step, list(range(8)), 8, on_oom=lambda: None)
    assert [len(c) for c in calls[:3]] == [8, 4, 2]  # halved until it fits
    assert run.outputs == [0, 10, 20, 30, 40, None, 60, 70]
    assert set(run.failures) == {5} and run.failures[5][0] == "cuda_oom"
    assert run.sizes[-4:] == [1, 1, 1, 1]  # stays halved for the rest of the call
    # a non-OOM error isolates the bad item instead of failing the whole batch
    run2 = run_batched(lambda ch: [1 / x for x in ch], [1, 0, 2], 3)
    assert run2.outputs[0] == 1 and run2.outputs[2] == 0.5 and run2.failures[1][0] == "model_error"


def test_missing_dependency_names_the_package():
    with pytest.raises(MissingDependency, match="pip install 'not-a-real-pkg'"):
        require("not_a_real_module_xyz", "not-a-real-pkg", "sam")


def test_noun_phrase_extraction_is_rule_based_and_cached():
    assert extract_targets("How many red circles are there?") == ("red circle",)
    assert extract_targets("Is there a dog in the image?") == ("dog",)
    assert extract_targets("Is the square on the left or the right?") == ("square",)
    assert extract_targets.cache_info().currsize >= 3


def test_pickle_checkpoints_are_refused(tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(ValueError, match="pickle"):
        stage("localize", "grounding-dino", model=str(d), **CPU)
    with pytest.raises(ValueError, match="safetensors"):
        stage("segment", "sam", checkpoint=str(d / "pytorch_model.bin"), model_type="vit_b", **CPU)


def test_a_folder_of_another_architecture_is_refused(models):
    """transformers only warns when a folder is loaded as another architecture, and the run
    would go on with random weights: the backend checks the folder's model_type first."""
    with pytest.raises(ValueError, match="'grounding-dino' model, but the owlv2 backend loads 'owlv2'"):
        stage("localize", "owlv2", model=str(models["gd"]), **CPU)
    with pytest.raises(ValueError, match="the grounding-dino backend loads 'grounding-dino'"):
        stage("localize", "grounding-dino", model=str(models["owl"]), **CPU)
    with pytest.raises(ValueError, match="the sam-hf backend loads 'sam'"):
        stage("segment", "sam-hf", model=str(models["gd"]), **CPU)


# --- localize ----------------------------------------------------------------------------
@pytest.mark.parametrize("backend,key", [("grounding-dino", "gd"), ("owlv2", "owl")])
def test_detector_localize_converts_boxes_and_applies_thresholds(models, segmented, backend, key):
    st = stage("localize", backend, model=str(models[key]), revision="test-rev", box_threshold=0.0,
               text_threshold=0.0, max_instances=3, **CPU)
    samples = fresh(segmented)
    for s in samples:
        s.meta["objects"] = []
    st.process_batch(samples)
    for s in samples:
        assert s.ok, s.meta.get("reject")
        w, h = s.meta["source"]["width"], s.meta["source"]["height"]
        assert 1 <= len(s.meta["instances"]) <= 3
        for inst in s.meta["instances"]:
            x0, y0, x1, y1 = inst["box"]
            assert all(isinstance(c, int) for c in inst["box"])
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            assert inst["category"] in s.meta["targets"]
        scores = [i["score"] for i in s.meta["instances"]]
        assert scores == sorted(scores, reverse=True)
    rec = st.describe()["models"]["detector"]
    assert rec["id"] == str(models[key]) and rec["revision"] == "test-rev" and rec["local_fingerprint"]
    # image preprocessing runs on the model's device (the processor's torchvision backend)
    seen: list = []
    ip = st.detector.processor.image_processor
    orig = ip.preprocess

    def spy(*a, **k):
        seen.append(k.get("device"))
        return orig(*a, **k)

    ip.preprocess = spy
    st.process_batch(fresh(segmented))
    assert seen and set(seen) == {st.detector.device}
    # nothing scores above 1: every sample is rejected with a reason, none raises
    strict = stage("localize", backend, model=str(models[key]), box_threshold=1.0, **CPU)
    samples = fresh(segmented)
    strict.process_batch(samples)
    assert {s.meta["reject"]["reason"] for s in samples} == {"target_not_found"}


def test_uint8_images_on_device_give_the_processors_exact_inputs(models):
    """The fast path (one uint8 copy per equal-sized group, processed where the model runs) feeds
    the model exactly what the processor makes from the numpy images, mixed sizes included."""
    from transformers import AutoProcessor, SamProcessor

    from counterfactory.stages.models.common import images_to_device

    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (96, 96, 3), dtype=np.uint8) for _ in range(3)]
    imgs.insert(1, rng.integers(0, 255, (60, 90, 3), dtype=np.uint8))
    on_dev = images_to_device(imgs, "cpu")
    assert [tuple(t.shape) for t in on_dev] == [(3, *im.shape[:2]) for im in imgs] and on_dev[0].dtype == torch.uint8
    gd = AutoProcessor.from_pretrained(models["gd"])
    a = gd(images=imgs, text=["cat."] * 4, return_tensors="pt", padding=True, device="cpu")
    b = gd(images=on_dev, text=["cat."] * 4, return_tensors="pt", padding=True, device="cpu")
    assert all(torch.equal(a[k], b[k]) for k in a)
    sam = SamProcessor.from_pretrained(models["sam_hf"])
    a, b = sam(images=imgs, return_tensors="pt", device="cpu"), sam(images=on_dev, return_tensors="pt", device="cpu")
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- segment -------------------------------------------------------------------------------
def test_sam_mask_is_the_best_predicted_iou_and_one_embedding_per_image(models, segmented):
    st = stage("segment", "sam", checkpoint=str(models["sam"]), model_type="custom", arch=fx.SAM_ARCH,
               min_box_fill=0.0, clip_to_box_margin=10.0, **CPU)
    calls = []
    st.sam.image_encoder.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    samples = fresh(segmented)
    st.process_batch(samples)
    assert sum(calls) == len(samples)  # one embedding per image, all its boxes reuse it
    for s in samples:
        assert s.ok, s.meta.get("reject")
        img = s.arrays["image"]
        core, mask = s.arrays["mask_core"], s.arrays["mask"]
        assert core.shape == mask.shape == img.shape[:2] and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 255} and ((mask > 0) | ~(core > 0)).all()  # dilated contains core
        assert s.meta["mask"]["area"] == int((mask > 0).sum())
        # predicted IoU: the kept mask is the argmax of SAM's own three candidates
        emb, size = st._encode([img])[0]
        _, _, all_iou = st._decode(emb, size, img, [i["box"] for i in s.meta["instances"]])
        for inst, row in zip(s.meta["instances"], all_iou, strict=True):
            assert inst["mask_iou_pred"] == pytest.approx(float(row.max()), abs=1e-4)
            assert inst["mask_method"] in ("sam", "box")
    assert st.describe()["models"]["sam"]["local_fingerprint"]


def test_sam_hf_segment(models, segmented):
    st = stage("segment", "sam-hf", model=str(models["sam_hf"]), revision="r1", min_box_fill=0.05, batch_size=8, **CPU)
    calls = {"enc": 0, "dec": 0}
    st.model.vision_encoder.register_forward_hook(lambda *a: calls.__setitem__("enc", calls["enc"] + 1))
    st.model.mask_decoder.register_forward_hook(lambda *a: calls.__setitem__("dec", calls["dec"] + 1))
    samples = fresh(segmented)
    assert len(samples) <= st.params.batch_size and any(len(s.meta["instances"]) > 1 for s in samples)
    st.process_batch(samples)
    assert calls == {"enc": 1, "dec": 1}  # one encoder and one decoder call for every box of the batch
    again = fresh(segmented)
    st.process_batch(again)
    assert all(np.array_equal(a.arrays["mask"], b.arrays["mask"]) for a, b in zip(samples, again, strict=True))
    for s in samples:
        assert s.ok, s.meta.get("reject")
        assert s.arrays["mask"].shape == s.arrays["image"].shape[:2]
        assert all("mask_iou_pred" in i for i in s.meta["instances"])
        for inst in s.meta["instances"]:
            x0, y0, x1, y1 = inst["box"]
            assert inst["mask_method"] in ("sam-hf", "box")
            if inst["mask_method"] == "box":  # a near-empty SAM mask falls back to its box
                assert inst["mask_area"] == (x1 - x0) * (y1 - y0)
            else:
                assert inst["mask_area"] >= 0.05 * (x1 - x0) * (y1 - y0)
    assert st.describe()["models"]["sam"]["revision"] == "r1"


# --- edit ------------------------------------------------------------------------------------
def test_diffusers_inpaint_crop_paste_and_seeding(models, segmented):
    params = dict(model=str(models["sd"]), steps=2, guidance_scale=1.0, scheduler="ddim",
                  variants=["remove", "attribute", "blackout", "random_mask"], batch_size=4, **CPU)
    st = stage("edit", "diffusers-inpaint", **params)
    assert st.native == 32  # unet sample size x vae scale factor
    a, b = fresh(segmented), fresh(segmented)
    st.process_batch(a)
    st.process_batch(b)
    for sa, sb in zip(a, b, strict=True):
        assert sa.ok, sa.meta.get("reject")
        img, mask = sa.arrays["image"], sa.arrays["mask"] > 0
        for v in ("remove", "attribute"):
            out = sa.arrays[f"variant/{v}"]
            assert out.shape == img.shape and out.dtype == np.uint8
            assert np.array_equal(out[~mask], img[~mask])  # outside the mask: the original, bit for bit
            assert not np.array_equal(out[mask], img[mask])
            assert np.array_equal(out, sb.arrays[f"variant/{v}"])  # same seed, same pixels
            e = sa.meta["edits"][v]
            assert e["seed"] == (sa.seed + (v == "attribute")) % 2**32 and len(e["crop_box"]) == 4
        e = sa.meta["edits"]["attribute"]
        assert e["new_value"] in st.params.attribute_values and e["new_value"] in e["prompt"]
        assert e["new_value"] != sa.meta["instances"][0]["attributes"].get("color")
    # different samples have different seeds, hence different noise
    assert a[0].meta["edits"]["remove"]["seed"] != a[1].meta["edits"]["remove"]["seed"]
    rec = st.describe()["models"]["inpaint"]
    # replace: the evidence repainted as another kind; answers about both kinds follow the rules
    rep = stage("edit", "diffusers-inpaint", **(params | {"variants": ["replace"]}))
    r_ = fresh(segmented)
    rep.process_batch(r_)
    for s in r_:
        e = s.meta["edits"]["replace"]
        assert e["inserted_category"] in rep.params.insert_categories and e["inserted_category"] in e["prompt"]
        assert e["removed_instances"] == e["inserted_instances"] == len(s.meta["instances"])
        qa = stage("qa", "default")
        qa.process(s)
        by_q = {q["question"]: q["answers"] for q in s.meta["qa"]}
        new = e["inserted_category"]
        assert by_q[f"Is there a {new} in the image?"] == {"orig": "no", "replace": "yes"}
        ex = [a for q, a in by_q.items() if q.startswith("Is there a") and new not in q]
        assert ex and all(a["replace"] == "no" for a in ex)
    # insert: an object no annotation names, painted only inside a region clear of every annotation
    ins = stage("edit", "diffusers-inpaint", **(params | {"variants": ["insert"], "insert_scale": 0.12}))
    c = fresh(segmented)
    ins.process_batch(c)
    made = [s for s in c if "insert" in s.meta["variants"]]
    assert made, [s.meta.get("variant_rejects") for s in c]
    for s in made:
        e, region = s.meta["edits"]["insert"], s.arrays["mask/insert"] > 0
        assert e["inserted_category"] in ins.params.insert_categories and e["affects"] == [e["inserted_category"]]
        assert e["inserted_category"] in e["prompt"]
        out, img = s.arrays["variant/insert"], s.arrays["image"]
        assert np.array_equal(out[~region], img[~region]) and not np.array_equal(out[region], img[region])
        assert not (region & (s.arrays["mask"] > 0)).any()
        for a_ in s.meta.get("annotated", []):
            x0, y0, x1, y1 = a_["box"]
            assert not region[y0:y1, x0:x1].any()
    assert rec["pipeline"] == "StableDiffusionInpaintPipeline" and rec["scheduler"] == "DDIMScheduler"


# --- qa --------------------------------------------------------------------------------------
class FakeOpenAI:
    """A loopback HTTP server speaking /v1/chat/completions that plays a script of replies:
    a string (the message content), ("status", code[, retry_after]), ("refusal", text), ("slow", seconds, text),
    ("truncated", text)."""

    def __init__(self) -> None:
        self.script: list = []
        self.requests: list[dict] = []
        outer = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(body)
                item = outer.script.pop(0) if outer.script else "{}"
                finish, refusal = "stop", None
                if isinstance(item, tuple) and item[0] == "status":
                    self.send_response(item[1])
                    if len(item) > 2:  # ("status", 429, retry_after_seconds)
                        self.send_header("Retry-After", str(item[2]))
                    self.end_headers()
                    self.wfile.write(b"server error")
                    return
                if isinstance(item, tuple) and item[0] == "slow":
                    time.sleep(item[1])
                    item = item[2]
                if isinstance(item, tuple) and item[0] == "refusal":
                    refusal, item = item[1], None
                if isinstance(item, tuple) and item[0] == "truncated":
                    finish, item = "length", item[1]
                msg = {"role": "assistant", "content": item, "refusal": refusal}
                data = json.dumps({"choices": [{"index": 0, "message": msg, "finish_reason": finish}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture()
def fake_llm():
    srv = FakeOpenAI()
    yield srv
    srv.close()


def _one(segmented, kinds=("count", "existence", "color", "position")) -> Sample:
    s = next(x for x in segmented if x.meta["question"]["kind"] in kinds)
    return fresh([s])[0]


def _valid_reply(s: Sample) -> str:
    n = len(s.meta["instances"])
    cat = s.meta["targets"][0]
    return json.dumps({"questions": [
        {"question": f"How many {cat}s can you count?", "kind": "count", "answer": str(n)},
        {"question": f"Is any {cat} visible?", "kind": "existence", "answer": "yes"},
        {"question": f"What shape is the {cat}?", "kind": "other", "answer": cat}]})


def test_openai_llm_validates_reasks_and_answers_by_rule(fake_llm, segmented, monkeypatch):
    monkeypatch.setenv("TEST_LLM_KEY", "sk-test")
    s = _one(segmented, ("color", "position"))  # primary kind differs from the LLM kinds
    bad_count = json.dumps({"questions": [{"question": "How many are there?", "kind": "count", "answer": "99"}]})
    fake_llm.script = ["not json at all", bad_count, ("truncated", '{"questions": [{"quest'), _valid_reply(s)]
    st = stage("qa", "llm-openai", model="tiny", base_url=fake_llm.url, api_key_env="TEST_LLM_KEY",
               max_reasks=3, backoff_s=0.0)
    st.process_batch([s])
    assert s.ok, s.meta.get("reject")
    gen = s.meta["qa_generation"]
    assert gen["source"] == "llm" and gen["attempts"] == 4 and len(gen["errors"]) == 3
    assert "99" in gen["errors"][1]  # the count contradicting the instances was caught
    # the re-ask carried the previous reply and the error
    assert fake_llm.requests[1]["messages"][-1]["content"].startswith("Invalid:")
    assert fake_llm.requests[0]["response_format"] == {"type": "json_object"}
    qa = s.meta["qa"]
    assert qa[0]["source"] == "input"
    llm_items = [q for q in qa if q["source"] == "llm"]
    assert {q["kind"] for q in llm_items} == {"count", "existence", "other"}
    n = len(s.meta["instances"])
    for q in llm_items:  # answers per variant come from the rule table
        if q["kind"] == "count":
            assert q["answers"]["orig"] == str(n) and q["answers"]["remove"] == "0"
        if q["kind"] == "existence":
            assert q["answers"]["remove"] == "no" and q["answers"]["orig"] == "yes"
    assert "sk-test" not in json.dumps(st.describe())


def test_llm_reads_target_phrases_cached_with_rules_fallback(models, fake_llm, segmented):
    from counterfactory.stages.models.grounding import parse_phrases

    assert parse_phrases('{"phrases": ["Red  Circle", "box"]}') == ["red circle", "box"]
    assert parse_phrases('["a very long phrase of many words"]') is None and parse_phrases("no") is None
    st = stage("localize", "grounding-dino", model=str(models["gd"]), box_threshold=0.0, text_threshold=0.0,
               phrases_llm={"backend": "llm-openai",
                            "params": {"model": "tiny", "base_url": fake_llm.url, "backoff_s": 0.0}}, **CPU)
    samples = fresh(segmented)[:3]
    for s in samples:
        s.meta["question"].pop("targets", None)
        s.meta["question"]["question"] = "Is there a circle near the corner?"
    s4 = fresh(segmented)[3]
    s4.meta["question"].pop("targets", None)
    s4.meta["question"]["question"] = "How many squares are there?"
    fake_llm.script = ['{"phrases": ["circle"]}', "I think it is a circle"]  # one valid, one not JSON
    st.process_batch([*samples, s4])
    assert len(fake_llm.requests) == 2  # one call per distinct question, not per sample
    sources = {s.meta["question"]["question"]: s.meta["target_source"] for s in [*samples, s4]}
    replies_in_order = [r["messages"][-1]["content"] for r in fake_llm.requests]
    first, second = replies_in_order
    assert sources[first] == "llm" and sources[second] == "rules-fallback"
    # cached: asking again costs no call
    again = fresh(segmented)[:1]
    again[0].meta["question"].pop("targets", None)
    again[0].meta["question"]["question"] = first
    st.process_batch(again)
    assert len(fake_llm.requests) == 2 and again[0].meta["target_source"] == "llm"
    assert "phrases" in st.describe()["models"]


def test_openai_llm_http_errors_refusal_empty_and_fallback(fake_llm, segmented):
    base = dict(model="tiny", base_url=fake_llm.url, backoff_s=0.01, backoff_max_s=0.02, timeout_s=0.5)
    # 500, a slow reply past the timeout, then success: retried with backoff
    s = _one(segmented)
    fake_llm.script = [("status", 500), ("slow", 1.0, "late"), _valid_reply(s)]
    st = stage("qa", "llm-openai", max_http_retries=3, **base)
    st.process_batch([s])
    assert s.ok and s.meta["qa_generation"]["source"] == "llm"
    # retries are capped: the sample is rejected with the reason, the run goes on
    s = _one(segmented)
    fake_llm.script = [("status", 503)] * 3
    stage("qa", "llm-openai", max_http_retries=2, **base).process_batch([s])
    assert s.meta["reject"]["reason"] == "llm_unavailable"
    s = _one(segmented)
    fake_llm.script = [("refusal", "I can't help with that.")]
    stage("qa", "llm-openai", **base).process_batch([s])
    assert s.meta["reject"]["reason"] == "llm_refusal"
    s = _one(segmented)
    fake_llm.script = ["I'm sorry, but I cannot do that."]
    stage("qa", "llm-openai", **base).process_batch([s])
    assert s.meta["reject"]["reason"] == "llm_refusal"
    s = _one(segmented)
    fake_llm.script = ["   "]
    stage("qa", "llm-openai", **base).process_batch([s])
    assert s.meta["reject"]["reason"] == "llm_empty_output"
    # invalid every time: templates are used and that is recorded
    s = _one(segmented)
    fake_llm.script = ['{"questions": []}', '{"questions": [{"question": "Was the box removed?", "kind": "other", "answer": "yes"}]}']
    stage("qa", "llm-openai", max_reasks=1, **base).process_batch([s])
    assert s.ok
    gen = s.meta["qa_generation"]
    assert gen["source"] == "template-fallback" and gen["attempts"] == 2 and "mentions the edit" in gen["errors"][1]
    assert {q["source"] for q in s.meta["qa"]} <= {"input", "template"}


def test_transformers_llm_batched_generation_falls_back_on_invalid_output(models, segmented):
    st = stage("qa", "llm-transformers", model=str(models["llm"]), max_new_tokens=16, max_reasks=1,
               batch_size=2, **CPU)
    samples = fresh(segmented)
    st.process_batch(samples)
    for s in samples:
        assert s.ok, s.meta.get("reject")
        gen = s.meta["qa_generation"]
        # random weights write no valid JSON: asked, re-asked once, then templates
        assert gen["source"] == "template-fallback" and gen["attempts"] == 2 and len(gen["errors"]) == 2
        assert s.meta["qa"][0]["source"] == "input"
    rec = st.describe()["models"]["llm"]
    assert rec["architecture"] == "LlamaForCausalLM" and rec["stop"] == "json-end" and rec["kv_cache"] == "dynamic"


def test_llm_generation_stops_each_row_where_its_json_closes(models):
    from transformers import AutoTokenizer

    from counterfactory.stages.models.llm import JsonEnd

    tok = AutoTokenizer.from_pretrained(models["llm"])
    replies = ['{"questions": [{"question": "Is the } there?", "kind": "count", "answer": "3"}]} and then more',
               'Sure: {"a": "x\\"}"} tail', "no json here at all"]
    ids = [tok(r, add_special_tokens=False)["input_ids"] for r in replies]
    n = max(len(x) for x in ids)
    prompt = [[5, 6]] * 3
    crit = JsonEnd(tok, prompt_len=2)
    stopped_at: dict[int, str] = {}
    for step in range(1, n + 1):  # generation appends one token per row per step
        rows = [p + (x + [tok.pad_token_id] * n)[:step] for p, x in zip(prompt, ids, strict=True)]
        done = crit(torch.tensor(rows)).tolist()
        for i, d in enumerate(done):
            if d and i not in stopped_at:
                stopped_at[i] = tok.decode(ids[i][:step])
    assert stopped_at[0].endswith("]}") and "and then" not in stopped_at[0]
    assert stopped_at[1].rstrip().endswith('"}') and "tail" not in stopped_at[1]
    assert 2 not in stopped_at  # no JSON: runs to max_new_tokens / EOS as before


def unet_rows(st) -> list[int]:
    """Batch rows of every UNet call of a stage (a forward hook on the real module)."""
    rows: list[int] = []
    st.pipe.unet.register_forward_pre_hook(lambda mod, args, kw: rows.append(int((args[0] if args else kw["sample"]).shape[0])),
                                           with_kwargs=True)
    return rows


@pytest.mark.parametrize("scheduler,cls,spacing", [("lcm", "LCMScheduler", None), ("tcd", "TCDScheduler", None),
                                                   ("lightning", "EulerDiscreteScheduler", "trailing"),
                                                   ("dpmpp_trailing", "DPMSolverMultistepScheduler", "trailing")])
def test_few_step_schedulers_without_cfg_run_one_unet_pass_per_step(models, segmented, scheduler, cls, spacing):
    samples = fresh(segmented)[:2]
    st = stage("edit", "diffusers-inpaint", model=str(models["sd"]), steps=4, scheduler=scheduler, guidance_scale=1.0,
               variants=["remove"], batch_size=4, **CPU)
    rows = unet_rows(st)
    st.process_batch(samples)
    assert all(s.ok and "remove" in s.meta["variants"] for s in samples)
    assert rows == [2] * 4  # 4 steps, one pass of the 2 crops each: no unconditional branch
    rec = st.describe()["models"]["inpaint"]
    assert rec["scheduler"] == cls and rec["guidance"] == "none"
    assert spacing is None or rec["timestep_spacing"] == spacing
    again = fresh(segmented)[:2]
    st.process_batch(again)  # same seeds, same bytes (and the cached prompt embedding reused)
    assert all(np.array_equal(a.arrays["variant/remove"], b.arrays["variant/remove"]) for a, b in zip(samples, again, strict=True))
    # with guidance the UNet sees the conditional and the unconditional half: 2 passes per step
    cfg = stage("edit", "diffusers-inpaint", model=str(models["sd"]), steps=4, scheduler=scheduler, guidance_scale=3.0,
                variants=["remove"], batch_size=4, **CPU)
    rows = unet_rows(cfg)
    cfg.process_batch(fresh(segmented)[:2])
    assert rows == [4] * 4 and cfg.describe()["models"]["inpaint"]["guidance"] == "cfg"


def test_unknown_scheduler_and_bad_lora_are_one_line_config_errors(models, tmp_path):
    from counterfactory.pipeline.config import ConfigError

    def cfg_with(**params):
        data = copy.deepcopy(demo_dict())
        st = {s["name"]: s for s in data["stages"]}
        st["edit"].update(backend="diffusers-inpaint", params={"model": str(models["sd"]), **params})
        return validate_config(data, source="t.yaml", base_dir=tmp_path)

    with pytest.raises(ConfigError) as e:
        cfg_with(scheduler="turbo_magic")
    assert "stages.edit.params.scheduler" in str(e.value) and "\n" not in str(e.value)
    empty = tmp_path / "lora-empty"
    empty.mkdir()
    (empty / "README.md").write_text("no weights")
    with pytest.raises(ConfigError, match="no .safetensors file"):
        cfg_with(loras=[{"id": str(empty)}])
    pick = tmp_path / "lora-pickle"
    pick.mkdir()
    (pick / "pytorch_lora_weights.bin").write_bytes(b"x")
    with pytest.raises(ConfigError, match="pickle"):
        cfg_with(loras=[{"id": str(pick)}])
    with pytest.raises(ConfigError, match="no such model folder"):
        cfg_with(loras=[{"id": str(tmp_path / "nowhere" / "lora")}])
    with pytest.raises(ConfigError, match="vae_path"):
        cfg_with(vae="tiny")


def test_lora_from_a_local_folder_is_fused_and_recorded(models, segmented, tmp_path):
    lora = fx.sd_lora(tmp_path / "lora", models["sd"])
    base = stage("edit", "diffusers-inpaint", model=str(models["sd"]), steps=2, guidance_scale=1.0,
                 variants=["remove"], **CPU)
    with_lora = stage("edit", "diffusers-inpaint", model=str(models["sd"]), steps=2, guidance_scale=1.0,
                      variants=["remove"], loras=[{"id": str(lora), "scale": 0.8}], **CPU)
    a, b = fresh(segmented)[:1], fresh(segmented)[:1]
    base.process_batch(a)
    with_lora.process_batch(b)
    assert not np.array_equal(a[0].arrays["variant/remove"], b[0].arrays["variant/remove"])
    rec = with_lora.describe()["models"]["inpaint"]["loras"][0]
    assert rec["id"] == str(lora) and rec["scale"] == 0.8 and rec["local_fingerprint"] and rec["modules"] == ["unet"]
    # fused: the UNet holds plain layers again (no adapter matmul per step)
    assert not any("lora" in n for n, _ in with_lora.pipe.unet.named_parameters())
    # a LoRA made for another base model (other cross-attention width) does not load: one line
    other = fx.sd_lora(tmp_path / "other", models["sd"], cross_attention_dim=24)
    with pytest.raises(ValueError, match="another base model") as e:
        stage("edit", "diffusers-inpaint", model=str(models["sd"]), loras=[{"id": str(other)}], **CPU)
    assert "\n" not in str(e.value)


def test_tiny_vae_and_compile_flag_on_cpu(models, segmented, tmp_path, monkeypatch):
    vae = fx.tiny_vae(tmp_path / "taesd")
    with pytest.warns(UserWarning, match="compile: true ignored"):
        st = stage("edit", "diffusers-inpaint", model=str(models["sd"]), steps=2, guidance_scale=1.0,
                   variants=["remove"], vae="tiny", vae_path=str(vae), compile=True, **CPU)
    samples = fresh(segmented)[:2]
    st.process_batch(samples)
    assert all(s.ok and "remove" in s.meta["variants"] for s in samples)
    rec = st.describe()["models"]["inpaint"]
    assert rec["vae"]["architecture"] == "AutoencoderTiny" and rec["compiled"] is False
    assert type(st.pipe.vae).__name__ == "AutoencoderTiny"
    # compile on a torch without a usable torch.compile: refused when the params are read
    monkeypatch.setattr(torch, "__version__", "1.13.1")
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="compile: true needs torch>=2.1"):
        get_backend("edit", "diffusers-inpaint").Params(model=str(models["sd"]), compile=True)


# --- verify ------------------------------------------------------------------------------------
def test_redetect_runs_on_the_edited_image(models, segmented):
    samples = fresh(segmented)
    # pixel checks off for this test: what is measured is the re-detection
    loose = dict(min_inside_mad=0.0, max_contrast_ratio=100.0)
    st = stage("verify", "redetect", model=str(models["owl"]), detector="owlv2", redetect_threshold=0.0,
               min_overlap=0.0, text_threshold=0.0, **loose, **CPU)
    seen = []
    st.detector.model.register_forward_pre_hook(
        lambda mod, args, kw: seen.append(kw["pixel_values"].clone()), with_kwargs=True)
    st.process_batch(samples)
    for s in samples:  # threshold 0: a target box always "remains", so remove is rejected
        assert "remove" not in s.meta["variants"]
        vr = [r for r in s.meta["variant_rejects"] if r["variant"] == "remove"]
        assert vr and vr[0]["reason"] == "target_still_detected"
        assert "redetect_score" in s.meta["metrics"]["remove"] and "redetect_score_orig" in s.meta["metrics"]
    # what the detector saw: the original (for the metric) and the edited remove variant
    proc = st.detector.processor
    s0 = fresh(segmented)[0]
    want_edit = proc(images=[s0.arrays["variant/remove"]], text=[["x"]], return_tensors="pt")["pixel_values"]
    batch = torch.cat(seen)
    assert any(torch.allclose(row, want_edit[0]) for row in batch)
    keep = stage("verify", "redetect", model=str(models["owl"]), detector="owlv2", redetect_threshold=1.0,
                 invented_threshold=None, **loose, **CPU)  # object_invented: tests/test_removers.py
    samples = fresh(segmented)
    keep.process_batch(samples)
    assert all(s.ok and "remove" in s.meta["variants"] for s in samples)
    assert all(0 <= s.meta["metrics"]["remove"]["redetect_score"] < 1 for s in samples)


def test_redetect_reuses_the_detection_of_the_original_from_localize(models, segmented):
    loc = stage("localize", "owlv2", model=str(models["owl"]), box_threshold=0.0, text_threshold=0.0, max_instances=3,
                **CPU)
    samples = fresh(segmented)
    loc.process_batch(samples)  # the original detected once, its instances carry the detector's scores
    assert all(s.ok and all("score" in i for i in s.meta["instances"]) for s in samples)
    st = stage("verify", "redetect", model=str(models["owl"]), detector="owlv2", redetect_threshold=1.0,
               min_overlap=0.0, text_threshold=0.0, min_inside_mad=0.0, max_contrast_ratio=100.0,
               invented_threshold=None, **CPU)
    rows: list[int] = []
    st.detector.model.register_forward_pre_hook(lambda mod, args, kw: rows.append(kw["pixel_values"].shape[0]),
                                                with_kwargs=True)
    edited = sum("remove" in s.meta["variants"] for s in samples)  # the pixel checks are off: all go on
    st.process_batch(samples)
    assert edited >= 1 and sum(rows) == edited  # the edited images only (never the original), batched together
    for s in (s for s in samples if s.ok):
        m = s.meta["metrics"]
        assert m["redetect_orig_source"] == "localize"
        best = max(i["score"] for i in s.meta["instances"])  # min_overlap 0: every target box counts
        assert m["redetect_score_orig"] == round(best, 4)


# --- end to end -----------------------------------------------------------------------------
def test_pipeline_end_to_end_with_model_backends(models, tmp_path):
    data = copy.deepcopy(demo_dict())
    data["inputs"] = [scenes_input(2, seed=1, questions=1)]
    data["output"]["root"] = str(tmp_path / "out")
    data["output"]["shard_size"] = 2
    st = {s["name"]: s for s in data["stages"]}
    st["segment"].update(backend="sam", params={"checkpoint": str(models["sam"]), "model_type": "custom",
                                                "arch": fx.SAM_ARCH, "device": "cpu"})
    st["edit"].update(backend="diffusers-inpaint", params={"model": str(models["sd"]), "steps": 2, "guidance_scale": 1.0,
                                                           "device": "cpu", "variants": ["remove", "blackout"]})
    st["verify"].update(backend="redetect", params={"model": str(models["gd"]), "detector": "grounding-dino",
                                                    "redetect_threshold": 1.0, "min_inside_mad": 0.0,
                                                    "invented_threshold": None,
                                                    "max_contrast_ratio": 100.0, "device": "cpu"})
    cfg = validate_config(data, source="test", base_dir=tmp_path)
    res = run_pipeline(cfg, local=True, progress=False)
    tars = sorted(res.out_dir.glob("*.tar"))
    assert tars and res.manifest["counts"]["samples"] >= 1
    import tarfile

    names = [m.name for t in tars for m in tarfile.open(t).getmembers()]
    assert any(n.endswith(".remove.jpg") for n in names) and any(n.endswith(".mask.png") for n in names)
    meta = [json.loads(tarfile.open(t).extractfile(m).read()) for t in tars for m in tarfile.open(t).getmembers()
            if m.name.endswith(".json")]
    prov = meta[0]["provenance"]["stages"]
    assert prov["edit"]["models"]["inpaint"]["id"] == str(models["sd"])
    assert prov["segment"]["models"]["sam"]["architecture"].startswith("segment_anything.Sam")
    assert "redetect_score" in meta[0]["metrics"]["remove"]


def test_gpu_config_validates():
    from counterfactory.pipeline.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "gpu.yaml")
    backends = {s.name: s.backend for s in cfg.stages}
    assert backends["localize"] == "grounding-dino" and backends["segment"] == "sam-hf"
    assert any(s.resources.num_gpus > 0 for s in cfg.stages)


def test_model_record_names_the_cached_commit_of_a_branch(tmp_path, monkeypatch):
    """A Hub id loaded at a branch (`main` moves) is recorded with the commit the local Hub
    cache resolved it to; a local folder is fingerprinted instead."""
    from huggingface_hub import constants

    from counterfactory.stages.models.common import model_record

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    rec = model_record("org/tiny", "main")
    assert rec["revision"] == "main" and rec["commit"] == commit
    assert "commit" not in model_record("org/absent", "main")
    assert "commit" not in model_record(str(repo / "snapshots" / commit), None)


def test_a_stage_that_cannot_start_is_one_line_naming_it(tmp_path):
    """Where a worker builds the stages, a missing model folder becomes one line naming the
    stage; the CLI finds that line however Ray wrapped the error."""
    from counterfactory.cli import _stage_start_error
    from counterfactory.pipeline.chain import StageChain, StageSpec
    from counterfactory.sample import StageStartError
    from counterfactory.stages import get_backend

    spec = {"name": "localize", "backend": "owlv2", "params": {"model": str(tmp_path / "absent"), **CPU}}
    with pytest.raises(StageStartError) as info:
        params = get_backend("localize", "owlv2").Params.model_validate(spec["params"])
        StageChain([StageSpec("localize", "owlv2", params)], RunSettings())
    line = str(info.value)
    assert line == f"stage localize (owlv2) could not start: FileNotFoundError: {tmp_path / 'absent'}: " \
                   "no such model folder on this node (a hub id reads 'org/name')"
    wrapped = RuntimeError(f"The actor died in its creation task:\nTraceback ...\n"
                           f"counterfactory.sample.StageStartError: {line}\n")
    assert _stage_start_error(wrapped) == line
    assert _stage_start_error(RuntimeError("x")) is None


def test_openai_llm_waits_as_the_server_asks_with_jitter(fake_llm, segmented, monkeypatch):
    """A 429 with Retry-After is retried after that many seconds (capped, jittered to at least
    half), not after the exponential backoff."""
    import counterfactory.stages.models.llm as llm_mod

    slept: list[float] = []
    monkeypatch.setattr(llm_mod.time, "sleep", slept.append)
    s = _one(segmented)
    fake_llm.script = [("status", 429, 4), ("status", 503), _valid_reply(s)]
    st = stage("qa", "llm-openai", model="tiny", base_url=fake_llm.url, backoff_s=0.25, backoff_max_s=3.0)
    st.process_batch([s])
    assert s.ok and s.meta["qa_generation"]["source"] == "llm", s.meta.get("reject")
    assert len(slept) == 2
    assert 1.5 <= slept[0] <= 3.0  # Retry-After 4 s, capped at 3, jittered
    assert 0.25 <= slept[1] <= 0.5  # then backoff_s * 2 for the second retry, jittered


# --- the local run with host and device work overlapped ---------------------------------------
def test_overlapped_local_run_yields_the_loops_bytes_in_order(tmp_path):
    cfg = make_config(tmp_path, [scenes_input(10, seed=3, questions=1)])
    plain = list(local_batches(cfg, load_records(cfg), batch_size=3))
    threads_before = threading.active_count()
    over = list(local_batches(cfg, load_records(cfg), batch_size=3, overlap=True))
    assert len(plain) == len(over) == 4
    for a, b in zip(plain, over, strict=True):
        assert list(a["idx"]) == list(b["idx"])

        def untimed(m):
            return {k: v for k, v in json.loads(m).items() if k != "seconds"}  # wall-clock timings differ
        assert [untimed(m) for m in a["meta"]] == [untimed(m) for m in b["meta"]]
        assert [bytes(x) for x in a["blob"]] == [bytes(x) for x in b["blob"]]
    assert threading.active_count() == threads_before  # every step thread ended


def test_overlap_raises_a_step_error_in_the_consumer_and_stops_the_threads():
    from counterfactory.pipeline.overlap import staged

    def boom(x):
        if x == 5:
            raise ValueError("bad item 5")
        return x * 2

    before = threading.active_count()
    got = []
    with pytest.raises(ValueError, match="bad item 5"):
        for y in staged(iter(range(100)), [lambda x: x + 1, boom]):
            got.append(y)
    assert got == [2, 4, 6, 8]  # in order, up to the failing item
    time.sleep(0.3)
    assert threading.active_count() == before
