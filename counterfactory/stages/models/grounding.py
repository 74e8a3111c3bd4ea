"""localize with open-vocabulary detectors through ``transformers``: Grounding DINO and OWLv2.

The question's target phrases (given, or extracted by a rule-based noun-phrase reader cached
per question text) are detected on the image; boxes above ``box_threshold`` whose best phrase
scores above ``text_threshold`` survive per-phrase non-maximum suppression and become the
evidence instances (same contract as the annotation default: ``meta["targets"]``,
``meta["instances"]`` with integer boxes clipped to the image).

``Detector`` is shared with the ``redetect`` verifier, which runs it on the edited image.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from counterfactory.rules import singular
from counterfactory.sample import Reject, Sample, Stage
from counterfactory.stages import register
from counterfactory.stages.models.common import (
    ModelParams,
    images_to_device,
    load_pretrained,
    maybe_compile,
    model_record,
    run_batched,
    transformers_setup,
)

DetectorKind = Literal["grounding-dino", "owlv2"]

_SCAFFOLD = re.compile(
    r"^\s*(is there|are there|is there any|are there any|can you see|do you see|does the image (show|contain)|"
    r"how many|what colou?r (is|are)|which colou?r (is|are)|where (is|are)|is|are|does|do)\b", re.I)
_TAIL = re.compile(r"\b(in|on|of) (the|this) (image|picture|photo|scene)\b.*$|"
                   r"\b(on|to) the (left|right) or (the )?(left|right)\b.*$|\b(are|is) there\b.*$|"
                   r"\b(visible|present|shown|in view)\b.*$", re.I)
_STOP = {"a", "an", "the", "any", "some", "there", "this", "that", "these", "those", "of", "in", "on",
         "at", "to", "and", "or", "image", "picture", "photo", "scene", "it", "its", "you", "see", "can"}


@lru_cache(maxsize=4096)
def extract_targets(question: str) -> tuple[str, ...]:
    """Rule-based noun phrase of a question: scaffolding words stripped, the remaining content
    words up to the head noun, singularized (``"How many red circles are there?"`` ->
    ``("red circle",)``). Cached per question text."""
    q = question.strip().rstrip("?.! ")
    q = _SCAFFOLD.sub("", q)
    q = _TAIL.sub("", q)
    toks = [t for t in re.findall(r"[a-zA-Z]+", q.lower()) if t not in _STOP]
    if not toks:
        return ()
    toks = toks[-3:]
    toks[-1] = singular(toks[-1])
    return (" ".join(toks),)


def question_targets(meta: dict[str, Any]) -> list[str]:
    q = meta["question"]
    if q.get("targets"):
        return [str(t).strip().lower() for t in q["targets"] if str(t).strip()]
    return list(extract_targets(q["question"]))


def _nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> list[int]:
    import torch
    from torchvision.ops import nms

    if len(boxes) == 0:
        return []
    keep = nms(torch.as_tensor(boxes, dtype=torch.float32), torch.as_tensor(scores, dtype=torch.float32), iou)
    return [int(k) for k in keep]


class Detector:
    """An open-vocabulary detector loaded once; ``detect`` takes RGB images and, per image,
    phrases, and returns per image a list of ``{phrase, box (float xyxy), score}``."""

    def __init__(self, kind: DetectorKind, p: ModelParams, backend: str) -> None:
        self.kind = kind
        tf, kw = transformers_setup(self, p, backend)
        self.batch_size = p.batch_size
        proc_kw = {k: v for k, v in kw.items() if k != "use_safetensors"}
        if kind == "grounding-dino":
            self.processor = tf.AutoProcessor.from_pretrained(p.model, **proc_kw)
            model_cls = tf.GroundingDinoForObjectDetection
        else:
            self.processor = tf.Owlv2Processor.from_pretrained(p.model, **proc_kw)
            model_cls = tf.Owlv2ForObjectDetection
        self.model = load_pretrained(model_cls, p, backend, dtype=self.dtype, **kw).to(self.device).eval()
        self.model = maybe_compile(self.model, p.compile, self.device, f"the {kind} detector")
        # Resize/normalize where the model runs: the processors' torchvision backend takes a
        # device, and on CPU their resize costs more than the model on a GPU (OWLv2 ~200 ms/img).
        self.image_kw = {"device": self.device} if getattr(p, "preprocess_on_device", True) else {}
        self.record = model_record(p.model, p.revision, architecture=model_cls.__name__,
                                   dtype=str(self.dtype).removeprefix("torch."), device=self.device)

    # --- one micro-batch -----------------------------------------------------------------
    def _gd(self, images: list[np.ndarray], phrases: list[list[str]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Grounding DINO: per query box, a score per phrase = max token probability over the
        phrase's tokens in the ``"a. b."`` prompt."""
        import torch

        tok = self.processor.tokenizer
        prompts = [". ".join(ph) + "." for ph in phrases]
        pixels = images_to_device(images, self.device) if self.image_kw else images
        inputs = self.processor(images=pixels, text=prompts, return_tensors="pt", padding=True, truncation=True,
                                **self.image_kw)
        inputs = {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                  for k, v in inputs.items()}
        with torch.inference_mode():
            out = self.model(**inputs)
        probs = out.logits.float().sigmoid().cpu().numpy()  # (B, Q, max_text_len)
        boxes = out.pred_boxes.float().cpu().numpy()  # (B, Q, 4) cx, cy, w, h relative
        ids = inputs["input_ids"].cpu().numpy()
        res = []
        for i, ph in enumerate(phrases):
            spans = self._spans(tok, ids[i], ph)
            per = np.stack([probs[i][:, s].max(axis=1) if len(s) else np.zeros(probs.shape[1])
                            for s in spans], axis=1)  # (Q, n_phrases)
            h, w = images[i].shape[:2]
            res.append((per, _to_xyxy(boxes[i], w, h)))
        return res

    @staticmethod
    def _spans(tok: Any, ids: np.ndarray, phrases: list[str]) -> list[list[int]]:
        seq = [int(x) for x in ids]
        spans, pos = [], 1  # after [CLS]
        for ph in phrases:
            pid = tok(ph.lower(), add_special_tokens=False)["input_ids"]
            at = next((j for j in range(pos, len(seq) - len(pid) + 1) if seq[j:j + len(pid)] == pid), None)
            if at is None:  # truncated away
                spans.append([])
                continue
            spans.append(list(range(at, at + len(pid))))
            pos = at + len(pid)
        return spans

    def _owl(self, images: list[np.ndarray], phrases: list[list[str]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """OWLv2: one query per phrase; boxes are relative to the image padded to a square."""
        import torch

        n = max(len(ph) for ph in phrases)
        padded = [ph + [ph[0]] * (n - len(ph)) for ph in phrases]  # equal query count per image
        pixels = images_to_device(images, self.device) if self.image_kw else images  # uint8, one copy
        inputs = self.processor(images=pixels, text=padded, return_tensors="pt", **self.image_kw,
                                padding="max_length", truncation=True)
        inputs = {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                  for k, v in inputs.items()}
        with torch.inference_mode():
            out = self.model(**inputs)
        probs = out.logits.float().sigmoid().cpu().numpy()  # (B, patches, n)
        boxes = out.pred_boxes.float().cpu().numpy()
        res = []
        for i, ph in enumerate(phrases):
            h, w = images[i].shape[:2]
            side = max(h, w)
            res.append((probs[i][:, :len(ph)], _to_xyxy(boxes[i], side, side)))
        return res

    def detect(self, images: list[np.ndarray], phrases: list[list[str]], *, box_threshold: float,
               text_threshold: float, nms_iou: float, max_detections: int):
        """Returns (per image: detections or None where the model failed, failures by index)."""
        step = self._gd if self.kind == "grounding-dino" else self._owl
        items = list(zip(images, phrases, strict=True))
        run = run_batched(lambda ch: step([c[0] for c in ch], [c[1] for c in ch]), items, self.batch_size)
        results: list[list[dict[str, Any]] | None] = []
        for i, r in enumerate(run.outputs):
            if r is None:
                results.append(None)
                continue
            per, xyxy = r
            h, w = images[i].shape[:2]
            best = per.argmax(axis=1)
            box_score = per.max(axis=1)
            dets = []
            for j, ph in enumerate(phrases[i]):
                sel = np.nonzero((best == j) & (box_score > box_threshold) & (per[:, j] > text_threshold))[0]
                if not len(sel):
                    continue
                bx = np.clip(xyxy[sel], 0, [w, h, w, h])
                for k in _nms(bx, box_score[sel], nms_iou):
                    dets.append({"phrase": ph, "box": bx[k].tolist(), "score": float(box_score[sel][k])})
            dets.sort(key=lambda d: -d["score"])
            results.append(dets[:max_detections])
        return results, run.failures


def _to_xyxy(cxcywh: np.ndarray, w: float, h: float) -> np.ndarray:
    cx, cy, bw, bh = cxcywh.T
    return np.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h], axis=1)


class PhraseLLM(BaseModel):
    """An LLM that reads the question's target phrases (a qa backend: its client and model)."""

    model_config = ConfigDict(extra="forbid")
    backend: Literal["llm-openai", "llm-transformers"]
    params: dict[str, Any] = Field(default_factory=dict)


PHRASE_PROMPT = (
    "You read a visual question and name the objects in the image that its answer depends on. "
    'Reply with JSON only: {"phrases": ["short noun phrase", ...]}, one to five phrases of one '
    "to four words each, singular, lowercase, with a color or material word only when the "
    "question uses one. Do not answer the question."
)


def parse_phrases(reply: Any) -> list[str] | None:
    """The phrases of an LLM reply, or None when it is not the JSON asked for."""
    if not isinstance(reply, str):
        return None
    try:
        doc = json.loads(reply.strip().removeprefix("```json").removesuffix("```").strip())
    except ValueError:
        return None
    items = doc.get("phrases") if isinstance(doc, dict) else doc
    if not isinstance(items, list) or not 1 <= len(items) <= 5:
        return None
    out = [" ".join(str(x).lower().split()) for x in items if isinstance(x, str)]
    if len(out) != len(items) or not all(1 <= len(x.split()) <= 4 for x in out):
        return None
    return list(dict.fromkeys(out))


class DetectorParams(ModelParams):
    phrases_llm: PhraseLLM | None = Field(
        None, description="read target phrases with an LLM (questions without explicit targets); "
        "default: the rule-based noun-phrase reader")
    preprocess_on_device: bool = Field(True, description="resize/normalize images on the model's device")
    box_threshold: float = Field(0.3, ge=0, le=1)
    text_threshold: float = Field(0.25, ge=0, le=1)
    nms_iou: float = Field(0.5, gt=0, le=1)
    max_instances: int = Field(20, ge=1)
    min_box_side: int = Field(2, ge=1)


class DetectorLocalize(Stage):
    name = "localize"
    stateful = True
    kind: DetectorKind = "grounding-dino"
    Params = DetectorParams

    def __init__(self, params=None, run=None) -> None:
        super().__init__(params, run)
        self.detector = Detector(self.kind, self.params, self.backend)
        self.phrase_llm = None
        self._phrase_cache: dict[str, tuple[list[str], str]] = {}
        if self.params.phrases_llm is not None:
            from counterfactory.stages import get_backend

            spec = self.params.phrases_llm
            self.phrase_llm = get_backend("qa", spec.backend)(params=spec.params, run=run)

    def describe(self) -> dict[str, Any]:
        models = {"detector": self.detector.record}
        if self.phrase_llm is not None:
            models["phrases"] = self.phrase_llm.describe().get("models", {"backend": self.phrase_llm.backend})
        return super().describe() | {"models": models}

    def _targets(self, samples: list[Sample]) -> dict[int, tuple[list[str], str]]:
        """Per sample: (phrases, where they came from). Explicit targets win; then the LLM, one
        call per distinct question (cached for the actor's life), with the rule-based reader as
        the recorded fallback when the reply is not the JSON asked for."""
        out: dict[int, tuple[list[str], str]] = {}
        ask: dict[str, list[Sample]] = {}
        for s in samples:
            q = s.meta["question"]
            if q.get("targets") or self.phrase_llm is None:
                out[id(s)] = (question_targets(s.meta), "input" if q.get("targets") else "rules")
            elif q["question"] in self._phrase_cache:
                out[id(s)] = self._phrase_cache[q["question"]]
            else:
                ask.setdefault(q["question"], []).append(s)
        if ask:
            texts = list(ask)
            replies = self.phrase_llm._chat([[{"role": "system", "content": PHRASE_PROMPT},
                                              {"role": "user", "content": t}] for t in texts])
            for text, reply in zip(texts, replies, strict=True):
                phrases = parse_phrases(reply)
                got = (phrases, "llm") if phrases else (list(extract_targets(text)), "rules-fallback")
                self._phrase_cache[text] = got
                for s in ask[text]:
                    out[id(s)] = got
        return out

    def _phrased(self, samples: list[Sample]) -> list[tuple[Sample, list[str]]]:
        """The samples with phrases to look for, each with its phrases (their source recorded);
        a sample whose question names none is rejected."""
        todo = []
        found = self._targets(samples)
        for s in samples:
            targets, source = found[id(s)]
            s.meta["target_source"] = source
            if not targets:
                s.reject(self.name, "no_target_phrase", f"no noun phrase in {s.meta['question']['question']!r}")
                continue
            todo.append((s, targets))
        return todo

    def process_batch(self, samples: list[Sample]) -> None:
        p = self.params
        todo = self._phrased(samples)
        if not todo:
            return
        dets, failures = self.detector.detect(
            [s.arrays["image"] for s, _ in todo], [t for _, t in todo], box_threshold=p.box_threshold,
            text_threshold=p.text_threshold, nms_iou=p.nms_iou, max_detections=p.max_instances)
        for i, (s, targets) in enumerate(todo):
            if i in failures:
                s.reject(self.name, *failures[i])
                continue
            self.guarded(s, lambda smp, d=dets[i], t=targets: self._assign(smp, t, d))

    def _assign(self, s: Sample, targets: list[str], dets: list[dict[str, Any]]) -> None:
        m = s.meta
        w, h = m["source"]["width"], m["source"]["height"]
        instances = []
        for d in dets:
            x0, y0, x1, y1 = d["box"]
            box = [int(np.floor(x0)), int(np.floor(y0)), int(np.ceil(x1)), int(np.ceil(y1))]
            box = [max(0, box[0]), max(0, box[1]), min(w, box[2]), min(h, box[3])]
            if min(box[2] - box[0], box[3] - box[1]) < self.params.min_box_side:
                continue
            instances.append({"category": d["phrase"], "box": box, "attributes": {},
                              "score": round(d["score"], 4), "detector": self.backend})
        if not instances:
            raise Reject("target_not_found", f"{self.backend} found none of {targets} above "
                         f"box_threshold={self.params.box_threshold}")
        m["targets"] = sorted({i["category"] for i in instances}, key=targets.index)
        m["instances"] = instances
        m.pop("objects", None)


@register
class GroundingDinoLocalize(DetectorLocalize):
    backend = "grounding-dino"
    kind = "grounding-dino"


@register
class Owlv2Localize(DetectorLocalize):
    backend = "owlv2"
    kind = "owlv2"
