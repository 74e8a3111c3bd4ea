"""edit for clips with ``diffusers``' ``WanVACEPipeline`` (video inpainting with per-frame masks):
``remove`` (the evidence painted over with background on every frame) and ``replace`` (the
evidence repainted as another kind of object, named by a prompt), plus the model-free
``blackout`` / ``random_mask`` / ``reverse`` / ``shuffle`` / ``freeze`` of the video default,
delegated to :class:`~counterfactory.stages.video.edit.VideoEdit` (one config has one edit backend).

Diffusion runs on a box around the union of the clip's masks over all frames (plus a margin,
with the model's aspect ratio where the frame allows), resized to the model's size; the masked
pixels of that crop are set to grey (VACE's "to be generated" convention) and the per-frame
masks tell the model where to paint. Only pixels inside each frame's own mask are pasted back:
everything outside the masks is the original, bit for bit.

Frame counts: the Wan VAE compresses time by 4, so a window holds ``4k + 1`` frames. A clip of
up to ``max_frames`` frames is one window, padded with its last frame (and mask) and trimmed
back. A longer clip is cut into near-equal windows that overlap by ``window_overlap`` frames and
are generated in order: the shared frames of a window are the previous window's output, given
to the model as known content (mask 0), so the fill continues instead of jumping; the shared
frames are then cross-faded linearly from the previous window's output to the new one. Each
(sample, variant, window) is seeded from ``sample.seed`` with a CPU generator, so the noise is
the same on any device. The pipeline generates one video per call.

Prompts are encoded here (tokenizer + text encoder, as the pipeline does, padded to
``max_sequence_length`` with zeros past the prompt) and passed as embeddings: the pipeline's own
prompt cleaning needs ``ftfy``, which nothing else here uses.
"""

from __future__ import annotations

from typing import Any, Literal

import cv2
import numpy as np
from pydantic import Field

from counterfactory.sample import Sample, Stage
from counterfactory.stages import register
from counterfactory.stages.models.common import (
    ModelParams,
    model_record,
    place,
    require,
    run_batched,
)
from counterfactory.stages.models.inpaint import PromptTemplate
from counterfactory.stages.shared import FlatFillParams, Skip
from counterfactory.stages.video.edit import VideoEdit

Variant = Literal["remove", "replace", "blackout", "random_mask", "reverse", "shuffle", "freeze"]
_DIFFUSED = ("remove", "replace")
_SEED_OFFSET = {"remove": 0, "replace": 3}
_GREY = 127

DEFAULT_PROMPTS = {
    "remove": PromptTemplate(prompt="empty background, seamless natural continuation of the surroundings, static scene",
                             negative="{target}, object, person, animal, text, watermark, blurry, flicker"),
    "replace": PromptTemplate(prompt="a {value} moving naturally, photorealistic, natural lighting",
                              negative="{target}, text, watermark, blurry, deformed, flicker"),
}


def video_crop_box(union: np.ndarray, margin: float, min_side: int, aspect: float) -> tuple[int, int, int, int]:
    """A box around ``union``'s bounding box plus a margin, widened to ``aspect`` (width/height)
    and to at least ``min_side``, as far as the frame allows; it always contains the bounding box."""
    h, w = union.shape
    ys, xs = np.nonzero(union)
    bx0, by0, bx1, by1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    pad = margin * max(bx1 - bx0, by1 - by0) + 8
    bw, bh = bx1 - bx0 + 2 * pad, by1 - by0 + 2 * pad
    bw, bh = max(bw, bh * aspect), max(bh, bw / aspect)
    if min(bw, bh) < min_side:
        k = min_side / min(bw, bh)
        bw, bh = bw * k, bh * k
    cw, ch = min(int(round(bw)), w), min(int(round(bh)), h)
    cx, cy = (bx0 + bx1) / 2, (by0 + by1) / 2
    x0 = int(np.clip(round(cx - cw / 2), 0, w - cw))
    y0 = int(np.clip(round(cy - ch / 2), 0, h - ch))
    return x0, y0, x0 + cw, y0 + ch


def windows(n: int, max_frames: int, overlap: int = 0) -> list[tuple[int, int]]:
    """``n`` frames cut into the fewest near-equal windows of at most ``max_frames``, each
    sharing ``overlap`` frames with the previous one (``overlap < max_frames``)."""
    if n <= max_frames:
        return [(0, n)]
    k = -(-(n - overlap) // (max_frames - overlap))
    starts = [round(i * (n - overlap) / k) for i in range(k)]
    ends = [*(st + overlap for st in starts[1:]), n]
    return list(zip(starts, ends, strict=True))


def padded_length(n: int, temporal: int) -> int:
    """The smallest ``temporal * k + 1`` frame count at or above ``n``."""
    return -(-max(n - 1, 0) // temporal) * temporal + 1


def _resize(img: np.ndarray, size: tuple[int, int], nearest: bool = False) -> np.ndarray:
    if nearest:
        interp = cv2.INTER_NEAREST
    else:
        interp = cv2.INTER_AREA if img.shape[1] > size[0] else cv2.INTER_CUBIC
    return cv2.resize(img, size, interpolation=interp)


@register
class WanVACEEdit(Stage):
    name = "edit"
    backend = "wan-vace"
    stateful = True

    class Params(FlatFillParams, ModelParams):
        flat_fill_after = ("replace_categories", "freeze_frac")  # where config.yaml lists the flat-fill fields
        variants: list[Variant] = Field(["remove", "blackout", "random_mask"], min_length=1)
        steps: int = Field(30, ge=1, le=200)
        guidance_scale: float = Field(5.0, ge=0)
        conditioning_scale: float = Field(1.0, ge=0, description="weight of the video+mask conditioning")
        width: int = Field(832, ge=16, description="model frame width (a multiple of the VAE stride x patch)")
        height: int = Field(480, ge=16, description="model frame height")
        max_frames: int = Field(81, ge=1, description="frames per generated window, 4k+1; longer clips are cut")
        window_overlap: int = Field(8, ge=0, description="frames a window shares with the previous one "
                                    "(at most half a window): kept as known content, then cross-faded")
        max_sequence_length: int = Field(512, ge=1, le=1024, description="text tokens (the model's training length)")
        crop: bool = Field(True, description="inpaint a box around the masks' union (False: the whole frame)")
        crop_margin: float = Field(0.5, ge=0, description="context around the masks, share of their extent")
        crop_min_side: int = Field(128, ge=16, description="smallest crop side in source pixels")
        vae_float32: bool = Field(True, description="keep the VAE in float32 on GPU (Wan's recommendation)")
        prompts: dict[Literal["remove", "replace"], PromptTemplate] = Field(
            default_factory=lambda: dict(DEFAULT_PROMPTS))
        replace_categories: list[str] = Field(["cat", "dog", "bird", "ball", "car", "horse", "bicycle", "duck"],
                                              min_length=1, description="object kinds replace may paint")
        # passed to the video default for the model-free variants (with the flat-fill parameters)
        shuffle_segments: int = Field(4, ge=2, le=16)
        freeze_frac: float = Field(0.4, gt=0, lt=1)
        batch_size: int = Field(1, ge=1, description="windows per generation step (their prompts encoded together); "
                                "the pipeline still generates one window per call; halved on CUDA out-of-memory")

    def __init__(self, params=None, run=None) -> None:
        super().__init__(params, run)
        require("torch", "torch", self.backend)
        diffusers = require("diffusers", "diffusers>=0.35", self.backend)
        require("transformers", "transformers>=4.45", self.backend)
        require("accelerate", "accelerate", self.backend)  # the Wan transformer loads through it
        if not hasattr(diffusers, "WanVACEPipeline"):
            raise ImportError(f"backend {self.backend!r} needs diffusers with WanVACEPipeline (>=0.35): "
                              f"installed {diffusers.__version__}")
        import torch

        p = self.params
        place(self, p.model, p.device, p.dtype, prefer="bfloat16")
        dtype_kw = "dtype" if hasattr(diffusers.pipelines.pipeline_utils, "_resolve_dtype") else "torch_dtype"
        dtype: Any = self.dtype
        if dtype_kw == "dtype" and p.vae_float32 and self.dtype != torch.float32:
            dtype = {"default": self.dtype, "vae": torch.float32}
        pipe = diffusers.WanVACEPipeline.from_pretrained(p.model, revision=p.revision, **{dtype_kw: dtype},
                                                         use_safetensors=True, trust_remote_code=p.trust_remote_code)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(self.device)
        self.temporal = int(pipe.vae_scale_factor_temporal)
        base = int(pipe.vae_scale_factor_spatial * pipe.transformer.config.patch_size[1])
        if p.width % base or p.height % base:
            raise ValueError(f"width/height must be multiples of {base} for this model: got {p.width}x{p.height}")
        if (p.max_frames - 1) % self.temporal:
            raise ValueError(f"max_frames must be {self.temporal}k+1 for this model: got {p.max_frames}")
        classical = [v for v in p.variants if v not in _DIFFUSED]
        flat = {k: getattr(p, k) for k in FlatFillParams.model_fields}
        self.classical = VideoEdit({"variants": classical, "shuffle_segments": p.shuffle_segments,
                                    "freeze_frac": p.freeze_frac, **flat}, run) if classical else None
        self.record = model_record(p.model, p.revision, pipeline=type(pipe).__name__,
                                   scheduler=type(pipe.scheduler).__name__, size=[p.width, p.height],
                                   max_frames=p.max_frames, dtype=str(self.dtype).removeprefix("torch."),
                                   device=self.device)

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"models": {"inpaint": self.record}}

    # --- jobs: one per (sample, variant, window) -------------------------------------------
    def _plan(self, s: Sample, v: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        p = self.params
        frames, masks = s.arrays["video"], s.arrays["masks"] > 0
        m = s.meta
        n, h, w = masks.shape
        instances = m["instances"]
        union = masks.any(axis=0)
        if not instances or not union.any():
            raise Skip("no_evidence", "no tracked evidence to edit")
        times = m["source"]["times"]
        rel = [round(t - times[0], 4) for t in times]
        ev = [t for t in range(n) if masks[t].any()]
        target = m.get("target_phrase") or " and ".join(m["targets"])
        fmt = {"target": target, "value": ""}
        info: dict[str, Any] = {
            "type": v, "region": "evidence", "removed_instances": len(instances),
            "removed": [f"{i.get('attributes', {}).get('color', '')} {i['category']}".strip() for i in instances],
            "frames": [ev[0], ev[-1]], "t_start": rel[ev[0]], "t_end": rel[ev[-1]], "affects": list(m["targets"])}
        if v == "replace":
            present = {a["category"] for a in m.get("annotated", [])} | {i["category"] for i in instances}
            present |= set(m["targets"])
            choices = [c for c in p.replace_categories if c not in present]
            if not choices:
                raise Skip("not_applicable", "every replacement category is already annotated in this clip")
            new = choices[int(np.random.default_rng([s.seed, 23]).integers(len(choices)))]
            fmt["value"] = new
            info.update(affects=[*m["targets"], new], inserted_category=new, inserted_instances=len(instances))
        else:  # the whole region is generated: nothing is copied from other frames
            info.update(propagated_frac=0.0, inpainted_frac=1.0)
        tpl = p.prompts.get(v, DEFAULT_PROMPTS[v])
        info["prompt"] = tpl.prompt.format(**fmt)
        info["negative_prompt"] = tpl.negative.format(**fmt)
        box = video_crop_box(union, p.crop_margin, p.crop_min_side, p.width / p.height) if p.crop else (0, 0, w, h)
        info["crop_box"] = list(box)
        x0, y0, x1, y1 = box
        size = (p.width, p.height)
        jobs = []
        overlap = min(p.window_overlap, (p.max_frames - 1) // 2)
        prev: dict[str, Any] | None = None
        for k, (a, b) in enumerate(windows(n, p.max_frames, overlap)):
            if not masks[a:b].any():
                prev = None
                continue  # nothing to paint in this window: it stays the original
            crops, cms = [], []
            for t in range(a, b):
                crop = _resize(frames[t][y0:y1, x0:x1], size)
                cm = _resize(masks[t][y0:y1, x0:x1].astype(np.uint8) * 255, size, nearest=True)
                cm = cv2.dilate(cm, np.ones((3, 3), np.uint8))  # cover edges lost to resizing
                crop[cm > 0] = _GREY
                crops.append(crop)
                cms.append(cm)
            pad = padded_length(b - a, self.temporal) - (b - a)
            crops += [crops[-1]] * pad
            cms += [cms[-1]] * pad
            job = {"sample": s, "variant": v, "window": (a, b), "crops": crops, "masks": cms,
                   "prompt": info["prompt"], "negative": info["negative_prompt"],
                   "seed": (s.seed + _SEED_OFFSET[v] + 7919 * k) % 2**32,
                   "prev": prev, "shared": max(0, prev["window"][1] - a) if prev else 0}
            jobs.append(job)
            prev = job
        info["window_overlap"] = overlap
        return info, jobs

    def _embed(self, texts: list[str]) -> dict[str, Any]:
        """Text embeddings as WanVACEPipeline computes them: tokens padded to
        ``max_sequence_length``, and zeros past each prompt's own length."""
        import torch

        uniq = list(dict.fromkeys(" ".join(t.split()) for t in texts))
        L = self.params.max_sequence_length
        tok = self.pipe.tokenizer(uniq, padding="max_length", max_length=L, truncation=True,
                                  add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        enc = self.pipe.text_encoder
        dev = next(enc.parameters()).device
        with torch.no_grad():
            emb = enc(tok.input_ids.to(dev), tok.attention_mask.to(dev)).last_hidden_state
        emb = emb * tok.attention_mask.to(dev)[..., None].to(emb.dtype)
        emb = emb.to(device=self.device, dtype=self.pipe.transformer.dtype)
        return {t: emb[i : i + 1] for i, t in enumerate(uniq)}

    def _diffuse(self, jobs: list[dict[str, Any]]) -> list[np.ndarray]:
        import torch
        from PIL import Image

        p = self.params
        cfg = p.guidance_scale > 1
        emb = self._embed([j["prompt"] for j in jobs] + ([j["negative"] for j in jobs] if cfg else []))
        out = []
        for j in jobs:
            crops, cms = list(j["crops"]), list(j["masks"])
            prev = self._generated.get(id(j["prev"])) if j["prev"] is not None else None
            if prev is not None:  # continue the previous window: its output is known content here
                for i in range(j["shared"]):
                    crops[i] = prev[len(prev) - j["shared"] + i]
                    cms[i] = np.zeros_like(cms[i])
            kw: dict[str, Any] = {
                "video": [Image.fromarray(c) for c in crops],
                "mask": [Image.fromarray(c) for c in cms],
                "prompt_embeds": emb[" ".join(j["prompt"].split())],
                "conditioning_scale": p.conditioning_scale,
                "height": p.height, "width": p.width, "num_frames": len(j["crops"]),
                "num_inference_steps": p.steps, "guidance_scale": p.guidance_scale, "output_type": "np",
                "max_sequence_length": p.max_sequence_length,
                "generator": torch.Generator("cpu").manual_seed(j["seed"]),
            }
            if cfg:
                kw["negative_prompt_embeds"] = emb[" ".join(j["negative"].split())]
            frames = np.asarray(self.pipe(**kw).frames[0])
            a, b = j["window"]
            gen = np.clip(frames[: b - a] * 255 + 0.5, 0, 255).astype(np.uint8)
            self._generated[id(j)] = gen
            out.append(gen)
        return out

    def process_batch(self, samples: list[Sample]) -> None:
        p = self.params
        plans: dict[tuple[int, str], Any] = {}
        jobs: list[dict[str, Any]] = []
        for s in samples:
            s.begin_variants()
            if self.classical is not None:
                self.guarded(s, self.classical.process)
            if not s.ok:
                continue
            for v in p.variants:
                if v not in _DIFFUSED:
                    continue
                try:
                    info, vjobs = self._plan(s, v)
                except Skip as skip:
                    plans[(id(s), v)] = skip
                    continue
                plans[(id(s), v)] = (info, vjobs)
                jobs += vjobs
        self._generated: dict[int, np.ndarray] = {}  # job -> its frames, for the next window
        run = run_batched(self._diffuse, jobs, p.batch_size)
        self._generated = {}
        results = {id(j): (run.outputs[i], run.failures.get(i)) for i, j in enumerate(jobs)}
        for s in samples:
            if s.ok:
                self.guarded(s, lambda smp: self._assemble(smp, plans, results))

    def _assemble(self, s: Sample, plans: dict[tuple[int, str], Any], results: dict[int, Any]) -> None:
        p = self.params
        frames, masks = s.arrays["video"], s.arrays["masks"] > 0
        for v in p.variants:
            if v not in _DIFFUSED:
                continue
            plan = plans.get((id(s), v))
            if isinstance(plan, Skip):
                s.reject_variant(self.name, v, plan.reason, plan.detail)
                continue
            info, vjobs = plan
            failure = next((results[id(j)][1] for j in vjobs if results[id(j)][1] is not None), None)
            if failure is not None:
                s.reject_variant(self.name, v, failure[0], failure[1][:500])
                continue
            x0, y0, x1, y1 = info["crop_box"]
            out = frames.copy()
            gens: dict[int, np.ndarray] = {}  # frame -> generated crop, shared frames cross-faded
            for j in vjobs:
                a, _ = j["window"]
                for i, gen in enumerate(results[id(j)][0]):
                    t = a + i
                    if t in gens and i < j["shared"]:
                        w = (i + 1) / (j["shared"] + 1)
                        gens[t] = np.clip((1 - w) * gens[t] + w * gen + 0.5, 0, 255).astype(np.uint8)
                    else:
                        gens[t] = gen
            for t, gen in sorted(gens.items()):
                sel = masks[t][y0:y1, x0:x1]
                if sel.any():
                    back = _resize(gen, (x1 - x0, y1 - y0))
                    out[t][y0:y1, x0:x1][sel] = back[sel]
            info |= {"method": f"diffusers:{self.record['pipeline']}", "steps": p.steps,
                     "seed": vjobs[0]["seed"], "windows": [list(j["window"]) for j in vjobs]}
            s.add_variant(v, out, info)
        order = {v: i for i, v in enumerate(p.variants)}
        s.meta["variants"].sort(key=order.__getitem__)
