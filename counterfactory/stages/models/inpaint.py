"""edit with ``diffusers`` inpainting: ``remove`` (the evidence painted over with background),
``attribute`` (the evidence repainted with a new value named by a prompt, e.g. a color) and
``insert`` (an object no annotation names, painted into a region clear of every annotated
object: HalluciDoctor's existence edit with a generative model),
plus the flat-fill ``blackout`` and ``random_mask`` control of the classical default.

Diffusion runs on a square crop around the dilated mask, resized to the model's native
resolution, and only pixels inside the mask are pasted back: everything outside the mask is the
original, bit for bit. Each (sample, variant) is seeded from ``sample.seed``; jobs of a batch run
together through the pipeline (CUDA out-of-memory halves the micro-batch).
"""

from __future__ import annotations

import inspect
from typing import Any, Literal

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from counterfactory.pipeline.sample import Sample, Stage
from counterfactory.stages import register
from counterfactory.stages.edit import Skip, annotated_mask, control_mask, place_shape
from counterfactory.stages.models.common import (
    ModelParams,
    model_record,
    place,
    require,
    run_batched,
)

Variant = Literal["remove", "attribute", "replace", "insert", "blackout", "random_mask"]
_DIFFUSED = ("remove", "attribute", "replace", "insert")
Scheduler = Literal["default", "ddim", "dpmpp", "euler", "euler_a", "pndm", "unipc"]
_SCHEDULERS = {"ddim": "DDIMScheduler", "dpmpp": "DPMSolverMultistepScheduler", "euler": "EulerDiscreteScheduler",
               "euler_a": "EulerAncestralDiscreteScheduler", "pndm": "PNDMScheduler", "unipc": "UniPCMultistepScheduler"}
_SEED_OFFSET = {"remove": 0, "attribute": 1, "insert": 2, "replace": 3}


class PromptTemplate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str
    negative: str = ""


DEFAULT_PROMPTS = {
    "remove": PromptTemplate(prompt="empty background, seamless natural continuation of the surroundings",
                             negative="{target}, object, person, animal, text, watermark, blurry"),
    "attribute": PromptTemplate(prompt="a {value} {target}, photorealistic", negative="{old_value} {target}, blurry"),
    "replace": PromptTemplate(prompt="a {value}, photorealistic, natural lighting",
                              negative="{target}, text, watermark, blurry, deformed"),
    "insert": PromptTemplate(prompt="a {value}, photorealistic, natural lighting, in the scene",
                             negative="text, watermark, blurry, deformed"),
}


def crop_box(mask: np.ndarray, margin: float, min_side: int) -> tuple[int, int, int, int]:
    """A square (where the image allows) around the mask's bounding box plus a margin."""
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    bx0, by0, bx1, by1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    side = max(bx1 - bx0, by1 - by0)
    side = int(max(min_side, side + 2 * (margin * side + 8)))
    cw, ch = min(side, w), min(side, h)
    cx, cy = (bx0 + bx1) / 2, (by0 + by1) / 2
    x0 = int(np.clip(round(cx - cw / 2), 0, w - cw))
    y0 = int(np.clip(round(cy - ch / 2), 0, h - ch))
    return x0, y0, x0 + cw, y0 + ch


def paste(img: np.ndarray, mask: np.ndarray, box: tuple[int, int, int, int], painted: np.ndarray) -> np.ndarray:
    """``painted`` (any size, RGB uint8) resized into ``box`` and copied inside the mask only."""
    x0, y0, x1, y1 = box
    cw, ch = x1 - x0, y1 - y0
    interp = cv2.INTER_AREA if painted.shape[0] > ch else cv2.INTER_CUBIC
    back = cv2.resize(painted, (cw, ch), interpolation=interp)
    out = img.copy()
    sel = mask[y0:y1, x0:x1] > 0
    out[y0:y1, x0:x1][sel] = back[sel]
    return out


@register
class DiffusersInpaintEdit(Stage):
    name = "edit"
    backend = "diffusers-inpaint"
    stateful = True

    class Params(ModelParams):
        pipeline_class: str | None = Field(None, description="diffusers class, e.g. FluxFillPipeline; "
                                           "default: AutoPipelineForInpainting picks from the model")
        variants: list[Variant] = Field(["remove", "blackout", "random_mask"], min_length=1)
        steps: int = Field(25, ge=1, le=200)
        scheduler: Scheduler = "default"
        guidance_scale: float = Field(7.5, ge=0)
        strength: float = Field(1.0, gt=0, le=1)
        native_size: int | None = Field(None, ge=8, description="default: the model's sample size")
        crop: bool = Field(True, description="inpaint a crop around the mask (False: the whole image)")
        crop_margin: float = Field(0.5, ge=0, description="context around the mask, share of its size")
        prompts: dict[Literal["remove", "attribute", "replace", "insert"], PromptTemplate] = Field(
            default_factory=lambda: dict(DEFAULT_PROMPTS))
        insert_categories: list[str] = Field(["cat", "dog", "bird", "cup", "bottle", "ball", "chair", "vase"],
                                             min_length=1, description="objects insert and replace may paint")
        insert_scale: float = Field(0.15, gt=0, le=0.5, description="inserted region radius / min(image side)")
        insert_tries: int = Field(64, ge=1)
        attribute_values: list[str] = Field(["red", "green", "blue", "yellow", "purple", "orange", "white", "black"],
                                            min_length=2, description="new colors for the attribute edit")
        fill: tuple[int, int, int] = (0, 0, 0)
        control_tries: int = Field(64, ge=1)
        control_gap: int = Field(4, ge=0)
        batch_size: int = Field(4, ge=1)

    def __init__(self, params=None, run=None) -> None:
        super().__init__(params, run)
        require("torch", "torch", self.backend)
        diffusers = require("diffusers", "diffusers>=0.30", self.backend)
        require("transformers", "transformers>=4.45", self.backend)
        p = self.params
        place(self, p.model, p.device, p.dtype)
        if p.pipeline_class:
            cls = getattr(diffusers, p.pipeline_class, None)
            if cls is None or not p.pipeline_class.endswith(("InpaintPipeline", "FillPipeline")):
                raise ValueError(f"pipeline_class {p.pipeline_class!r} is not a diffusers inpainting pipeline")
        else:
            cls = diffusers.AutoPipelineForInpainting
        # diffusers renamed torch_dtype to dtype (0.42 warns on the old name; older ones lack the new)
        dtype_kw = "dtype" if hasattr(diffusers.pipelines.pipeline_utils, "_resolve_dtype") else "torch_dtype"
        pipe = cls.from_pretrained(p.model, revision=p.revision, **{dtype_kw: self.dtype}, use_safetensors=True,
                                   trust_remote_code=p.trust_remote_code)
        if p.scheduler != "default":
            pipe.scheduler = getattr(diffusers, _SCHEDULERS[p.scheduler]).from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(self.device)
        self.call_args = set(inspect.signature(self.pipe.__call__).parameters)
        if p.native_size:
            self.native = p.native_size
        elif getattr(pipe, "unet", None) is not None:
            self.native = int(pipe.unet.config.sample_size * pipe.vae_scale_factor)
        else:
            self.native = 1024
        self.record = model_record(p.model, p.revision, pipeline=type(self.pipe).__name__,
                                   scheduler=type(self.pipe.scheduler).__name__, native_size=self.native,
                                   dtype=str(self.dtype).removeprefix("torch."), device=self.device)

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"models": {"inpaint": self.record}}

    # --- diffusion jobs ------------------------------------------------------------------
    def _prepare(self, s: Sample, v: str) -> dict[str, Any]:
        img, mask = s.arrays["image"], s.arrays["mask"]
        h, w = mask.shape
        insert: dict[str, Any] = {}
        if v == "insert":
            rng = np.random.default_rng([s.seed, 17])
            present = {a["category"] for a in s.meta.get("annotated", [])} | set(s.meta["targets"])
            choices = [c for c in self.params.insert_categories if c not in present]
            if not choices:
                raise Skip("not_applicable", "every insert category is already annotated in this image")
            cat = choices[int(rng.integers(len(choices)))]
            _, _, mask = place_shape(s, "circle", max(8.0, self.params.insert_scale * min(h, w)), rng,
                                     self.params.insert_tries)
            insert = {"affects": [cat], "inserted_category": cat, "inserted_instances": 1, "region": "inserted",
                      "removed_instances": 0}
        box = crop_box(mask, self.params.crop_margin, 64) if self.params.crop else (0, 0, w, h)
        x0, y0, x1, y1 = box
        n = self.native
        crop = cv2.resize(img[y0:y1, x0:x1], (n, n), interpolation=cv2.INTER_AREA if x1 - x0 > n else cv2.INTER_CUBIC)
        cm = cv2.resize(mask[y0:y1, x0:x1], (n, n), interpolation=cv2.INTER_NEAREST)
        cm = cv2.dilate(cm, np.ones((3, 3), np.uint8))  # cover edges lost to resizing
        target = s.meta.get("target_phrase") or " and ".join(s.meta["targets"])
        fmt: dict[str, str] = {"target": target, "value": "", "old_value": ""}
        info: dict[str, Any] = {"region": "evidence", "crop_box": list(box), "affects": s.meta["targets"]}
        if v == "insert":
            fmt["value"] = insert["inserted_category"]
            info.update(insert)
        elif v == "replace":
            rng = np.random.default_rng([s.seed, 23])
            present = {a["category"] for a in s.meta.get("annotated", [])} | set(s.meta["targets"])
            choices = [c for c in self.params.insert_categories if c not in present]
            if not choices:
                raise Skip("not_applicable", "every replacement category is already annotated in this image")
            new = choices[int(rng.integers(len(choices)))]
            fmt["value"] = new
            n = len(s.meta["instances"])
            info.update(affects=[*s.meta["targets"], new], removed_instances=n, inserted_category=new,
                        inserted_instances=n)
        elif v == "attribute":
            olds = {str(i.get("attributes", {}).get("color", "")).lower() for i in s.meta["instances"]} - {""}
            choices = [c for c in self.params.attribute_values if c.lower() not in olds]
            rng = np.random.default_rng([s.seed, 11])
            fmt["value"] = str(choices[int(rng.integers(len(choices)))])
            fmt["old_value"] = " or ".join(sorted(olds))
            info.update(attribute="color", new_value=fmt["value"], removed_instances=0)
        else:
            info["removed_instances"] = len(s.meta["instances"])
        tpl = self.params.prompts.get(v, DEFAULT_PROMPTS[v])
        info["prompt"] = tpl.prompt.format(**fmt)
        info["negative_prompt"] = tpl.negative.format(**fmt)
        return {"sample": s, "variant": v, "box": box, "crop": crop, "mask": cm, "info": info, "full_mask": mask,
                "seed": (s.seed + _SEED_OFFSET[v]) % 2**32}

    def _diffuse(self, jobs: list[dict[str, Any]]) -> list[np.ndarray]:
        import torch
        from PIL import Image

        p = self.params
        kw: dict[str, Any] = {
            "prompt": [j["info"]["prompt"] for j in jobs],
            "image": [Image.fromarray(j["crop"]) for j in jobs],
            "mask_image": [Image.fromarray(j["mask"]) for j in jobs],
            "height": self.native, "width": self.native, "num_inference_steps": p.steps,
            "guidance_scale": p.guidance_scale, "output_type": "np",
            # CPU generators: the same noise for a seed on any device and at any batch size
            "generator": [torch.Generator("cpu").manual_seed(j["seed"]) for j in jobs],
        }
        if "negative_prompt" in self.call_args and p.guidance_scale > 1:
            kw["negative_prompt"] = [j["info"]["negative_prompt"] for j in jobs]
        if "strength" in self.call_args:
            kw["strength"] = p.strength
        images = self.pipe(**kw).images
        return [np.clip(np.asarray(im) * 255 + 0.5, 0, 255).astype(np.uint8) for im in images]

    def process_batch(self, samples: list[Sample]) -> None:
        p = self.params
        jobs = []
        skipped: dict[tuple[int, str], Any] = {}
        for s in samples:
            s.meta["variants"], s.meta["edits"] = [], {}
            for v in p.variants:
                if v in _DIFFUSED:
                    try:
                        jobs.append(self._prepare(s, v))
                    except Skip as skip:
                        skipped[(id(s), v)] = (None, None, (skip.reason, skip.detail))
        run = run_batched(self._diffuse, jobs, p.batch_size)
        done: dict[tuple[int, str], Any] = dict(skipped)
        for i, job in enumerate(jobs):
            done[(id(job["sample"]), job["variant"])] = (job, run.outputs[i], run.failures.get(i))
        for s in samples:
            self.guarded(s, lambda smp: self._assemble(smp, done))

    def _assemble(self, s: Sample, done: dict[tuple[int, str], Any]) -> None:
        p = self.params
        img, mask = s.arrays["image"], s.arrays["mask"]
        fill = np.array(p.fill, np.uint8)
        n = len(s.meta["instances"])
        for v in p.variants:
            if v in _DIFFUSED:
                job, painted, failure = done[(id(s), v)]
                if failure is not None:
                    s.meta.setdefault("variant_rejects", []).append(
                        {"stage": self.name, "variant": v, "reason": failure[0], "detail": failure[1][:500]})
                    continue
                out = paste(img, job["full_mask"], job["box"], painted)
                if v == "insert":
                    s.arrays["mask/insert"] = job["full_mask"]
                info = job["info"] | {"method": f"diffusers:{self.record['pipeline']}", "steps": p.steps,
                                      "seed": job["seed"]}
            elif v == "blackout":
                out = img.copy()
                out[mask > 0] = fill
                info = {"region": "evidence", "removed_instances": n, "method": "flat-fill",
                        "affects": s.meta["targets"]}
            else:
                rng = np.random.default_rng([s.seed, 7])
                # issue 16: a neutral shape clear of every annotated object, not only the evidence
                ctrl = control_mask(mask, rng, p.control_tries, p.control_gap, annotated_mask(s))
                if ctrl is None:
                    s.reject_variant(self.name, v, "no_room_for_control",
                                     f"no region of area {int((mask > 0).sum())} clear of the evidence")
                    continue
                out = img.copy()
                out[ctrl > 0] = fill
                s.arrays["mask/random_mask"] = ctrl
                info = {"region": "control", "removed_instances": 0, "method": "flat-fill", "affects": []}
            s.arrays[f"variant/{v}"] = out
            s.meta["variants"].append(v)
            s.meta["edits"][v] = info
