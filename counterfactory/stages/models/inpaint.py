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
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from counterfactory.sample import Sample, Stage
from counterfactory.stages import register
from counterfactory.stages.models.common import (
    ModelParams,
    SplitStage,
    channels_last,
    maybe_compile,
    model_record,
    place,
    refuse_pickles,
    require,
    run_batched,
)
from counterfactory.stages.shared import (
    FlatFillParams,
    Skip,
    control_variant,
    flat_fill,
    place_shape,
)

Variant = Literal["remove", "attribute", "replace", "insert", "blackout", "random_mask"]
_DIFFUSED = ("remove", "attribute", "replace", "insert")
# scheduler name -> (diffusers class, config overrides). The trailing-spacing entries are what
# few-step (distilled, "Lightning"/Hyper-SD style) checkpoints are sampled with; lcm and tcd are
# the schedulers of LCM/TCD-distilled models and LoRAs (e.g. LCM-LoRA at 4 steps, guidance 1).
_SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddim_trailing": ("DDIMScheduler", {"timestep_spacing": "trailing"}),
    "dpmpp": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpmpp_trailing": ("DPMSolverMultistepScheduler", {"timestep_spacing": "trailing"}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_trailing": ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),
    "lightning": ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    "tcd": ("TCDScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
Scheduler = Literal["default", "ddim", "ddim_trailing", "dpmpp", "dpmpp_karras", "dpmpp_trailing", "euler",
                    "euler_trailing", "lightning", "euler_a", "lcm", "tcd", "pndm", "unipc"]
_SEED_OFFSET = {"remove": 0, "attribute": 1, "insert": 2, "replace": 3}


class PromptTemplate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str
    negative: str = ""


class LoraSpec(BaseModel):
    """A LoRA adapter fused into the pipeline at load (LCM-LoRA, a removal fine-tune shipped as a
    LoRA, ...): a hub id (``revision`` pinned and recorded) or a local folder/file of safetensors."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(description="hub id or local folder / .safetensors file")
    revision: str | None = None
    weight_name: str | None = Field(None, description="file inside the folder or repo, when it holds several")
    scale: float = Field(1.0, description="strength the adapter is fused with")

    @field_validator("id")
    @classmethod
    def _safetensors_only(cls, v: str) -> str:
        """A local LoRA must exist and hold safetensors: checked when the config is read, so a
        wrong path is one line before any model loads."""
        try:
            refuse_pickles(v)
        except FileNotFoundError as exc:  # pydantic reports ValueErrors as config errors
            raise ValueError(str(exc)) from None
        p = Path(v).expanduser()
        if p.is_dir() and not any(f.suffix == ".safetensors" for f in p.rglob("*")):
            raise ValueError(f"{v}: no .safetensors file in this LoRA folder")
        return v


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


def native_from_config(p: Any) -> int:
    """The square the pipeline paints at, read from the folder's configs without loading a
    weight (the host parts crop to it in CPU steps): the UNet's sample size times the VAE's
    scale factor, as the pipeline computes it; 1024 for a transformer pipeline (FLUX Fill)."""
    if p.native_size:
        return p.native_size
    import diffusers

    try:
        unet = diffusers.UNet2DConditionModel.load_config(p.model, subfolder="unet", revision=p.revision)
    except OSError:
        return 1024
    try:
        vae = diffusers.AutoencoderKL.load_config(p.model, subfolder="vae", revision=p.revision)
        scale = 2 ** (len(vae["block_out_channels"]) - 1)
    except OSError:
        scale = 8
    return int(unet["sample_size"] * scale)


_TMP = "_edit"  # meta key and array prefix of the jobs between the host parts and the model part


@register
class DiffusersInpaintEdit(SplitStage, Stage):
    name = "edit"
    backend = "diffusers-inpaint"
    stateful = True
    # crops resized to the native square before, paste-back and the flat-fill controls after:
    # CPU steps beside the actor, which only diffuses
    host_parts = ("before", "after")

    class Params(FlatFillParams, ModelParams):
        flat_fill_after = ("attribute_values", "fill")  # where config.yaml lists the flat-fill fields
        pipeline_class: str | None = Field(None, description="diffusers class, e.g. FluxFillPipeline; "
                                           "default: AutoPipelineForInpainting picks from the model")
        variants: list[Variant] = Field(["remove", "blackout", "random_mask"], min_length=1)
        steps: int = Field(25, ge=1, le=200)
        scheduler: Scheduler = Field("default", description="by name; lcm/tcd/*_trailing for few-step models")
        guidance_scale: float = Field(7.5, ge=0, description="<= 1: no classifier-free guidance, one UNet pass "
                                      "per step instead of two (distilled/LCM/Lightning models)")
        loras: list[LoraSpec] = Field(default_factory=list, description="LoRA adapters fused at load")
        vae: Literal["default", "tiny"] = Field("default", description="tiny: AutoencoderTiny (TAESD) from vae_path")
        vae_path: str | None = Field(None, description="AutoencoderTiny weights (hub id or folder) for vae: tiny")
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
        batch_size: int = Field(4, ge=1)

        @model_validator(mode="after")
        def _tiny_vae_has_weights(self):
            if self.vae == "tiny" and not self.vae_path:
                raise ValueError("vae: tiny needs vae_path (an AutoencoderTiny folder or hub id, e.g. madebyollin/taesd)")
            if self.vae_path:
                try:
                    refuse_pickles(self.vae_path)
                except FileNotFoundError as exc:
                    raise ValueError(str(exc)) from None
            return self

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
            cls_name, overrides = _SCHEDULERS[p.scheduler]
            pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **overrides)
        loras = self._fuse_loras(pipe, p.loras) if p.loras else []
        vae_rec = None
        if p.vae == "tiny":
            pipe.vae = diffusers.AutoencoderTiny.from_pretrained(p.vae_path, **{dtype_kw: self.dtype},
                                                                 use_safetensors=True)
            vae_rec = model_record(p.vae_path, None, architecture="AutoencoderTiny")
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(self.device)
        for name in ("unet", "transformer", "vae"):
            if getattr(pipe, name, None) is not None:
                channels_last(getattr(pipe, name), self.device)
        if getattr(pipe, "unet", None) is not None:
            pipe.unet = maybe_compile(pipe.unet, p.compile, self.device, "the inpainting UNet")
        elif getattr(pipe, "transformer", None) is not None:
            pipe.transformer = maybe_compile(pipe.transformer, p.compile, self.device, "the inpainting transformer")
        self.call_args = set(inspect.signature(self.pipe.__call__).parameters)
        # one UNet pass per step without guidance: the pipeline skips the unconditional branch
        # when guidance_scale <= 1 (or for guidance-distilled UNets with time_cond_proj_dim)
        self.cfg = p.guidance_scale > 1
        self._embeds: dict[tuple[str, str], Any] = {}
        if p.native_size:
            self.native = p.native_size
        elif getattr(pipe, "unet", None) is not None:
            self.native = int(pipe.unet.config.sample_size * pipe.vae_scale_factor)
        else:
            self.native = 1024
        self.record = model_record(p.model, p.revision, pipeline=type(self.pipe).__name__,
                                   scheduler=type(self.pipe.scheduler).__name__, native_size=self.native,
                                   dtype=str(self.dtype).removeprefix("torch."), device=self.device,
                                   guidance="cfg" if self.cfg else "none", compiled=p.compile and self.device == "cuda")
        spacing = getattr(self.pipe.scheduler.config, "timestep_spacing", None)
        if spacing:
            self.record["timestep_spacing"] = spacing
        if loras:
            self.record["loras"] = loras
        if vae_rec:
            self.record["vae"] = vae_rec

    @staticmethod
    def _fuse_loras(pipe: Any, specs: list[LoraSpec]) -> list[dict[str, Any]]:
        """Load each adapter, check that it landed on this pipeline's modules (a LoRA made for
        another base model matches no key or no shape: refused in one line), fuse them into the
        weights at their scales and drop the adapter layers, so inference costs what the base does."""
        names, records = [], []
        for i, spec in enumerate(specs):
            name = f"lora{i}"
            ref, weight_name = spec.id, spec.weight_name
            p = Path(ref).expanduser()
            if p.is_file():
                ref, weight_name = str(p.parent), p.name
            try:
                pipe.load_lora_weights(ref, weight_name=weight_name, revision=spec.revision, adapter_name=name,
                                       use_safetensors=True)
            except (RuntimeError, ValueError, KeyError) as exc:
                why = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
                raise ValueError(f"LoRA {spec.id}: does not fit this {type(pipe).__name__} "
                                 f"(a LoRA for another base model?): {why}") from None
            placed = [comp for comp, ads in pipe.get_list_adapters().items() if name in ads]
            if not placed:
                raise ValueError(f"LoRA {spec.id}: none of its keys match this {type(pipe).__name__} "
                                 "(a LoRA for another base model?)")
            names.append(name)
            rec = model_record(spec.id, spec.revision, scale=spec.scale, modules=sorted(placed))
            if weight_name:
                rec["weight_name"] = weight_name
            records.append(rec)
        pipe.set_adapters(names, adapter_weights=[s.scale for s in specs])
        pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
        pipe.unload_lora_weights()  # the fused weights stay; the peft layers (an extra matmul each) go
        return records

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

    def _prompt_embeds(self, jobs: list[dict[str, Any]]) -> dict[str, Any] | None:
        """Text embeddings of each distinct (prompt, negative) encoded once for the actor's life:
        a remove prompt is the same for every sample, so the text encoder leaves the hot path.
        Each is encoded alone (batch 1), so its bits do not depend on what it was batched with.
        None where the pipeline has no SD-style ``encode_prompt`` (strings are passed then)."""
        import torch

        enc = getattr(self.pipe, "encode_prompt", None)
        if enc is None or "prompt_embeds" not in self.call_args or \
                "do_classifier_free_guidance" not in inspect.signature(enc).parameters:
            return None
        # by keyword: SD 1.5's encode_prompt takes (prompt, device, ...), SDXL's (prompt, prompt_2,
        # device, ...) and returns the pooled embeddings too (which its pipeline then requires)
        names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
        got: dict[str, list[Any]] = {}
        for j in jobs:
            key = (j["info"]["prompt"], j["info"]["negative_prompt"] if self.cfg else "")
            if key not in self._embeds:
                with torch.inference_mode():
                    res = enc(prompt=key[0], device=self.device, num_images_per_prompt=1,
                              do_classifier_free_guidance=self.cfg, negative_prompt=key[1] or None)
                self._embeds[key] = dict(zip(names, res, strict=False))
            for name, t in self._embeds[key].items():
                got.setdefault(name, []).append(t)
        return {name: torch.cat(ts) for name, ts in got.items()
                if (self.cfg or not name.startswith("negative")) and ts[0] is not None}

    def _diffuse(self, jobs: list[dict[str, Any]]) -> list[np.ndarray]:
        """One pipeline call for a micro-batch. Crops and masks go to the device as uint8 and
        are scaled there (no PIL round trip per image); the images come back as one uint8 copy."""
        import torch

        p = self.params
        crops = torch.from_numpy(np.stack([j["crop"] for j in jobs])).to(self.device, non_blocking=True)
        masks = torch.from_numpy(np.stack([j["mask"] for j in jobs])).to(self.device, non_blocking=True)
        kw: dict[str, Any] = {
            "image": crops.permute(0, 3, 1, 2).float().div_(255),  # (B, 3, n, n) in [0, 1]
            "mask_image": masks[:, None].float().div_(255),  # (B, 1, n, n) in {0, 1}
            "height": self.native, "width": self.native, "num_inference_steps": p.steps,
            "guidance_scale": p.guidance_scale, "output_type": "pt",
            # CPU generators: the same noise for a seed on any device and at any batch size
            "generator": [torch.Generator("cpu").manual_seed(j["seed"]) for j in jobs],
        }
        embeds = self._prompt_embeds(jobs)
        if embeds is not None:
            kw.update(embeds)
        else:
            kw["prompt"] = [j["info"]["prompt"] for j in jobs]
            if "negative_prompt" in self.call_args and self.cfg:
                kw["negative_prompt"] = [j["info"]["negative_prompt"] for j in jobs]
        if "strength" in self.call_args:
            kw["strength"] = p.strength
        with torch.inference_mode():
            images = self.pipe(**kw).images  # (B, 3, n, n) float in [0, 1], on the device
            out = (images.float() * 255 + 0.5).clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return list(out)

    def _init_host(self) -> None:
        self.native = native_from_config(self.params)

    def host_before(self, samples: list[Sample]) -> None:
        for s in samples:
            self.guarded(s, self._plan_jobs)

    def _plan_jobs(self, s: Sample) -> None:
        """Each diffused variant's crop and mask at the native square (or why it is skipped),
        kept on the sample for the model part: ``meta[_TMP]`` and ``_edit/...`` arrays."""
        s.begin_variants()
        plan: dict[str, Any] = {}
        for v in self.params.variants:
            if v not in _DIFFUSED:
                continue
            try:
                job = self._prepare(s, v)
            except Skip as skip:
                plan[v] = {"skip": [skip.reason, skip.detail]}
                continue
            plan[v] = {"box": list(job["box"]), "info": job["info"], "seed": job["seed"]}
            s.arrays[f"{_TMP}/crop/{v}"], s.arrays[f"{_TMP}/mask/{v}"] = job["crop"], job["mask"]
            if job["full_mask"] is not s.arrays["mask"]:  # insert: its own region
                s.arrays[f"{_TMP}/full_mask/{v}"] = job["full_mask"]
        s.meta[_TMP] = plan

    def model_batch(self, samples: list[Sample]) -> None:
        """Only the diffusion: every planned job of the batch through ``_diffuse`` (micro-batches
        halved on CUDA OOM), each painted crop kept on its sample for the host part after."""
        jobs = []
        for s in samples:
            plan = s.meta[_TMP]
            for v in self.params.variants:  # the config's order (meta keys come back sorted)
                j = plan.get(v)
                if j is None or "skip" in j:
                    continue
                jobs.append({"sample": s, "variant": v, "box": tuple(j["box"]), "info": j["info"], "seed": j["seed"],
                             "crop": s.arrays.pop(f"{_TMP}/crop/{v}"), "mask": s.arrays.pop(f"{_TMP}/mask/{v}")})
        run = run_batched(self._diffuse, jobs, self.params.batch_size)
        method = f"diffusers:{self.record['pipeline']}"
        for i, job in enumerate(jobs):
            s, v = job["sample"], job["variant"]
            if i in run.failures:
                s.meta[_TMP][v]["failure"] = list(run.failures[i])
            else:
                s.arrays[f"{_TMP}/painted/{v}"] = run.outputs[i]
                s.meta[_TMP][v]["method"] = method

    def host_after(self, samples: list[Sample]) -> None:
        for s in samples:
            plan = s.meta.pop(_TMP)
            done: dict[tuple[int, str], Any] = {}
            for v, j in plan.items():
                if "skip" in j:
                    done[(id(s), v)] = (None, None, tuple(j["skip"]))
                    continue
                job = j | {"box": tuple(j["box"]),
                           "full_mask": s.arrays.pop(f"{_TMP}/full_mask/{v}", s.arrays["mask"])}
                painted = s.arrays.pop(f"{_TMP}/painted/{v}", None)
                done[(id(s), v)] = (job, painted, tuple(j["failure"]) if "failure" in j else None)
            self.guarded(s, lambda smp, d=done: self._assemble(smp, d))

    def _assemble(self, s: Sample, done: dict[tuple[int, str], Any]) -> None:
        p = self.params
        img, mask = s.arrays["image"], s.arrays["mask"]
        n = len(s.meta["instances"])
        for v in p.variants:
            region = None
            if v in _DIFFUSED:
                job, painted, failure = done[(id(s), v)]
                if failure is not None:
                    s.reject_variant(self.name, v, failure[0], failure[1])
                    continue
                out = paste(img, job["full_mask"], job["box"], painted)
                if v == "insert":
                    region = job["full_mask"]
                info = job["info"] | {"method": job["method"], "steps": p.steps, "seed": job["seed"]}
            elif v == "blackout":
                out = flat_fill(img, mask, p.fill)
                info = {"region": "evidence", "removed_instances": n, "method": "flat-fill",
                        "affects": s.meta["targets"]}
            else:
                # issue 16: a neutral shape clear of every annotated object, not only the evidence
                try:
                    out, region, info = control_variant(s, p)
                except Skip as skip:
                    s.reject_variant(self.name, v, skip.reason, skip.detail)
                    continue
                info["removed_instances"] = 0
            s.add_variant(v, out, info, region)
