"""edit with removers built for removal (issue 31): diffusion inpainting often paints a new
object into the hole, and then the "no" of an existence question is false. These backends load
models trained to restore the background instead, each in its diffusers class:

- ``remover-sdxl``: ``StableDiffusionXLInpaintPipeline`` with few-step LCM/TCD sampling, the
  RORem recipe (an SDXL-inpainting fine-tune on 200K verified removal pairs, 4 steps with its
  LCM LoRA, no classifier-free guidance);
- ``remover-flux-fill``: ``FluxFillPipeline`` with a removal LoRA fused at load (one-step and
  few-step removers built on FLUX.1 Fill ship as LoRAs or fine-tunes of its transformer);
- ``remover-flux2-klein``: ``Flux2KleinInpaintPipeline``, FLUX.2 klein (4 B, Apache-2.0,
  distilled: 4 steps, no CFG) with an erase LoRA; the reference image the model also reads can
  be the crop with the object highlighted, or the mask, as the erase LoRA was trained.

Each is chosen by ``model`` + pinned ``revision`` (``counterfactory pin`` pins the LoRAs too),
and everything else is the ``diffusers-inpaint`` backend's, by inheritance: a square crop
around the dilated mask at the model's native size, per-(sample, variant) CPU generator seeds,
micro-batches halved on CUDA out-of-memory, the model loaded once per actor, the flat-fill
controls, and the paste-back inside the mask only (every pixel outside it stays the original).
What differs per family is loading checks and the text conditioning, encoded once per distinct
prompt for the actor's life (the text encoders leave the hot path).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field, field_validator

from counterfactory.stages import register
from counterfactory.stages.models.common import DType, require
from counterfactory.stages.models.inpaint import DiffusersInpaintEdit, LoraSpec, PromptTemplate

RemoverVariant = Literal["remove", "blackout", "random_mask"]
_REMOVER_PROMPT_KEYS = Literal["remove", "attribute", "replace", "insert"]


def folder_pipeline(ref: str, revision: str | None) -> str | None:
    """The pipeline class a diffusers folder (or hub repo) was saved by (its model_index.json)."""
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.load_config(ref, revision=revision).get("_class_name")


def lora_layers_missing(pipe: Any, spec: LoraSpec, have: set[str]) -> tuple[list[str], int]:
    """The transformer layers ``spec`` names (read as the pipeline's loader reads it, formats
    converted) that are not among the module names ``have``; and how many layers it names."""
    ref, weight_name = spec.id, spec.weight_name
    if Path(ref).expanduser().is_file():
        ref, weight_name = str(Path(ref).expanduser().parent), Path(ref).name
    sd = pipe.lora_state_dict(ref, weight_name=weight_name, revision=spec.revision, use_safetensors=True)
    sd = sd[0] if isinstance(sd, tuple) else sd
    layers = {re.split(r"\.lora(?:_A|_B|_magnitude_vector|\.down|\.up)\b", k.removeprefix("transformer."))[0]
              for k in sd if k.startswith("transformer.") and ".lora" in k}
    return sorted(layers - have), len(layers)


class RemoverEdit(DiffusersInpaintEdit):
    """What the three removers share; each subclass names its pipeline and how it is conditioned."""

    name = "edit"
    stateful = True
    pipeline: ClassVar[str]
    folders: ClassVar[frozenset[str]]  # pipelines whose saved folders hold this one's components
    min_diffusers: ClassVar[str]

    class Params(DiffusersInpaintEdit.Params):
        variants: list[RemoverVariant] = Field(["remove", "blackout", "random_mask"], min_length=1)

    def __init__(self, params=None, run=None) -> None:
        p = params if isinstance(params, self.Params) else self.Params.model_validate(params or {})
        diffusers = require("diffusers", f"diffusers>={self.min_diffusers}", self.backend)
        if not hasattr(diffusers, self.pipeline):
            raise ValueError(f"edit: {self.backend} needs diffusers' {self.pipeline}, which diffusers "
                             f"{diffusers.__version__} lacks: pip install -U 'diffusers>={self.min_diffusers}'")
        if p.loras:
            require("peft", "peft>=0.13", self.backend)
        got = folder_pipeline(p.model, p.revision)
        if got not in self.folders:  # one line before gigabytes of the wrong model are read
            raise ValueError(f"{p.model}: a '{got}' folder, but edit: {self.backend} loads {self.pipeline} "
                             f"(from a folder of {', '.join(sorted(self.folders))})")
        super().__init__(p, run)
        self.cfg = self._uses_cfg()
        self.record["guidance"] = self._guidance_kind()

    @staticmethod
    def _fuse_loras(pipe: Any, specs: list[LoraSpec]) -> list[dict[str, Any]]:
        """The inpaint backend's fusing, after checking that every layer a LoRA names exists in
        this pipeline's transformer: a LoRA for another FLUX (klein's 5 double blocks on FLUX.1's
        19, same widths) would load its matching layers and silently drop the rest."""
        if getattr(pipe, "transformer", None) is not None:
            have = {name for name, _ in pipe.transformer.named_modules()}
            for spec in specs:
                missing, total = lora_layers_missing(pipe, spec, have)
                if missing:
                    raise ValueError(f"LoRA {spec.id}: {len(missing)} of its {total} layers are not in this "
                                     f"{type(pipe).__name__}'s transformer (e.g. {missing[0]}): a LoRA for "
                                     "another base model?")
        return DiffusersInpaintEdit._fuse_loras(pipe, specs)

    def _uses_cfg(self) -> bool:
        return self.params.guidance_scale > 1

    def _guidance_kind(self) -> str:
        return "cfg" if self.cfg else "none"

    def _encode(self, prompt: str, negative: str) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _conditioning(self, jobs: list[dict[str, Any]]) -> dict[str, Any]:
        """Call arguments besides the text embeddings (none by default)."""
        return {}

    def _prompt_embeds(self, jobs: list[dict[str, Any]]) -> dict[str, Any]:
        """The pipeline's conditioning for a micro-batch as call arguments: each distinct
        (prompt, negative) encoded alone (batch 1, so its bits do not depend on its batch) once
        for the actor's life, stacked per job; plus what the family adds (``_conditioning``)."""
        import torch

        rows = []
        for j in jobs:
            key = (j["info"]["prompt"], j["info"]["negative_prompt"] if self.cfg else "")
            if key not in self._embeds:
                with torch.inference_mode():
                    self._embeds[key] = self._encode(*key)
            rows.append(self._embeds[key])
        out = {name: torch.cat([r[name] for r in rows]) for name in rows[0]}
        return out | self._conditioning(jobs)


RORem_PROMPT = PromptTemplate(
    prompt="4K, high quality, masterpiece, highly detailed, sharp focus, professional, photorealistic, realistic",
    negative="low quality, worst, bad proportions, blurry, deformed, disfigured, unclear background")


@register
class SdxlRemoverEdit(RemoverEdit):
    """RORem and other SDXL-inpainting removers: few-step LCM/TCD sampling without CFG."""

    backend = "remover-sdxl"
    pipeline = "StableDiffusionXLInpaintPipeline"
    folders = frozenset({"StableDiffusionXLInpaintPipeline", "StableDiffusionXLPipeline",
                         "StableDiffusionXLImg2ImgPipeline"})
    min_diffusers = "0.30"

    class Params(RemoverEdit.Params):
        pipeline_class: Literal["StableDiffusionXLInpaintPipeline"] = "StableDiffusionXLInpaintPipeline"
        steps: int = Field(4, ge=1, le=200, description="RORem-4S: 4 steps with its LCM LoRA")
        scheduler: Literal["default", "lcm", "tcd", "euler_trailing", "ddim_trailing", "dpmpp_trailing",
                           "lightning", "euler", "dpmpp"] = Field("lcm", description="lcm/tcd for LCM/TCD LoRAs")
        guidance_scale: float = Field(1.0, ge=0, description="<= 1: no classifier-free guidance (one UNet pass "
                                      "per step), as LCM/TCD-distilled removers are sampled")
        strength: float = Field(1.0, gt=0, le=1, description="below 1 drops steps: int(steps x strength) run "
                                "(RORem's 50-step recipe: 0.99; at 4 steps keep 1)")
        prompts: dict[_REMOVER_PROMPT_KEYS, PromptTemplate] = Field(
            default_factory=lambda: {"remove": RORem_PROMPT}, description="RORem: content-free quality words")

    def _encode(self, prompt: str, negative: str) -> dict[str, Any]:
        pe, ne, pooled, neg_pooled = self.pipe.encode_prompt(
            prompt=prompt, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=self.cfg,
            negative_prompt=negative or None)
        out = {"prompt_embeds": pe, "pooled_prompt_embeds": pooled}
        if self.cfg:
            out.update(negative_prompt_embeds=ne, negative_pooled_prompt_embeds=neg_pooled)
        return out


FILL_PROMPT = PromptTemplate(prompt="empty background, seamless natural continuation of the surroundings")


class FluxRemoverParams(RemoverEdit.Params):
    dtype: DType = Field("bfloat16", description="FLUX weights in bfloat16 on GPU (float16 overflows)")
    loras: list[LoraSpec] = Field(min_length=1, description="the removal LoRA(s): the base model fills a hole "
                                  "with whatever fits there, often a new object")
    max_sequence_length: int = Field(512, ge=8, le=1024, description="text tokens the prompt is encoded to")
    native_size: int | None = Field(1024, ge=16, description="crop side the model runs at (multiple of 16)")

    @field_validator("native_size")
    @classmethod
    def _whole_patches(cls, v: int | None) -> int | None:
        # the FLUX VAEs downsample 8x and the transformers read 2x2 latent patches: another side
        # would be floored by the pipeline and the crop pasted back resampled
        if v is not None and v % 16:
            raise ValueError(f"native_size {v} is not a multiple of 16 (FLUX: 8x VAE, 2x2 patches)")
        return v


@register
class FluxFillRemoverEdit(RemoverEdit):
    """FLUX.1 Fill with a removal LoRA; FLUX guidance is distilled into the model (an input of the
    transformer, not a second pass), so every step is one transformer pass."""

    backend = "remover-flux-fill"
    pipeline = "FluxFillPipeline"
    folders = frozenset({"FluxFillPipeline"})
    min_diffusers = "0.32"

    class Params(FluxRemoverParams):
        pipeline_class: Literal["FluxFillPipeline"] = "FluxFillPipeline"
        steps: int = Field(28, ge=1, le=200, description="one-step removers: 1")
        guidance_scale: float = Field(30.0, ge=0, description="FLUX Fill's distilled guidance (no CFG pass)")
        prompts: dict[_REMOVER_PROMPT_KEYS, PromptTemplate] = Field(
            default_factory=lambda: {"remove": FILL_PROMPT}, description="the LoRA's removal prompt")

    def _uses_cfg(self) -> bool:
        return False

    def _guidance_kind(self) -> str:
        return "distilled"

    def _encode(self, prompt: str, negative: str) -> dict[str, Any]:
        pe, pooled, _ = self.pipe.encode_prompt(prompt=prompt, prompt_2=None, device=self.device,
                                                num_images_per_prompt=1,
                                                max_sequence_length=self.params.max_sequence_length)
        return {"prompt_embeds": pe, "pooled_prompt_embeds": pooled}


KLEIN_PROMPT = PromptTemplate(prompt="Remove the {target}. Fill its place with the background around it, "
                              "keep everything else unchanged.")


@register
class Flux2KleinRemoverEdit(RemoverEdit):
    """FLUX.2 klein with an erase LoRA: the crop is denoised inside the mask only (the inpaint
    pipeline keeps the latents outside it), the model reading the crop, and optionally a
    reference image that shows it what to erase, as the LoRA was trained."""

    backend = "remover-flux2-klein"
    pipeline = "Flux2KleinInpaintPipeline"
    folders = frozenset({"Flux2KleinPipeline", "Flux2KleinInpaintPipeline", "Flux2KleinKVPipeline"})
    min_diffusers = "0.37"

    class Params(FluxRemoverParams):
        pipeline_class: Literal["Flux2KleinInpaintPipeline"] = "Flux2KleinInpaintPipeline"
        steps: int = Field(4, ge=1, le=200, description="klein (distilled): 4 steps")
        guidance_scale: float = Field(1.0, ge=0, description="ignored by the distilled klein (no CFG); a base "
                                      "(undistilled) klein runs CFG above 1")
        strength: float = Field(1.0, gt=0, le=1)
        reference: Literal["none", "highlight", "mask"] = Field(
            "none", description="second image the model reads: the crop with the region tinted (LoRAs trained "
            "on 'remove the highlighted object'), or the mask as RGB (white = erase)")
        highlight_color: tuple[int, int, int] = Field((255, 0, 0), description="RGB tint of reference: highlight")
        highlight_alpha: float = Field(0.5, gt=0, le=1)
        text_encoder_out_layers: list[int] = Field([9, 18, 27], min_length=1, description="Qwen3 hidden "
                                                   "states the prompt embedding stacks (klein 4B: 9, 18, 27)")
        prompts: dict[_REMOVER_PROMPT_KEYS, PromptTemplate] = Field(
            default_factory=lambda: {"remove": KLEIN_PROMPT}, description="the erase LoRA's prompt: {target}")

    def _uses_cfg(self) -> bool:
        return self.params.guidance_scale > 1 and not self.pipe.config.get("is_distilled", False)

    def _guidance_kind(self) -> str:
        return "cfg" if self.cfg else ("distilled" if self.pipe.config.get("is_distilled") else "none")

    def _encode(self, prompt: str, negative: str) -> dict[str, Any]:
        p = self.params
        kw = {"device": self.device, "num_images_per_prompt": 1, "max_sequence_length": p.max_sequence_length,
              "text_encoder_out_layers": tuple(p.text_encoder_out_layers)}
        out = {"prompt_embeds": self.pipe.encode_prompt(prompt=prompt, **kw)[0]}
        if self.cfg:  # the pipeline's negative is always the empty prompt
            out["negative_prompt_embeds"] = self.pipe.encode_prompt(prompt="", **kw)[0]
        return out

    def _conditioning(self, jobs: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        p = self.params
        out: dict[str, Any] = {"text_encoder_out_layers": tuple(p.text_encoder_out_layers),
                               "max_sequence_length": p.max_sequence_length}
        if p.reference == "none":
            return out
        masks = np.stack([j["mask"] for j in jobs]).astype(np.float32)[..., None] / 255  # (B, n, n, 1)
        if p.reference == "mask":
            ref = np.repeat(masks, 3, axis=3)
        else:
            crops = np.stack([j["crop"] for j in jobs]).astype(np.float32) / 255
            tint = np.asarray(p.highlight_color, np.float32) / 255
            ref = crops * (1 - p.highlight_alpha * masks) + tint * (p.highlight_alpha * masks)
        out["image_reference"] = torch.from_numpy(ref).permute(0, 3, 1, 2).to(self.device)  # (B, 3, n, n) in [0, 1]
        return out
