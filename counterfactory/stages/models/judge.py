"""verify: vlm-judge. The pixel checks of the default first, then a vision-language model is
asked each accepted variant's OWN questions (the QA stage's items) of the edited image and of
the original, and a variant is kept only when the judge's answers agree with the rule table's.

Why the pair's own questions: we know what each variant must answer (existence "no" after
remove, the new color after attribute, the count after count, the side after flip), so the judge
checks the one fact the edit was meant to change, and catches what pixel checks cannot (a
removal that left a recognisable object, an inpainting that painted a new one).

- Replies are normalized with the rule table's word matching (``rules.words``/``singular``/
  ``match_categories``) into the question kind's answer space; a reply outside it (a color for a
  count) is "wrong_type", never a guess.
- ``votes`` asks per question, either over prompt paraphrases (greedy) or over samples
  (temperature > 0, one seed per vote); the majority of readable replies is the judge's answer.
- The original is asked too: a question the judge gets wrong there is flagged as a bad question
  (``judge_wrong_on_original`` in the metrics) and left out of the variant's decision: it says
  nothing about the edit.
- Rejects: ``judge_disagrees`` (with the judge's answers), ``judge_no_answer`` (empty, refusal,
  wrong type), ``judge_unavailable`` (the endpoint or model never answered: timeouts and HTTP
  errors end after a bounded number of retries, never a hang), ``judge_unverified`` (fewer than
  ``min_questions`` usable questions).

Two engines: ``transformers`` (``AutoModelForImageTextToText`` in the actor, batched, greedy,
a few answer tokens) and ``openai`` (any OpenAI-compatible vision endpoint, images as data
URLs, bounded concurrency, the QA LLM's HTTP client with its retries and Retry-After).
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import cv2
import numpy as np
from pydantic import Field, model_validator

from counterfactory.rules import ACHROMATIC, HUES, match_categories, singular, words
from counterfactory.sample import Reject, Sample
from counterfactory.stages import register
from counterfactory.stages.models.common import (
    ModelParams,
    SplitStage,
    model_record,
    run_batched,
    transformers_setup,
)
from counterfactory.stages.models.llm import _REFUSAL, post_chat
from counterfactory.stages.verify import COUNTERFACTUALS, PixelVerify

HINTS = {
    "existence": "Answer yes or no.",
    "count": "Answer with a number.",
    "color": "Answer with one color word.",
    "position": "Answer left or right.",
    "direction": "Answer with one word.",
    "order": "Answer with one word.",
    "temporal": "Answer with one word.",
    "other": "Answer with one word or a short phrase.",
}
PARAPHRASES = (
    "{question} {hint}",
    "Look at the image carefully. {question} {hint}",
    "Question: {question}\n{hint} Answer:",
)

_YES = {"yes", "yeah", "yep", "true", "present", "visible"}
_NO = {"no", "nope", "false", "absent", "none", "not"}
_NUM_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty".split())} | {"none": 0, "no": 0}
_COLORS = set(HUES) | set(ACHROMATIC) | {"brown", "gold", "beige", "violet", "magenta", "teal"}
_COLOR_ALIAS = {"grey": "gray", "silver": "gray", "violet": "purple", "magenta": "pink", "teal": "cyan"}
_SIDES = {"left", "right", "forward", "backward", "clockwise", "counterclockwise", "up", "down"}
_ORDER = {"before", "after", "first", "last", "yes", "no"}
_DIGITS = re.compile(r"\b\d+\b")
# what a judge reply can be besides an answer; the transport failures come from post_chat /
# run_batched (llm_unavailable, llm_http_error, cuda_oom, model_error)
REPLY_FAULTS = ("empty", "refusal", "wrong_type")
DEFAULT_VARIANTS = ["remove", "attribute", "replace", "count", "flip", "swap", "insert", "random_mask"]


def normalize(kind: str, text: str) -> str | None:
    """The reply as a value of the kind's answer space ("yes"/"no", a whole number, a color
    name, a side...), or None when it holds no such value."""
    toks = words(text)
    if kind == "existence":
        return next(("yes" if t in _YES else "no" for t in toks if t in _YES | _NO), None)
    if kind == "count":
        digits = _DIGITS.search(text)
        if digits:
            return str(int(digits.group(0)))
        return next((str(_NUM_WORDS[t]) for t in toks if t in _NUM_WORDS), None)
    if kind == "color":
        return next((_COLOR_ALIAS.get(t, t) for t in toks if t in _COLORS), None)
    if kind in ("position", "direction"):
        return next((t for t in toks if t in _SIDES), None)
    if kind == "order":
        return next((t for t in toks if t in _ORDER), None)
    return " ".join(toks) or None


def agrees(kind: str, value: str | None, expected: str) -> bool:
    if value is None:
        return False
    want = normalize(kind, expected)
    if kind in ("other", "temporal"):
        # free-form: the expected answer's words (or a synonym of it) named in the reply
        exp_words = [singular(w) for w in expected.lower().split()]
        return value == want or all(w in value.split() for w in exp_words) or bool(
            match_categories(value, {expected.lower()}))
    return value == want


def read_reply(kind: str, reply: Any) -> tuple[str | None, str]:
    """(value, status): status "ok", one of REPLY_FAULTS, or a transport failure reason."""
    if isinstance(reply, Reject):  # the endpoint's own refusal field is a reply, not a failure
        return None, "refusal" if reply.reason == "llm_refusal" else reply.reason
    if not isinstance(reply, str):
        return None, "wrong_type"
    text = reply.strip()
    if not text:
        return None, "empty"
    if _REFUSAL.search(text):
        return None, "refusal"
    value = normalize(kind, text)
    return (value, "ok") if value is not None else (None, "wrong_type")


def majority(values: list[str]) -> str | None:
    """The most frequent readable answer; a tie between the top two is no answer."""
    top = Counter(values).most_common(2)
    if not top or (len(top) == 2 and top[0][1] == top[1][1]):
        return None
    return top[0][0]


def fit_image(img: np.ndarray, side: int) -> np.ndarray:
    """Downscale so the longest side is ``side`` (the judge's resolution; never upscaled)."""
    h, w = img.shape[:2]
    s = side / max(h, w)
    if s >= 1:
        return img
    return cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)


def data_url(img: np.ndarray, quality: int = 95) -> str:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:  # pragma: no cover - cv2 encodes any uint8 RGB array
        raise ValueError("could not encode the image as JPEG")
    return "data:image/jpeg;base64," + base64.b64encode(buf.tobytes()).decode()


def check_image_text_model(ref: str, revision: str | None, backend: str) -> None:
    """A folder of another architecture is refused before loading: transformers would load, say,
    a BERT folder with random heads under the judge's name."""
    from transformers import PretrainedConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    config, _ = PretrainedConfig.get_config_dict(ref, revision=revision)
    got = config.get("model_type")
    if got not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        raise ValueError(f"{ref}: a '{got}' model, but the {backend} backend loads an image-text-to-text "
                         "model (AutoModelForImageTextToText: qwen2_5_vl, qwen3_vl, smolvlm, idefics3, ...)")


@register
class VLMJudgeVerify(SplitStage, PixelVerify):
    name = "verify"
    backend = "vlm-judge"
    stateful = True
    host_parts = ("before",)

    class Params(PixelVerify.Params, ModelParams):
        engine: Literal["transformers", "openai"] = Field(
            "transformers", description="a model in the actor, or an OpenAI-compatible vision endpoint")
        batch_size: int = Field(16, ge=1, description="prompts per generate call; halved on CUDA out-of-memory")
        pixel_checks: bool = Field(True, description="run the default verify's pixel checks first")
        variants: list[str] = Field(DEFAULT_VARIANTS, description="variants whose questions the judge asks")
        votes: int = Field(1, ge=1, le=15, description="asks per question; the majority answer counts")
        vote_mode: Literal["paraphrases", "samples"] = Field(
            "paraphrases", description="paraphrases: one greedy ask per prompt form; samples: temperature > 0")
        paraphrases: list[str] = Field(list(PARAPHRASES), min_length=1,
                                       description="prompt forms with {question} and {hint}")
        temperature: float = Field(0.7, ge=0, le=2, description="used in vote_mode 'samples' only")
        answer_tokens: int = Field(4, ge=1, le=64, description="new tokens per answer")
        image_size: int = Field(448, ge=28, description="longest side the judge sees, px")
        min_agreement: float = Field(1.0, ge=0, le=1, description="share of a variant's usable questions "
                                     "whose judged answer must match the rule table's")
        min_questions: int = Field(1, ge=0, description="usable questions a variant needs to be kept")
        unreadable: Literal["reject", "skip"] = Field(
            "reject", description="a question without a readable answer rejects the variant, or is skipped")
        # openai engine
        base_url: str | None = Field(None, description="e.g. http://vllm:8000/v1; default $OPENAI_BASE_URL")
        api_key_env: str = "OPENAI_API_KEY"
        timeout_s: float = Field(30.0, gt=0)
        max_http_retries: int = Field(3, ge=0, le=20)
        backoff_s: float = Field(0.5, ge=0)
        backoff_max_s: float = Field(10.0, ge=0)
        concurrency: int = Field(8, ge=1, description="requests in flight per actor")

        @model_validator(mode="after")
        def _votes_are_distinct(self):
            if any("{question}" not in t for t in self.paraphrases):
                raise ValueError("every paraphrase must contain {question}")
            if self.vote_mode == "paraphrases" and self.votes > len(self.paraphrases):
                raise ValueError(f"votes={self.votes} but only {len(self.paraphrases)} paraphrases: "
                                 "add paraphrases or use vote_mode: samples")
            if self.vote_mode == "samples" and self.votes > 1 and self.temperature == 0:
                raise ValueError("vote_mode 'samples' with temperature 0 asks the same greedy question "
                                 "k times: set temperature > 0")
            return self

    def __init__(self, params=None, run=None) -> None:
        super().__init__(params, run)
        p = self.params
        self.abstain = self.run.abstain_answer
        if p.engine == "openai":
            self.base_url = (p.base_url or os.environ.get("OPENAI_BASE_URL") or "").rstrip("/")
            if not self.base_url:
                raise ValueError("vlm-judge with engine 'openai' needs base_url (or $OPENAI_BASE_URL)")
            self.api_key = os.environ.get(p.api_key_env, "")
            self.record = {"id": p.model, "revision": p.revision, "endpoint": self.base_url}
            return
        tf, kw = transformers_setup(self, p, self.backend, prefer="bfloat16")
        check_image_text_model(p.model, p.revision, self.backend)
        self.processor = tf.AutoProcessor.from_pretrained(p.model, revision=p.revision,
                                                          trust_remote_code=p.trust_remote_code)
        tok = getattr(self.processor, "tokenizer", None)
        if tok is None or not getattr(self.processor, "chat_template", None):
            raise ValueError(f"{p.model}: the processor has no tokenizer or no chat template")
        tok.padding_side = "left"  # batched generation continues every row at its end
        self.model = tf.AutoModelForImageTextToText.from_pretrained(p.model, dtype=self.dtype, **kw)
        self.model = self.model.to(self.device).eval()
        self.record = model_record(p.model, p.revision, architecture=type(self.model).__name__,
                                   dtype=str(self.dtype).removeprefix("torch."), device=self.device)

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"models": {"judge": self.record}}

    # --- asking ------------------------------------------------------------------------------
    def _prompt(self, question: str, kind: str, vote: int) -> str:
        p = self.params
        form = p.paraphrases[vote % len(p.paraphrases)] if p.vote_mode == "paraphrases" else p.paraphrases[0]
        return form.format(question=question, hint=HINTS.get(kind, HINTS["other"])).strip()

    def _seed(self, ask: tuple) -> int:
        key = f"{self.run.seed}:{ask[0]}:{ask[1]}:{ask[2]}:{ask[3]}"
        return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little")

    def _generate(self, chunk: list[tuple]) -> list[str]:
        import torch
        from PIL import Image

        p = self.params
        convs = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": a[4]}]}] for a in chunk]
        texts = [self.processor.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in convs]
        enc = self.processor(text=texts, images=[[Image.fromarray(a[5])] for a in chunk], padding=True,
                             return_tensors="pt")
        enc = {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
               for k, v in enc.items()}
        tok = self.processor.tokenizer
        gen: dict[str, Any] = {"max_new_tokens": p.answer_tokens, "do_sample": False,
                               "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id}
        if p.vote_mode == "samples" and p.temperature > 0:
            gen.update(do_sample=True, temperature=p.temperature)
            torch.manual_seed(self._seed(chunk[0]))  # one seed per chunk, from its first ask
        with torch.inference_mode():
            out = self.model.generate(**enc, **gen)
        return tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)

    def _post(self, ask: tuple) -> Any:
        p = self.params
        body: dict[str, Any] = {
            "model": p.model, "max_tokens": p.answer_tokens, "seed": self._seed(ask),
            "temperature": p.temperature if p.vote_mode == "samples" else 0.0,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": ask[5]}}, {"type": "text", "text": ask[4]}]}]}
        return post_chat(f"{self.base_url}/chat/completions", body, self.api_key, p)

    def _ask(self, asks: list[tuple]) -> list[Any]:
        if self.params.engine == "openai":
            with ThreadPoolExecutor(max_workers=min(self.params.concurrency, len(asks))) as ex:
                return list(ex.map(self._post, asks))
        run = run_batched(self._generate, asks, self.params.batch_size)
        return [Reject(*run.failures[i]) if i in run.failures else r for i, r in enumerate(run.outputs)]

    # --- deciding ----------------------------------------------------------------------------
    def _plan(self, s: Sample) -> dict[str, list[int]]:
        """Question indices to ask per image: each judged variant's questions whose rule answer
        is not the abstention answer (no image shows "unknown"), and those of them the original
        answers, asked of the original."""
        qa = s.meta.get("qa", [])
        plan = {v: [i for i, q in enumerate(qa) if q["answers"].get(v) not in (None, self.abstain)]
                for v in s.meta["variants"] if v in self.params.variants}
        orig = sorted({i for qs in plan.values() for i in qs if qa[i]["answers"].get("orig") not in (None, self.abstain)})
        return {"orig": orig, **plan} if orig else plan

    def host_before(self, samples: list[Sample]) -> None:
        """The pixel checks (no judge time on failures): a CPU step beside the judge's actor."""
        for s in samples:
            if self.params.pixel_checks:
                self.guarded(s, super().process)
            else:
                s.meta.setdefault("metrics", {})

    def model_batch(self, samples: list[Sample]) -> None:
        p = self.params
        asks: list[tuple] = []
        plans: dict[int, dict[str, list[int]]] = {}
        for si, s in enumerate(samples):
            if not s.ok or "image" not in s.arrays:
                continue
            plans[si] = self._plan(s)
            for img_key, qs in plans[si].items():
                arr = s.arrays["image"] if img_key == "orig" else s.variant(img_key)
                img = fit_image(arr, p.image_size)
                payload = data_url(img) if p.engine == "openai" else img
                for qi in qs:
                    q = s.meta["qa"][qi]
                    for vote in range(p.votes):
                        asks.append((s.key, img_key, qi, vote, self._prompt(q["question"], q["kind"], vote), payload))
        replies = self._ask(asks) if asks else []
        got: dict[tuple[str, str, int], list[Any]] = {}
        for a, r in zip(asks, replies, strict=True):
            got.setdefault((a[0], a[1], a[2]), []).append(r)
        for si, plan in plans.items():
            self._decide(samples[si], plan, got)
        for s in samples:
            if s.ok and not any(v in COUNTERFACTUALS for v in s.meta["variants"]):
                s.reject(self.name, "no_valid_counterfactual", "every counterfactual variant failed verification")

    def _judged_row(self, s: Sample, img_key: str, qi: int, got: dict) -> dict[str, Any]:
        q = s.meta["qa"][qi]
        read = [read_reply(q["kind"], r) for r in got[(s.key, img_key, qi)]]
        values = [v for v, st in read if st == "ok"]
        answer = majority(values)
        expected = q["answers"][img_key]
        return {"question": q["question"], "kind": q["kind"], "expected": expected, "answer": answer,
                "replies": [v if st == "ok" else f"<{st}>" for v, st in read],
                "agreement": round(sum(agrees(q["kind"], v, expected) for v in values) / len(read), 4),
                "agree": agrees(q["kind"], answer, expected),
                "status": "ok" if answer is not None else _worst([st for _, st in read if st != "ok"])}

    def _decide(self, s: Sample, plan: dict[str, list[int]], got: dict) -> None:
        p = self.params
        metrics = s.meta["metrics"]
        orig = {qi: self._judged_row(s, "orig", qi, got) for qi in plan.get("orig", [])}
        # a question the judge gets wrong (or cannot answer) on the untouched original says
        # nothing about an edit: flagged as a bad question and left out of every variant's decision
        bad = {qi for qi, r in orig.items() if not r["agree"] and not _transport(r["status"])}
        metrics["judge"] = {
            "questions_per_pair": len(orig), "votes": p.votes,
            "orig_agreement": round(sum(r["agree"] for r in orig.values()) / len(orig), 4) if orig else None,
            "bad_questions": [orig[qi] | {"reason": "judge_wrong_on_original"} for qi in sorted(bad)],
        }
        for v, qs in plan.items():
            if v == "orig" or v not in s.meta["variants"]:
                continue
            rows = [self._judged_row(s, v, qi, got) for qi in qs if qi not in bad]
            transport = [r for r in rows if _transport(r["status"])]
            faults = [r for r in rows if r["status"] in (*REPLY_FAULTS, "tie")]
            usable = [r for r in rows if r["answer"] is not None]
            agree = sum(r["agree"] for r in usable)
            vm = metrics.setdefault(v, {})
            vm.update(judge_questions=len(usable), judge_answers=rows,
                      judge_agreement=round(agree / len(usable), 4) if usable else None)
            if transport:
                s.reject_variant(self.name, v, "judge_unavailable", "; ".join(
                    f"{r['question']!r}: {r['status']}" for r in transport))
            elif faults and p.unreadable == "reject":
                s.reject_variant(self.name, v, "judge_no_answer", "; ".join(
                    f"{r['question']!r}: {r['status']} {r['replies']}" for r in faults))
            elif usable and agree / len(usable) < p.min_agreement:
                s.reject_variant(self.name, v, "judge_disagrees", "; ".join(
                    f"{r['question']!r}: judge {r['answer']!r}, rule {r['expected']!r}"
                    for r in usable if not r["agree"]))
            elif len(usable) < p.min_questions:
                s.reject_variant(self.name, v, "judge_unverified",
                                 f"{len(usable)} usable question(s) < min_questions={p.min_questions}"
                                 f" ({len(bad)} flagged bad on the original)")


def _transport(status: str) -> bool:
    """The judge did not answer at all (HTTP, timeout, OOM, model error), as opposed to a reply."""
    return status.startswith(("llm_", "cuda_", "model_"))


def _worst(statuses: list[str]) -> str:
    """One status for a question without a majority: a transport failure first (the judge did
    not answer), then a reply fault, else a tie between readable answers."""
    for st in statuses:
        if _transport(st):
            return st
    return statuses[0] if statuses else "tie"
