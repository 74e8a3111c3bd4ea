"""verify: vlm-judge. A tiny real Qwen2.5-VL (built from config, saved, loaded from its folder)
run end to end in the stage; a loopback OpenAI-compatible server with replies computed from each
request for the voting, the agreement rules and every bad reply. No downloads, CPU only.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pytest
import torch

from counterfactory.pipeline.runner import local_batches
from counterfactory.rules import EDIT_COLORS
from counterfactory.sample import Sample, decode_batch, encode_batch
from counterfactory.stages import get_backend
from counterfactory.stages.models.judge import data_url, fit_image, majority, normalize, read_reply
from tests import models_fixtures as fx
from tests import models_fixtures_new as fxn
from tests.conftest import load_records, make_config, scenes_input

CPU = {"device": "cpu"}


@pytest.fixture(scope="module")
def vlms(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("vlm")
    return {"yes": fxn.tiny_vlm(d / "yes", says="yes"), "no": fxn.tiny_vlm(d / "no", says="no"),
            "llm": fx.tiny_llm(d / "llm")}


@pytest.fixture(scope="module")
def qa_samples(tmp_path_factory) -> list[Sample]:
    """Procedural scenes through the default stages up to qa: each variant has its questions."""
    cfg = make_config(tmp_path_factory.mktemp("qa"), [scenes_input(3, seed=5, questions=1)])
    out: list[Sample] = []
    for b in local_batches(cfg, load_records(cfg), stop_after="qa"):
        out.extend(decode_batch(b))
    assert all(s.ok for s in out)
    return out


def fresh(samples: list[Sample]) -> list[Sample]:
    return decode_batch(encode_batch(samples))


def judge(**params):
    return get_backend("verify", "vlm-judge")(params=params, run={"seed": 0, "abstain_answer": "unknown"})


def rejects(s: Sample, v: str) -> list[str]:
    return [r["reason"] for r in s.meta.get("variant_rejects", []) if r["variant"] == v]


# --- reading replies -------------------------------------------------------------------------
def test_replies_are_read_into_the_kind_answer_space():
    assert normalize("existence", "Yes, there is one.") == "yes"
    assert normalize("existence", "There is no cat") == "no"
    assert normalize("existence", "I know") is None  # "know" is not "no"
    assert normalize("count", "There are three cats") == "3" and normalize("count", "2") == "2"
    assert normalize("count", "none") == "0" and normalize("count", "blue") is None
    assert normalize("color", "It looks Grey.") == "gray" and normalize("color", "a cat") is None
    assert normalize("position", "On the left side") == "left"
    assert read_reply("existence", "") == (None, "empty")
    assert read_reply("existence", "I'm sorry, I can't help with that.") == (None, "refusal")
    assert read_reply("count", 5) == (None, "wrong_type")  # a number where text was due
    assert read_reply("count", "purple") == (None, "wrong_type")
    assert majority(["no", "no", "yes"]) == "no" and majority(["no", "yes"]) is None and majority([]) is None


def test_params_are_checked_up_front(vlms):
    with pytest.raises(ValueError, match="only 3 paraphrases"):
        judge(model=str(vlms["yes"]), votes=5, **CPU)
    with pytest.raises(ValueError, match="temperature > 0"):
        judge(model=str(vlms["yes"]), votes=3, vote_mode="samples", temperature=0.0, **CPU)
    with pytest.raises(ValueError, match="needs base_url"):
        judge(model="m", engine="openai", base_url=None)
    # a folder of another architecture (a text-only Llama) is refused in one line, before loading
    with pytest.raises(ValueError, match=r"a 'llama' model, but the vlm-judge backend loads an image-text-to-text") as e:
        judge(model=str(vlms["llm"]), **CPU)
    assert "\n" not in str(e.value)


# --- in-actor transformers ---------------------------------------------------------------------
def test_transformers_judge_rejects_a_removal_it_still_sees(vlms, qa_samples):
    """A judge that sees the object everywhere (answers "yes" to every prompt): the removal is
    rejected with its answers; a count question it cannot answer on the original is a bad question."""
    st = judge(model=str(vlms["yes"]), batch_size=4, **CPU)
    seen: list[torch.Tensor] = []
    st.model.model.visual.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    samples = fresh(qa_samples)
    st.process_batch(samples)
    for s in samples:
        assert s.ok, s.meta.get("reject")
        assert "remove" not in s.meta["variants"] and rejects(s, "remove") == ["judge_disagrees"]
        rows = s.meta["metrics"]["remove"]["judge_answers"]
        ex = next(r for r in rows if r["kind"] == "existence" and r["expected"] == "no" and r["answer"] == "yes")
        assert ex["agree"] is False and ex["agreement"] == 0.0 and ex["replies"] == ["yes"]
        judged = s.meta["metrics"]["judge"]
        assert judged["questions_per_pair"] >= 2 and judged["votes"] == 1
        bad = {b["kind"]: b for b in judged["bad_questions"]}
        assert bad["count"]["reason"] == "judge_wrong_on_original" and bad["count"]["status"] == "wrong_type"
        assert all(b["reason"] == "judge_wrong_on_original" for b in judged["bad_questions"])
        # variants whose existence answer stays "yes" are kept, their agreement recorded
        for v in ("attribute", "flip", "count", "random_mask"):
            if v in s.meta["variants"]:
                assert s.meta["metrics"][v]["judge_agreement"] == 1.0, (v, s.meta["metrics"][v])
    # the model saw the edited image and the original, at the judge's resolution
    s0 = fresh(qa_samples)[0]
    got = torch.cat(seen)
    for arr in (s0.arrays["image"], s0.arrays["variant/remove"]):
        want = st.processor.image_processor(images=[fit_image(arr, 448)], return_tensors="pt")["pixel_values"]
        n = len(want)
        assert any(torch.allclose(got[i:i + n], want) for i in range(0, len(got) - n + 1, 4))
    # deterministic: a rerun decides and records the same
    again = fresh(qa_samples)
    judge(model=str(vlms["yes"]), batch_size=3, **CPU).process_batch(again)
    assert [s.meta["metrics"] for s in again] == [s.meta["metrics"] for s in samples]


def test_a_question_the_judge_gets_wrong_on_the_original_is_not_a_bad_edit(vlms, qa_samples):
    samples = fresh(qa_samples[:1])
    judge(model=str(vlms["no"]), variants=["remove"], **CPU).process_batch(samples)
    s = samples[0]
    judged = s.meta["metrics"]["judge"]
    # "no" to "is there a circle?" on the original: the question is flagged, not the edit
    flagged = [b for b in judged["bad_questions"] if b["kind"] == "existence" and b["expected"] == "yes"]
    assert flagged and flagged[0]["answer"] == "no" and flagged[0]["reason"] == "judge_wrong_on_original"
    assert all(r["question"] != flagged[0]["question"] for r in s.meta["metrics"]["remove"]["judge_answers"])
    # what is left is answered right ("no" to "is there a star?") and the removal is not blamed
    assert "judge_disagrees" not in rejects(s, "remove")


# --- OpenAI-compatible endpoint ----------------------------------------------------------------
def _answers_by_image(samples: list[Sample]) -> dict[str, tuple[Sample, str]]:
    out = {}
    for s in samples:
        for key in ["orig", *s.meta["variants"]]:
            arr = s.arrays["image" if key == "orig" else f"variant/{key}"]
            out[data_url(fit_image(arr, 448))] = (s, key)
    return out


def _rule_answer(samples: list[Sample], body: dict) -> tuple[str, str, dict]:
    text, url = fxn.question_of(body)
    s, key = _answers_by_image(samples)[url]
    q = next(q for q in s.meta["qa"] if q["question"] in text)
    return key, text, q


@pytest.fixture()
def server():
    servers = []

    def start(respond):
        srv = fxn.ScriptedOpenAI(respond)
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.close()


def test_openai_judge_votes_over_paraphrases_and_checks_each_variant(server, qa_samples):
    samples = fresh(qa_samples[:2])
    lookup = _answers_by_image(samples)
    inflight, peak, lock = [0], [0], threading.Lock()

    def respond(body):
        with lock:
            inflight[0] += 1
            peak[0] = max(peak[0], inflight[0])
        time.sleep(0.01)
        key, text, q = _rule_answer(samples, body)
        with lock:
            inflight[0] -= 1
        ans = q["answers"][key]
        if key == "remove" and q["kind"] == "existence" and text.startswith("Look"):
            return "Yes."  # one paraphrase of three disagrees: outvoted
        if key == "attribute" and q["kind"] == "color":
            return "It is orange"  # the recolor did not take: every paraphrase says so
        if q["kind"] == "count":
            return f"There are {['zero', 'one', 'two', 'three', 'four'][int(ans)]}."
        return ans.capitalize() + "."

    srv = server(respond)
    st = judge(model="judge-vl", engine="openai", base_url=srv.url, votes=3, concurrency=3, answer_tokens=3)
    st.process_batch(samples)
    assert peak[0] <= 3  # bounded concurrency
    body = srv.requests[0]
    assert body["max_tokens"] == 3 and body["temperature"] == 0.0 and body["model"] == "judge-vl"
    assert fxn.question_of(body)[1].startswith("data:image/jpeg;base64,")
    assert {fxn.question_of(b)[1] for b in srv.requests} <= set(lookup)
    for s in samples:
        assert s.ok and "remove" in s.meta["variants"]
        rm = s.meta["metrics"]["remove"]
        ex = next(r for r in rm["judge_answers"] if r["kind"] == "existence" and r["expected"] == "no")
        assert ex["answer"] == "no" and ex["agree"] and ex["agreement"] == pytest.approx(0.6667)
        assert sorted(ex["replies"]) == ["no", "no", "yes"]
        assert rm["judge_agreement"] == 1.0 and rm["judge_questions"] >= 1
        assert s.meta["metrics"]["judge"]["orig_agreement"] == 1.0 and not s.meta["metrics"]["judge"]["bad_questions"]
        # every question asked of the original, three times (one per paraphrase)
        orig_asks = [b for b in srv.requests if lookup[fxn.question_of(b)[1]] == (s, "orig")]
        assert len(orig_asks) == 3 * s.meta["metrics"]["judge"]["questions_per_pair"]
    s = samples[0]  # the one with an attribute variant
    assert rejects(s, "attribute") == ["judge_disagrees"]
    detail = next(r["detail"] for r in s.meta["variant_rejects"] if r["variant"] == "attribute")
    rule = re.search(r"rule '(\w+)'", detail)  # the recolor's new color, which the judge did not see
    assert "judge 'orange'" in detail and rule and rule.group(1) in EDIT_COLORS and rule.group(1) != "orange"
    assert s.meta["metrics"]["attribute"]["judge_agreement"] < 1.0


def test_openai_judge_votes_over_samples_with_one_seed_each(server, qa_samples):
    samples = fresh(qa_samples[:1])

    def respond(body):
        key, _, q = _rule_answer(samples, body)
        return q["answers"][key] if body["seed"] % 4 else "maybe"  # an unreadable reply now and then

    srv = server(respond)
    judge(model="m", engine="openai", base_url=srv.url, votes=5, vote_mode="samples", temperature=0.8,
          variants=["remove"]).process_batch(samples)
    per_q: dict[tuple, set] = {}
    for b in srv.requests:
        assert b["temperature"] == 0.8
        per_q.setdefault(fxn.question_of(b), set()).add(b["seed"])
    assert all(len(seeds) == 5 for seeds in per_q.values())  # five different samples per question
    assert samples[0].ok and "remove" in samples[0].meta["variants"]


@pytest.mark.parametrize("bad, reason, shown", [
    ("", "judge_no_answer", "<empty>"),
    (("refusal", "I cannot judge images."), "judge_no_answer", "<refusal>"),
    ("I'm sorry, but I can't help with that.", "judge_no_answer", "<refusal>"),
    (7, "judge_no_answer", "<wrong_type>"),
    ({"answer": "no"}, "judge_no_answer", "<wrong_type>"),
    ("banana", "judge_no_answer", "<wrong_type>"),
    (("status", 500), "judge_unavailable", "llm_unavailable"),
    (("status", 400), "judge_unavailable", "llm_http_error"),
    (("slow", 1.5, "no"), "judge_unavailable", "llm_unavailable"),
])
def test_openai_judge_every_bad_reply_is_a_reject_with_a_reason(server, qa_samples, bad, reason, shown):
    samples = fresh(qa_samples[:1])

    def respond(body):
        key, _, q = _rule_answer(samples, body)
        return bad if key == "remove" else q["answers"][key]

    srv = server(respond)
    t0 = time.monotonic()
    judge(model="m", engine="openai", base_url=srv.url, variants=["remove", "flip"], timeout_s=0.3,
          max_http_retries=1, backoff_s=0.01).process_batch(samples)
    assert time.monotonic() - t0 < 20  # bounded: timeouts and retries end, never a hang
    s = samples[0]
    assert rejects(s, "remove") == [reason]
    assert shown in next(r["detail"] for r in s.meta["variant_rejects"] if r["variant"] == "remove")
    assert s.ok and "flip" in s.meta["variants"]  # the other variant, answered well, is kept


def test_a_judge_that_never_answers_rejects_and_a_429_is_waited_for(server, qa_samples):
    samples = fresh(qa_samples[:1])
    srv = server(lambda body: ("slow", 2.0, "yes"))
    t0 = time.monotonic()
    judge(model="m", engine="openai", base_url=srv.url, timeout_s=0.2, max_http_retries=0,
          concurrency=16).process_batch(samples)
    assert time.monotonic() - t0 < 10
    s = samples[0]  # every judged variant is rejected; only blackout (not judged: "unknown") is left
    assert s.ok and s.meta["variants"] == ["blackout"]
    assert {r["reason"] for r in s.meta["variant_rejects"] if r["stage"] == "verify"} == {"judge_unavailable"}
    one = fresh(qa_samples[:1])
    judge(model="m", engine="openai", base_url=srv.url, timeout_s=0.2, max_http_retries=0,
          variants=["remove", "blackout", "attribute", "flip", "insert", "random_mask"]).process_batch(one)
    assert not one[0].ok and one[0].meta["reject"]["reason"] == "no_valid_counterfactual"
    # 429 with Retry-After: the client waits as told, then the answer counts
    samples = fresh(qa_samples[:1])
    calls: dict[str, int] = {}
    lock = threading.Lock()

    def busy_once(body):
        key, text, q = _rule_answer(samples, body)
        with lock:
            calls[text + key] = calls.get(text + key, 0) + 1
            first = calls[text + key] == 1
        return ("status", 429, 0.2) if first else q["answers"][key]

    srv = server(busy_once)
    t0 = time.monotonic()
    judge(model="m", engine="openai", base_url=srv.url, variants=["remove"], concurrency=16,
          max_http_retries=2, backoff_s=5.0).process_batch(samples)
    assert 0.1 <= time.monotonic() - t0 < 4  # Retry-After (0.2 s), not the 5 s backoff
    assert samples[0].ok and "remove" in samples[0].meta["variants"]
    assert samples[0].meta["metrics"]["remove"]["judge_agreement"] == 1.0


def test_pixel_checks_run_first_and_spare_the_judge(server, qa_samples):
    samples = fresh(qa_samples[:1])
    srv = server(lambda body: "yes")
    judge(model="m", engine="openai", base_url=srv.url, min_inside_mad=1e9,
          variants=["remove", "attribute"]).process_batch(samples)
    assert not srv.requests  # both region edits failed their pixel check: nothing to ask
    assert rejects(samples[0], "remove") == ["region_unchanged"]
    assert samples[0].ok and "flip" in samples[0].meta["variants"]  # a mirror passes, unjudged here
    assert "judge_answers" not in samples[0].meta["metrics"].get("flip", {})


# --- in a pipeline --------------------------------------------------------------------------------
def test_pipeline_with_the_judge_reports_agreement_per_variant_in_the_card(vlms, tmp_path):
    import copy
    import json

    from counterfactory.pipeline.config import validate_config
    from counterfactory.pipeline.runner import run_pipeline
    from tests.conftest import demo_dict

    data = copy.deepcopy(demo_dict())
    data["inputs"] = [scenes_input(2, seed=1, questions=1)]
    data["output"]["root"] = str(tmp_path / "out")
    st = {s["name"]: s for s in data["stages"]}
    st["verify"].update(backend="vlm-judge", params={"model": str(vlms["yes"]), "device": "cpu", **st["verify"]["params"]})
    res = run_pipeline(validate_config(data, source="test", base_dir=tmp_path), local=True, progress=False)
    card = json.loads(next(res.out_dir.parent.rglob("card.json")).read_text())
    assert "judge.questions_per_pair" in card["histograms"]
    assert any(k.endswith(".judge_agreement") for k in card["histograms"])
    assert {"stage": "verify", "variant": "remove", "reason": "judge_disagrees"}.items() <= next(
        r for r in card["variant_rejects"] if r["variant"] == "remove").items()
    assert card["models"], card["models"]
