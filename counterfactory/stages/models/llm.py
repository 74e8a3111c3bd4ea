"""qa with an LLM: question/answer pairs written from the sample's structured context.

The LLM sees the input question, the targets, the evidence boxes, and the list of edits (what
was removed, masked or repainted). It answers with JSON: questions about the evidence, each with
a kind and its answer on the original image. The output is validated against a schema and
against what the annotations determine (an existence answer must be "yes", a count must equal
the number of instances, a known color must match, no question may mention the edit). Invalid
output is re-asked with the errors, up to ``max_reasks`` times; after that the template
generator of the default backend is used and that is recorded in ``meta["qa_generation"]``.
A refusal or an empty reply rejects the sample with a reason.

Answers for every variant come from ``rules.answer_for`` (never from the LLM): the rule table
is the single authority on what an edit does to an answer.

Two backends: ``llm-transformers`` (a local chat model, batched generation) and
``llm-openai`` (any OpenAI-compatible HTTP endpoint: vLLM, TGI, ...; HTTP errors and timeouts
retried with exponential backoff and a cap).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from counterfactory.sample import Reject, Sample
from counterfactory.stages import register
from counterfactory.stages.models.common import (
    ModelParams,
    model_record,
    run_batched,
    transformers_setup,
)
from counterfactory.stages.qa import TemplateQA, original_answer

LLMKind = Literal["existence", "count", "color", "position", "other"]


class LLMQuestion(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: str = Field(min_length=4, max_length=300)
    kind: LLMKind
    answer: str = Field(min_length=1, max_length=60)

    @field_validator("question")
    @classmethod
    def _is_question(cls, v: str) -> str:
        if not v.strip().endswith("?"):
            raise ValueError("a question must end with '?'")
        return v.strip()


class LLMReply(BaseModel):
    """The JSON schema the LLM must answer with (also sent to it, as JSON Schema)."""

    model_config = ConfigDict(extra="forbid")
    questions: list[LLMQuestion] = Field(min_length=1, max_length=8)


REPLY_SCHEMA = LLMReply.model_json_schema()

SYSTEM_PROMPT = (
    "You write visual question-answer pairs for a counterfactual image dataset. You are given "
    "structured facts about one image: the objects that are the evidence, their boxes, and the edits "
    "that will be made to copies of the image. Write short questions about the evidence that the "
    "ORIGINAL image answers. Never mention edits, masks, removal or inpainting in a question. "
    "Reply with JSON only, matching this JSON Schema: " + json.dumps(REPLY_SCHEMA, separators=(",", ":"))
)

_REFUSAL = re.compile(r"^\W*(i'?m sorry|i am sorry|sorry,|i cannot|i can'?t|i won'?t|i am unable|i'?m unable|"
                      r"as an ai\b|i must decline)", re.I)
_EDIT_WORDS = re.compile(r"\b(remov\w*|edit\w*|mask\w*|inpaint\w*|black(ed)?[- ]?out|counterfactual\w*|erase\w*)\b", re.I)
_JSON_BLOCK = re.compile(r"\{.*\}", re.S)


def context_of(m: dict[str, Any]) -> dict[str, Any]:
    """The structured facts an LLM writes questions from (JSON-able, no pixels)."""
    return {
        "question": m["question"]["question"],
        "targets": m["targets"],
        "target_phrase": m.get("target_phrase"),
        "image_size": [m["source"]["width"], m["source"]["height"]],
        "instances": [{"category": i["category"], "box": i["box"],
                       **({"color": i["attributes"]["color"]} if i.get("attributes", {}).get("color") else {})}
                      for i in m["instances"]],
        "edits": {v: {k: e[k] for k in ("region", "removed_instances", "new_value", "attribute") if k in e}
                  for v, e in m.get("edits", {}).items()},
    }


def parse_reply(text: str, m: dict[str, Any], core: np.ndarray, max_questions: int) -> list[dict[str, Any]]:
    """Validated question items, or ValueError listing what is wrong (sent back on a re-ask)."""
    match = _JSON_BLOCK.search(text)
    if not match:
        raise ValueError("no JSON object in the reply")
    try:
        reply = LLMReply.model_validate_json(match.group(0))
    except ValidationError as exc:
        errs = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])
        raise ValueError(f"reply does not match the schema: {errs}") from None
    problems, items = [], []
    for q in reply.questions[:max_questions]:
        if _EDIT_WORDS.search(q.question):
            problems.append(f"{q.question!r} mentions the edit")
            continue
        derived = original_answer(q.kind, None, m["instances"], core)
        ans = q.answer.strip().lower()
        if q.kind in ("existence", "count") and ans != derived:
            problems.append(f"{q.question!r}: the {q.kind} answer is {derived!r}, not {q.answer!r}")
            continue
        if q.kind == "color" and derived is not None and ans != derived:
            problems.append(f"{q.question!r}: the color is {derived!r}, not {q.answer!r}")
            continue
        items.append({"question": q.question, "kind": q.kind, "answer": ans if q.kind != "other" else q.answer.strip(),
                      "targets": m["targets"], "source": "llm"})
    if problems:
        raise ValueError("; ".join(problems))
    return items


class RetryParams(Protocol):
    timeout_s: float
    max_http_retries: int
    backoff_s: float
    backoff_max_s: float


def post_chat(url: str, body: dict[str, Any], api_key: str, p: RetryParams) -> Any:
    """POST one OpenAI-compatible chat request with retries; the message content, or a Reject
    (``llm_refusal``, ``llm_http_error``, ``llm_unavailable``). Shared by the QA LLM and the
    VLM judge (stages/models/judge.py) so both retry, back off and time out the same way."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = json.dumps(body).encode()
    last, wait = "", None
    for attempt in range(p.max_http_retries + 1):
        if attempt:
            # the server's Retry-After when it gave one, else exponential backoff; jittered so
            # the workers that all hit one overloaded endpoint do not come back in step
            delay = wait if wait is not None else p.backoff_s * 2 ** (attempt - 1)
            time.sleep(min(p.backoff_max_s, delay) * random.uniform(0.5, 1.0))
            wait = None
        req = urllib.request.Request(url, data=data, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=p.timeout_s) as r:
                payload = json.loads(r.read())
            choice = payload["choices"][0]
            msg = choice.get("message") or {}
            if msg.get("refusal"):
                return Reject("llm_refusal", str(msg["refusal"])[:300])
            content = msg.get("content") or ""
            if choice.get("finish_reason") == "length":
                content += "\n[truncated]"  # invalid JSON anyway: re-asked like any invalid reply
            return content
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}: {exc.read()[:200]!r}"
            with contextlib.suppress(TypeError, ValueError):  # seconds; an HTTP date is ignored
                wait = max(0.0, float(exc.headers.get("Retry-After")))
            if exc.code not in (408, 409, 425, 429) and exc.code < 500:
                return Reject("llm_http_error", last)
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        except (ValueError, KeyError, IndexError, TypeError) as exc:  # not an OpenAI reply
            last = f"malformed response: {type(exc).__name__}: {exc}"
    return Reject("llm_unavailable", f"{p.max_http_retries + 1} attempts failed; last: {last}")


class LLMQAParams(ModelParams):
    extra_questions: list[str] = Field(["existence", "count", "color", "position"],
                                       description="template kinds used when the LLM output stays invalid")
    max_questions: int = Field(4, ge=1, le=8)
    max_reasks: int = Field(2, ge=0, le=10, description="re-asks after invalid output, then templates")
    max_new_tokens: int = Field(384, ge=16)
    temperature: float = Field(0.0, ge=0, le=2)
    system_prompt: str = SYSTEM_PROMPT


class LLMQA(TemplateQA):
    """Shared flow; subclasses implement ``_chat(list of message lists) -> list of replies``."""

    stateful = True
    Params = LLMQAParams

    def _chat(self, conversations: list[list[dict[str, str]]]) -> list[str | None | Exception]:
        raise NotImplementedError

    def process_batch(self, samples: list[Sample]) -> None:
        convs: dict[int, list[dict[str, str]]] = {}
        for i, s in enumerate(samples):
            convs[i] = [{"role": "system", "content": self.params.system_prompt},
                        {"role": "user", "content": json.dumps(context_of(s.meta), sort_keys=True)}]
            s.meta["qa_generation"] = {"backend": self.backend, "attempts": 0, "errors": []}
        self._llm_items: dict[int, list[dict[str, Any]]] = {}
        pending = dict(convs)
        for _ in range(self.params.max_reasks + 1):
            if not pending:
                break
            order = sorted(pending)
            replies = self._chat([pending[i] for i in order])
            nxt = {}
            for i, reply in zip(order, replies, strict=True):
                s, gen = samples[i], samples[i].meta["qa_generation"]
                gen["attempts"] += 1
                if isinstance(reply, Reject):
                    s.reject(self.name, reply.reason, reply.detail)
                    continue
                text = (reply or "").strip()
                if not text:
                    s.reject(self.name, "llm_empty_output", f"{self.backend} returned an empty reply")
                    continue
                if _REFUSAL.search(text):
                    s.reject(self.name, "llm_refusal", text[:300])
                    continue
                try:
                    self._llm_items[id(s)] = parse_reply(text, s.meta, s.arrays["mask_core"], self.params.max_questions)
                except ValueError as exc:
                    gen["errors"].append(str(exc)[:300])
                    nxt[i] = pending[i] + [
                        {"role": "assistant", "content": text[:2000]},
                        {"role": "user", "content": f"Invalid: {exc}. Reply again with JSON only, matching the schema."}]
            pending = nxt
        for s in samples:
            if not s.ok:
                continue
            gen = s.meta["qa_generation"]
            gen["source"] = "llm" if id(s) in self._llm_items else "template-fallback"
            self.guarded(s, self.process)

    def _templates(self, sample: Sample, core: np.ndarray) -> list[dict[str, Any]]:
        items = self._llm_items.get(id(sample))
        return items if items is not None else super()._templates(sample, core)

    # process(): TemplateQA's flow (input question kept and checked, extras de-duplicated,
    # answers from the rule table for what each edit affects) over the LLM's items.


class JsonEnd:
    """Stops a row of batched generation when its reply has closed its top-level JSON value
    (``{...}`` or ``[...]``, braces inside strings ignored): the reply is complete there, and
    everything after it would be discarded by the parser anyway, so a batch stops at its longest
    JSON instead of at ``max_new_tokens``. One token decoded per row per step (incremental state),
    no re-decoding of the whole reply. A ``transformers`` stopping criterion (per-row booleans)."""

    def __init__(self, tokenizer: Any, prompt_len: int) -> None:
        self.tok, self.prompt_len = tokenizer, prompt_len
        self.state: list[list[Any]] = []  # per row: [depth, in_string, escaped, started, done]
        self.seen = prompt_len

    def feed(self, row: int, text: str) -> bool:
        st = self.state[row]
        depth, in_str, esc, started, done = st
        for ch in text:
            if done:
                break
            if in_str:
                if esc:
                    esc = False
                elif ch == "\\":
                    esc = True
                elif ch == '"':
                    in_str = False
            elif ch == '"' and started:
                in_str = True
            elif ch in "{[":
                depth, started = depth + 1, True
            elif ch in "}]" and started:
                depth -= 1
                done = depth <= 0
        st[:] = [depth, in_str, esc, started, done]
        return done

    def __call__(self, input_ids: Any, scores: Any = None, **kw: Any) -> Any:
        import torch

        rows = input_ids.shape[0]
        if not self.state:
            self.state = [[0, False, False, False, False] for _ in range(rows)]
        new = input_ids[:, self.seen:].tolist()  # the tokens since the last call (one per step)
        self.seen = input_ids.shape[1]
        out = [self.feed(i, self.tok.decode(ids, skip_special_tokens=True)) if not self.state[i][4] else True
               for i, ids in enumerate(new)]
        return torch.tensor(out, dtype=torch.bool, device=input_ids.device)


@register
class TransformersLLMQA(LLMQA):
    backend = "llm-transformers"

    class Params(LLMQAParams):
        stop_at_json_end: bool = Field(True, description="end each reply when its JSON closes")
        static_cache: bool = Field(True, description="preallocated KV cache on CUDA (no reallocation per "
                                   "token; what torch.compile needs); the dynamic cache on CPU")

    def __init__(self, params=None, run=None) -> None:
        super().__init__(params, run)
        p = self.params
        tf, kw = transformers_setup(self, p, self.backend, prefer="bfloat16")
        self.tokenizer = tf.AutoTokenizer.from_pretrained(p.model, revision=p.revision,
                                                          trust_remote_code=p.trust_remote_code)
        self.tokenizer.padding_side = "left"  # batched generation continues every row at its end
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"{p.model}: the tokenizer has no chat template")
        self.model = tf.AutoModelForCausalLM.from_pretrained(p.model, dtype=self.dtype, **kw).to(self.device).eval()
        self.static = p.static_cache and self.device == "cuda"
        self.record = model_record(p.model, p.revision, architecture=type(self.model).__name__,
                                   dtype=str(self.dtype).removeprefix("torch."), device=self.device,
                                   serving="in-actor transformers generate, batched per micro-batch",
                                   kv_cache="static" if self.static else "dynamic",
                                   stop="json-end" if p.stop_at_json_end else "eos/max_new_tokens")

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"models": {"llm": self.record}}

    def _generate(self, convs: list[list[dict[str, str]]]) -> list[str]:
        import torch

        enc = self.tokenizer.apply_chat_template(convs, add_generation_prompt=True, return_tensors="pt",
                                                 padding=True, return_dict=True)
        enc = {k: v.to(self.device) for k, v in enc.items()}
        p = self.params
        gen: dict[str, Any] = {"max_new_tokens": p.max_new_tokens, "pad_token_id": self.tokenizer.pad_token_id}
        if p.temperature > 0:
            gen.update(do_sample=True, temperature=p.temperature)
            torch.manual_seed(self.run.seed)
        else:
            gen["do_sample"] = False
        if p.stop_at_json_end:
            from transformers import StoppingCriteria, StoppingCriteriaList

            crit = type("JsonEndCriteria", (JsonEnd, StoppingCriteria), {})(self.tokenizer, enc["input_ids"].shape[1])
            gen["stopping_criteria"] = StoppingCriteriaList([crit])
        if self.static:
            gen["cache_implementation"] = "static"
        with torch.inference_mode():
            out = self.model.generate(**enc, **gen)
        return self.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)

    def _chat(self, conversations):
        run = run_batched(self._generate, conversations, self.params.batch_size)
        return [Reject(*run.failures[i]) if i in run.failures else r for i, r in enumerate(run.outputs)]


@register
class OpenAILLMQA(LLMQA):
    """Any OpenAI-compatible ``/chat/completions`` endpoint. The key is read from the
    environment variable ``api_key_env`` and never recorded."""

    backend = "llm-openai"

    class Params(LLMQAParams):
        model: str = Field(description="model name as the endpoint knows it")
        base_url: str | None = Field(None, description="e.g. http://vllm:8000/v1; default $OPENAI_BASE_URL")
        api_key_env: str = "OPENAI_API_KEY"
        json_mode: bool = Field(True, description="send response_format={'type': 'json_object'}")
        timeout_s: float = Field(60.0, gt=0)
        max_http_retries: int = Field(4, ge=0, le=20)
        backoff_s: float = Field(0.5, ge=0)
        backoff_max_s: float = Field(10.0, ge=0)
        concurrency: int = Field(8, ge=1, description="requests in flight per actor")

    def __init__(self, params=None, run=None) -> None:
        super().__init__(params, run)
        p = self.params
        self.base_url = (p.base_url or os.environ.get("OPENAI_BASE_URL") or "").rstrip("/")
        if not self.base_url:
            raise ValueError("llm-openai needs base_url (or $OPENAI_BASE_URL)")
        self.api_key = os.environ.get(p.api_key_env, "")
        self.record = {"id": p.model, "revision": p.revision, "endpoint": self.base_url,
                       "serving": f"OpenAI-compatible server, up to {p.concurrency} concurrent requests per actor"}

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"models": {"llm": self.record}}

    def _post(self, messages: list[dict[str, str]]) -> str | Reject:
        p = self.params
        body: dict[str, Any] = {"model": p.model, "messages": messages, "temperature": p.temperature,
                                "max_tokens": p.max_new_tokens, "seed": self.run.seed}
        if p.json_mode:
            body["response_format"] = {"type": "json_object"}
        return post_chat(f"{self.base_url}/chat/completions", body, self.api_key, p)

    def _chat(self, conversations):
        with ThreadPoolExecutor(max_workers=min(self.params.concurrency, max(1, len(conversations)))) as ex:
            return list(ex.map(self._post, conversations))
