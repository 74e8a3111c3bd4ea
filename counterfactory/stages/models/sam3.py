"""SAM 3 concept segmentation: ``localize: sam3`` finds EVERY instance of the question's noun
phrases and its mask in one pass; ``segment: sam3`` merges and dilates those masks.

Design (ARCHITECTURE.md): one model call does what Grounding DINO + SAM did in two. The
localize backend runs ``transformers.Sam3Model`` (image encoded once per image, then one
prompt per phrase against that encoding), keeps, per phrase,
- nothing when SAM 3's presence score (its "is this concept in the image at all" head) is below
  ``presence_threshold``: the image is then handled like today's "not found"
  (``target_not_found``), so absence is decided by the head trained for it, not by box scores;
- otherwise every query whose probability is at least ``instance_threshold`` (an instance set,
  so ``count`` edits miss none), each with its score, box and mask.
Masks travel in ``arrays["instance_masks"]``; the segment stage is then a cheap CPU step
(``segment: sam3``) that merges and dilates them exactly as the classical segment does, so the
pipeline keeps its six stages and every later stage sees the same contract.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from counterfactory.sample import Reject, Sample, Stage
from counterfactory.stages import register
from counterfactory.stages.models.common import (
    ModelParams,
    load_pretrained,
    model_record,
    run_batched,
    transformers_setup,
)
from counterfactory.stages.models.grounding import DetectorLocalize, PhraseLLM
from counterfactory.stages.shared import set_evidence_mask


class Sam3Params(ModelParams):
    phrases_llm: PhraseLLM | None = Field(
        None, description="read target phrases with an LLM; default: the rule-based noun-phrase reader")
    presence_threshold: float = Field(0.5, ge=0, le=1, description="SAM 3 presence score at which a phrase is present")
    instance_threshold: float = Field(0.5, ge=0, le=1, description="query probability at which a match is an instance")
    mask_threshold: float = Field(0.5, ge=0, le=1)
    max_instances: int = Field(20, ge=1)
    min_box_side: int = Field(2, ge=1)
    min_mask_px: int = Field(4, ge=0, description="an instance whose mask has fewer pixels is dropped")
    batch_size: int = Field(8, ge=1, description="images per encoder call; halved on CUDA out-of-memory")


def take(vision: Any, rows: list[int]) -> Any:
    """The encoder output of some images of a batch (every tensor field sliced on dim 0), so
    each image is encoded once whatever the number of its phrases."""
    import torch

    def cut(x):
        if isinstance(x, torch.Tensor):
            return x[rows]
        if isinstance(x, tuple | list):
            return type(x)(cut(y) for y in x)
        return x

    return type(vision)(**{k: cut(v) for k, v in vision.items()})


@register
class Sam3Localize(DetectorLocalize):
    name = "localize"
    backend = "sam3"
    stateful = True
    Params = Sam3Params

    def __init__(self, params=None, run=None) -> None:  # noqa: D401 - no Detector: SAM 3 is its own
        Stage.__init__(self, params, run)
        p = self.params
        tf, kw = transformers_setup(self, p, self.backend, prefer="bfloat16")
        self.model = load_pretrained(tf.Sam3Model, p, self.backend, dtype=self.dtype, **kw).to(self.device).eval()
        self.processor = tf.Sam3Processor.from_pretrained(p.model, revision=p.revision)
        self.record = model_record(p.model, p.revision, architecture="transformers.Sam3Model",
                                   dtype=str(self.dtype).removeprefix("torch."), device=self.device)
        self.phrase_llm = None
        self._phrase_cache: dict[str, tuple[list[str], str]] = {}
        if p.phrases_llm is not None:
            from counterfactory.stages import get_backend

            self.phrase_llm = get_backend("qa", p.phrases_llm.backend)(params=p.phrases_llm.params, run=run)

    def describe(self) -> dict[str, Any]:
        models = {"sam3": self.record}
        if self.phrase_llm is not None:
            models["phrases"] = self.phrase_llm.describe().get("models", {"backend": self.phrase_llm.backend})
        return Stage.describe(self) | {"models": models}

    def _step(self, chunk: list[tuple[np.ndarray, list[str]]]) -> list[list[dict[str, Any]]]:
        """One micro-batch: encode the images once, then per phrase slot one prompt call on
        the images that have that many phrases; per image, per phrase: presence and instances."""
        import torch

        p = self.params
        images = [c[0] for c in chunk]
        inp = self.processor(images=images, return_tensors="pt")
        sizes = [tuple(int(v) for v in s) for s in inp["original_sizes"]]
        out: list[list[dict[str, Any]]] = [[] for _ in chunk]
        with torch.inference_mode():
            vision = self.model.get_vision_features(pixel_values=inp["pixel_values"].to(self.device, self.dtype))
            for k in range(max(len(c[1]) for c in chunk)):
                rows = [i for i, c in enumerate(chunk) if len(c[1]) > k]
                text = self.processor(text=[chunk[i][1][k] for i in rows], return_tensors="pt")
                res = self.model(vision_embeds=take(vision, rows), input_ids=text["input_ids"].to(self.device),
                                 attention_mask=text["attention_mask"].to(self.device))
                presence = res.presence_logits.float().sigmoid()[:, 0]
                probs = res.pred_logits.float().sigmoid()
                # keep the instances of present phrases, best first, at most max_instances; the
                # library's post-processing then resizes and binarizes only those masks
                keep = torch.zeros_like(probs, dtype=torch.bool)
                for j in range(len(rows)):
                    if presence[j] >= p.presence_threshold:
                        cand = torch.nonzero(probs[j] >= p.instance_threshold)[:, 0]
                        cand = cand[probs[j, cand].argsort(descending=True)][:p.max_instances]
                        keep[j, cand] = True
                res.pred_logits = torch.where(keep, res.pred_logits.float(), torch.finfo(torch.float32).min)
                res.presence_logits = None  # scores = query probability; presence is recorded apart
                res.pred_masks, res.pred_boxes = res.pred_masks.float(), res.pred_boxes.float()
                post = self.processor.post_process_instance_segmentation(
                    res, threshold=0.0, mask_threshold=p.mask_threshold, target_sizes=[sizes[i] for i in rows])
                for j, i in enumerate(rows):
                    r = post[j]
                    out[i].append({"phrase": chunk[i][1][k], "presence": float(presence[j]),
                                   "scores": r["scores"].cpu().numpy(), "boxes": r["boxes"].cpu().numpy(),
                                   "masks": r["masks"].cpu().numpy().astype(np.uint8)})
        return out

    def process_batch(self, samples: list[Sample]) -> None:
        todo = self._phrased(samples)
        if not todo:
            return
        run = run_batched(self._step, [(s.arrays["image"], t) for s, t in todo], self.params.batch_size)
        for i, (s, targets) in enumerate(todo):
            if i in run.failures:
                s.reject(self.name, *run.failures[i])
                continue
            self.guarded(s, lambda smp, r=run.outputs[i], t=targets: self._instances(smp, t, r))

    def _instances(self, s: Sample, targets: list[str], per_phrase: list[dict[str, Any]]) -> None:
        p = self.params
        m = s.meta
        h, w = s.arrays["image"].shape[:2]
        instances, masks, scores = [], [], []
        for r in per_phrase:
            for score, bx, mk in sorted(zip(r["scores"], r["boxes"], r["masks"], strict=True), key=lambda t: -t[0]):
                if int(mk.sum()) < p.min_mask_px:
                    continue
                ys, xs = np.nonzero(mk)  # the box of the mask: it is what the edit touches
                box = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
                if min(box[2] - box[0], box[3] - box[1]) < p.min_box_side:
                    continue
                instances.append({"category": r["phrase"], "box": box, "attributes": {},
                                  "score": round(float(score), 4), "detector": self.backend,
                                  "model_box": [round(float(c), 2) for c in np.clip(bx, 0, [w, h, w, h])],
                                  "mask_method": "sam3", "mask_area": int(mk.sum())})
                masks.append(mk)
                scores.append(float(score))
        m["presence"] = {r["phrase"]: round(r["presence"], 4) for r in per_phrase}
        if not instances:
            raise Reject("target_not_found", f"sam3 found none of {targets}: presence {m['presence']} "
                         f"(presence_threshold={p.presence_threshold}, instance_threshold={p.instance_threshold})")
        order = sorted(range(len(instances)), key=lambda j: -scores[j])[:p.max_instances]  # unrounded: no ties
        m["instances"] = [instances[j] for j in order]
        m["targets"] = sorted({i["category"] for i in m["instances"]}, key=targets.index)
        m.pop("objects", None)
        s.arrays["instance_masks"] = np.stack([masks[j] for j in order])  # 0/1 per instance


@register
class Sam3Segment(Stage):
    """The masks SAM 3 found in localize, merged and dilated like the classical segment's."""

    name = "segment"
    backend = "sam3"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        dilate_px: int = Field(4, ge=0, description="fixed dilation margin in pixels")
        dilate_frac: float = Field(0.03, ge=0, le=0.5, description="extra margin as a share of sqrt(median instance area)")

    def process(self, sample: Sample) -> None:
        inst = sample.arrays.get("instance_masks")
        instances = sample.meta["instances"]
        if inst is None or len(inst) != len(instances):
            raise Reject("no_instance_masks", "segment: sam3 uses the masks of localize: sam3 "
                         "(this sample's instances came without them)")
        core = (inst.max(axis=0) > 0).astype(np.uint8)
        set_evidence_mask(sample, core, self.params.dilate_px, self.params.dilate_frac)
