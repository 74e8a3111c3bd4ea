"""edit: instruction. Attribute and replace edits (and, as an option, removal) by an
instruction-following image editor: ``FluxKontextPipeline``, ``FluxKontextInpaintPipeline``,
``QwenImageEditPipeline`` ("make the cup blue", "replace the cup with a vase"), the way
DualityForge made its keyframe edits.

Everything but the model call is the ``diffusers-inpaint`` backend's, by inheritance: the
square crop around the dilated mask at the model's native size, the per-(sample, variant) CPU
generator seeds, the micro-batches halved on CUDA out-of-memory, the flat-fill controls, and the
paste-back INSIDE the mask only. An instruction editor may repaint the whole crop (Kontext and
Qwen-Image-Edit take no mask), but only the edit region is pasted back, so every pixel outside
it stays the original, bit for bit, and the pixel verify's ``outside_changed_frac`` is 0.
"""

from __future__ import annotations

import inspect
from typing import Any, Literal

from pydantic import Field

from counterfactory.sample import Stage
from counterfactory.stages import register
from counterfactory.stages.models.common import model_record, place, require
from counterfactory.stages.models.inpaint import DiffusersInpaintEdit, PromptTemplate

InstructPipeline = Literal["FluxKontextPipeline", "FluxKontextInpaintPipeline", "QwenImageEditPipeline",
                           "QwenImageEditPlusPipeline"]
InstructVariant = Literal["remove", "attribute", "replace", "blackout", "random_mask"]
# pipelines whose folders hold the same components (one can load the other's weights)
_FAMILIES = ({"FluxKontextPipeline", "FluxKontextInpaintPipeline"},
             {"QwenImageEditPipeline", "QwenImageEditPlusPipeline", "QwenImageEditInpaintPipeline"})

INSTRUCTIONS = {
    "remove": PromptTemplate(prompt="Remove the {target}. Fill its place with the background around it, "
                             "keep everything else unchanged.", negative=" "),
    "attribute": PromptTemplate(prompt="Make the {target} {value}. Keep its shape and everything else unchanged.",
                                negative=" "),
    "replace": PromptTemplate(prompt="Replace the {target} with a {value} of the same size. "
                              "Keep everything else unchanged.", negative=" "),
}


def check_pipeline_folder(ref: str, revision: str | None, want: str) -> None:
    """A folder saved by another pipeline is refused in one line before its weights are read."""
    from diffusers import DiffusionPipeline

    got = DiffusionPipeline.load_config(ref, revision=revision).get("_class_name")
    family = next((f for f in _FAMILIES if want in f), {want})
    if got not in family:
        raise ValueError(f"{ref}: a '{got}' folder, but edit: instruction loads {want} "
                         f"(one of {', '.join(sorted(family))})")


@register
class InstructionEdit(DiffusersInpaintEdit):
    name = "edit"
    backend = "instruction"
    stateful = True

    class Params(DiffusersInpaintEdit.Params):
        pipeline_class: InstructPipeline = "FluxKontextPipeline"
        variants: list[InstructVariant] = Field(["attribute", "replace", "blackout", "random_mask"], min_length=1)
        steps: int = Field(28, ge=1, le=200)
        guidance_scale: float = Field(2.5, ge=0, description="distilled guidance (Kontext)")
        true_cfg_scale: float = Field(4.0, ge=1, description="classifier-free guidance with the negative "
                                      "prompt (Qwen-Image-Edit, Kontext); 1 turns it off")
        max_sequence_length: int = Field(512, ge=8, le=1024)
        prompts: dict[Literal["remove", "attribute", "replace", "insert"], PromptTemplate] = Field(
            default_factory=lambda: dict(INSTRUCTIONS), description="instruction per variant: {target}, {value}")

    def __init__(self, params=None, run=None) -> None:
        Stage.__init__(self, params, run)  # the inpaint backend's loader picks inpainting pipelines only
        require("torch", "torch", self.backend)
        diffusers = require("diffusers", "diffusers>=0.35", self.backend)
        require("transformers", "transformers>=4.45", self.backend)
        p = self.params
        place(self, p.model, p.device, p.dtype, prefer="bfloat16")
        cls = getattr(diffusers, p.pipeline_class, None)
        if cls is None:
            raise ValueError(f"diffusers {diffusers.__version__} has no {p.pipeline_class}: pip install -U diffusers")
        check_pipeline_folder(p.model, p.revision, p.pipeline_class)
        dtype_kw = "dtype" if hasattr(diffusers.pipelines.pipeline_utils, "_resolve_dtype") else "torch_dtype"
        pipe = cls.from_pretrained(p.model, revision=p.revision, **{dtype_kw: self.dtype}, use_safetensors=True,
                                   trust_remote_code=p.trust_remote_code)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(self.device)
        self.call_args = set(inspect.signature(self.pipe.__call__).parameters)
        self.native = p.native_size or 1024  # both families are trained around one megapixel
        self.record = model_record(p.model, p.revision, pipeline=type(self.pipe).__name__,
                                   scheduler=type(self.pipe.scheduler).__name__, native_size=self.native,
                                   dtype=str(self.dtype).removeprefix("torch."), device=self.device)

    def _init_host(self) -> None:
        self.native = self.params.native_size or 1024

    def describe(self) -> dict[str, Any]:
        return Stage.describe(self) | {"models": {"instruction_edit": self.record}}

    def _diffuse(self, jobs: list[dict[str, Any]]) -> list:
        import numpy as np
        import torch
        from PIL import Image

        p, args = self.params, self.call_args
        kw: dict[str, Any] = {
            "prompt": [j["info"]["prompt"] for j in jobs],
            "image": [Image.fromarray(j["crop"]) for j in jobs],
            "height": self.native, "width": self.native, "num_inference_steps": p.steps, "output_type": "np",
            # CPU generators: the same noise for a seed on any device and at any batch size
            "generator": [torch.Generator("cpu").manual_seed(j["seed"]) for j in jobs],
        }
        if "mask_image" in args:  # Kontext-inpaint: the model also sees where to edit
            kw["mask_image"] = [Image.fromarray(j["mask"]) for j in jobs]
            kw["strength"] = p.strength
        if "guidance_scale" in args:
            kw["guidance_scale"] = p.guidance_scale
        if "true_cfg_scale" in args and p.true_cfg_scale > 1:
            kw["true_cfg_scale"] = p.true_cfg_scale
            kw["negative_prompt"] = [j["info"]["negative_prompt"] or " " for j in jobs]
        if "_auto_resize" in args:  # the crop is already the native square: no snapping to Kontext's list
            kw.update(_auto_resize=False, max_area=self.native * self.native)
        if "max_sequence_length" in args:
            kw["max_sequence_length"] = p.max_sequence_length
        images = self.pipe(**kw).images
        return [np.clip(np.asarray(im) * 255 + 0.5, 0, 255).astype(np.uint8) for im in images]

    def _assemble(self, s, done) -> None:
        super()._assemble(s, done)
        for info in s.meta["edits"].values():
            if info.get("method", "").startswith("diffusers:"):
                info["method"] = "instruction:" + info["method"].removeprefix("diffusers:")
                info["instruction"] = info["prompt"]
