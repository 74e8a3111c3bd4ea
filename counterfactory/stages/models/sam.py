"""segment with SAM: box prompts from localize, one image embedding per image reused for all
of its boxes, the mask of each box chosen by SAM's predicted IoU, instances merged, dilated.

Two ways to load SAM:
- ``sam``: the ``segment-anything`` package; weights are a ``.safetensors`` state dict (the
  official ``.pth`` files are pickles: convert once with ``safetensors.torch.save_file``);
- ``sam-hf``: ``transformers.SamModel`` / ``SamProcessor`` from a hub id or directory.
Same output contract as the classical default (``mask_core``, dilated ``mask``, ``meta["mask"]``).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from counterfactory.sample import Sample, Stage
from counterfactory.stages import register
from counterfactory.stages.models.common import (
    Device,
    DType,
    ModelParams,
    SplitStage,
    check_compile,
    images_to_device,
    load_pretrained,
    maybe_compile,
    model_record,
    place,
    require,
    run_batched,
    transformers_setup,
)
from counterfactory.stages.shared import set_evidence_mask

# segment-anything's published encoders (build_sam.py): embed dim, depth, heads, global blocks
SAM_ARCHS = {
    "vit_h": (1280, 32, 16, (7, 15, 23, 31)),
    "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
    "vit_b": (768, 12, 12, (2, 5, 8, 11)),
}


class MaskParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    multimask: bool = Field(True, description="3 candidate masks per box, the best by predicted IoU")
    mask_threshold: float = 0.0
    clip_to_box_margin: float = Field(0.1, ge=0, description="clip a mask to its box grown by this share")
    min_box_fill: float = Field(0.05, ge=0, le=1, description="below this share of its box, use the box")
    dilate_px: int = Field(4, ge=0)
    dilate_frac: float = Field(0.03, ge=0, le=0.5)


def finish_masks(sample: Sample, masks: list[np.ndarray], ious: list[float], p: MaskParams, method: str) -> None:
    """Per-instance masks (bool, image size) -> clipped/fallback, merged, dilated: the contract
    of the classical segment stage."""
    img = sample.arrays["image"]
    h, w = img.shape[:2]
    core = np.zeros((h, w), np.uint8)
    instances = sample.meta["instances"]
    for inst, m, iou in zip(instances, masks, ious, strict=True):
        x0, y0, x1, y1 = inst["box"]
        mx, my = int(p.clip_to_box_margin * (x1 - x0)), int(p.clip_to_box_margin * (y1 - y0))
        keep = np.zeros((h, w), bool)
        keep[max(0, y0 - my):min(h, y1 + my), max(0, x0 - mx):min(w, x1 + mx)] = True
        m = (m & keep).astype(np.uint8)
        box_area = max(1, (x1 - x0) * (y1 - y0))
        if m.sum() < p.min_box_fill * box_area:
            m = np.zeros((h, w), np.uint8)
            m[y0:y1, x0:x1] = 1
            inst["mask_method"] = "box"
        else:
            inst["mask_method"] = method
        inst["mask_iou_pred"] = round(float(iou), 4)
        inst["mask_area"] = int(m.sum())
        core |= m
    set_evidence_mask(sample, core, p.dilate_px, p.dilate_frac)


_MASKS = "_segment/masks"  # the model part's masks (bool, per instance) and IoUs, for the host part


class SamArch(BaseModel):
    """A custom segment-anything architecture (tests, distilled variants)."""

    model_config = ConfigDict(extra="forbid")
    image_size: int = 1024
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    global_attn_indexes: list[int] = [2, 5, 8, 11]
    window_size: int = 14
    mlp_ratio: float = 4.0
    prompt_dim: int = 256
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    iou_head_hidden_dim: int = 256
    mask_in_chans: int = 16


def build_sam(model_type: str, arch: SamArch | None):
    """The segment-anything model without weights (its own builder would torch.load a pickle)."""
    import torch
    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    a = arch or SamArch()
    if model_type != "custom":
        e, d, n, g = SAM_ARCHS[model_type]
        a = SamArch(embed_dim=e, depth=d, num_heads=n, global_attn_indexes=list(g))
    emb = a.image_size // a.patch_size
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=a.depth, embed_dim=a.embed_dim, img_size=a.image_size, mlp_ratio=a.mlp_ratio,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=a.num_heads, patch_size=a.patch_size,
            qkv_bias=True, use_rel_pos=True, global_attn_indexes=tuple(a.global_attn_indexes),
            window_size=a.window_size, out_chans=a.prompt_dim),
        prompt_encoder=PromptEncoder(embed_dim=a.prompt_dim, image_embedding_size=(emb, emb),
                                     input_image_size=(a.image_size, a.image_size), mask_in_chans=a.mask_in_chans),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=a.decoder_depth, embedding_dim=a.prompt_dim,
                                          mlp_dim=a.decoder_mlp_dim, num_heads=a.decoder_heads),
            transformer_dim=a.prompt_dim, iou_head_depth=3, iou_head_hidden_dim=a.iou_head_hidden_dim),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])


class _EncodeOnce(Stage):
    """SAM backends: every image of a batch through the encoder in one call (halved on CUDA
    OOM), then each sample's boxes decoded against its one embedding (``_finish``)."""

    def process_batch(self, samples: list[Sample]) -> None:
        run = run_batched(self._encode, [s.arrays["image"] for s in samples], self.params.batch_size)
        for i, s in enumerate(samples):
            if i in run.failures:
                s.reject(self.name, *run.failures[i])
                continue
            self.guarded(s, lambda smp, o=run.outputs[i]: self._finish(smp, *o))


@register
class SamSegment(_EncodeOnce):
    """segment-anything: ``checkpoint`` is a safetensors state dict for ``model_type``."""

    name = "segment"
    backend = "sam"
    stateful = True

    class Params(MaskParams):
        checkpoint: str = Field(description="path to a .safetensors state dict (pickles are refused)")
        model_type: Literal["vit_h", "vit_l", "vit_b", "custom"] = "vit_h"
        arch: SamArch | None = None
        device: Device = "auto"
        dtype: DType = "auto"
        batch_size: int = Field(4, ge=1, description="images per encoder call; halved on CUDA OOM")
        compile: bool = Field(False, description="torch.compile the image encoder (GPU only)")

        @field_validator("compile")
        @classmethod
        def _compile_needs_torch2(cls, v: bool) -> bool:
            return check_compile(v)

    def __init__(self, params=None, run=None) -> None:
        super().__init__(params, run)
        require("segment_anything", "segment-anything", self.backend)
        st = require("safetensors.torch", "safetensors", self.backend)
        from segment_anything.utils.transforms import ResizeLongestSide

        p = self.params
        place(self, p.checkpoint, p.device, p.dtype, prefer="bfloat16")
        sam = build_sam(p.model_type, p.arch)
        sam.load_state_dict(st.load_file(p.checkpoint), strict=True)
        self.sam = sam.to(self.device).eval()
        self.encoder_dtype = self.dtype  # the image encoder dominates; the decoder runs in float32
        self.sam.image_encoder.to(self.encoder_dtype)
        self.sam.image_encoder = maybe_compile(self.sam.image_encoder, p.compile, self.device, "the SAM encoder")
        self.transform = ResizeLongestSide(self.sam.image_encoder.img_size)
        self.record = model_record(p.checkpoint, None, architecture=f"segment_anything.Sam/{p.model_type}",
                                   dtype=str(self.dtype).removeprefix("torch."), device=self.device)

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"models": {"sam": self.record}}

    def _encode(self, images: list[np.ndarray]) -> list[Any]:
        import torch

        xs, sizes = [], []
        for img in images:
            r = self.transform.apply_image(img)
            sizes.append(r.shape[:2])
            t = torch.as_tensor(r, device=self.device).permute(2, 0, 1).contiguous().float()
            xs.append(self.sam.preprocess(t))  # normalize + pad to the square input
        with torch.inference_mode():
            emb = self.sam.image_encoder(torch.stack(xs).to(self.encoder_dtype)).float()
        return [(emb[i:i + 1], sizes[i]) for i in range(len(images))]

    def _decode(self, emb: Any, input_size: tuple[int, int], img: np.ndarray, boxes: list[list[int]]):
        import torch

        h, w = img.shape[:2]
        b = self.transform.apply_boxes_torch(torch.as_tensor(boxes, dtype=torch.float32), (h, w)).to(self.device)
        with torch.inference_mode():
            sparse, dense = self.sam.prompt_encoder(points=None, boxes=b, masks=None)
            low, iou = self.sam.mask_decoder(
                image_embeddings=emb, image_pe=self.sam.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                multimask_output=self.params.multimask)
            masks = self.sam.postprocess_masks(low, input_size, (h, w)) > self.params.mask_threshold
        best = iou.argmax(dim=1)
        idx = torch.arange(len(boxes), device=iou.device)
        return masks[idx, best].cpu().numpy(), iou[idx, best].float().cpu().numpy().tolist(), iou.cpu().numpy()


    def _finish(self, s: Sample, emb: Any, size: tuple[int, int]) -> None:
        boxes = [inst["box"] for inst in s.meta["instances"]]
        masks, ious, _ = self._decode(emb, size, s.arrays["image"], boxes)
        finish_masks(s, list(masks), ious, self.params, "sam")


@register
class HfSamSegment(SplitStage, _EncodeOnce):
    """transformers ``SamModel``: image embeddings batched, boxes decoded per image; the masks'
    clipping, merge and dilation (``finish_masks``) run after, in a CPU step beside the actor."""

    name = "segment"
    backend = "sam-hf"
    stateful = True
    host_parts = ("after",)

    class Params(ModelParams, MaskParams):
        batch_size: int = Field(4, ge=1)

    def __init__(self, params=None, run=None) -> None:
        super().__init__(params, run)
        p = self.params
        tf, kw = transformers_setup(self, p, self.backend, prefer="bfloat16")
        self.processor = tf.SamProcessor.from_pretrained(p.model, revision=p.revision)
        self.model = load_pretrained(tf.SamModel, p, self.backend, dtype=self.dtype, **kw).to(self.device).eval()
        self.model.vision_encoder = maybe_compile(self.model.vision_encoder, p.compile, self.device, "the SAM encoder")
        self.record = model_record(p.model, p.revision, architecture="transformers.SamModel",
                                   dtype=str(self.dtype).removeprefix("torch."), device=self.device)

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"models": {"sam": self.record}}

    def _encode(self, images: list[np.ndarray]) -> list[Any]:
        import torch

        # uint8 to the device in one copy, resized and normalized there by the processor
        inp = self.processor(images=images_to_device(images, self.device), return_tensors="pt", device=self.device)
        with torch.inference_mode():
            emb = self.model.get_image_embeddings(inp["pixel_values"].to(self.device, self.dtype))
        sizes, reshaped = inp["original_sizes"].tolist(), inp["reshaped_input_sizes"].tolist()
        return [(emb[i:i + 1], sizes[i], reshaped[i]) for i in range(len(images))]


    def model_batch(self, samples: list[Sample]) -> None:
        """Embeddings batched (halved on OOM), then every box of every image of the batch decoded
        in one mask-decoder call against its image's embedding (boxes padded to the longest
        list), the best of SAM's candidates picked and upsampled on the device: one copy of the
        final masks to the host per image, no Python loop of small GPU calls per sample."""
        run = run_batched(self._encode, [s.arrays["image"] for s in samples], self.params.batch_size)
        live = []
        for i, s in enumerate(samples):
            if i in run.failures:
                s.reject(self.name, *run.failures[i])
            else:
                live.append((s, run.outputs[i]))
        if not live:
            return
        dec = run_batched(self._decode_many, live, self.params.batch_size)
        for i, (s, _) in enumerate(live):
            if i in dec.failures:
                s.reject(self.name, *dec.failures[i])
                continue
            masks, ious = dec.outputs[i]
            s.arrays[_MASKS], s.meta[_MASKS] = masks, ious  # for host_after

    def host_after(self, samples: list[Sample]) -> None:
        for s in samples:
            masks, ious = s.arrays.pop(_MASKS), s.meta.pop(_MASKS)
            self.guarded(s, lambda smp, m=masks, q=ious: finish_masks(smp, list(m), q, self.params, "sam-hf"))

    def _decode_many(self, items: list[tuple[Sample, Any]]) -> list[tuple[np.ndarray, list[float]]]:
        import torch

        n = max(len(s.meta["instances"]) for s, _ in items)
        boxes, embs = [], []
        for s, (emb, orig, reshaped) in items:
            h, w = orig
            sx, sy = reshaped[1] / w, reshaped[0] / h  # the processor resized the image to `reshaped`
            bx = [[b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy] for b in (i["box"] for i in s.meta["instances"])]
            boxes.append(bx + [bx[0]] * (n - len(bx)))  # padding boxes are decoded and dropped
            embs.append(emb)
        bt = torch.tensor(boxes, dtype=torch.float32).to(self.device, self.dtype)
        with torch.inference_mode():
            out = self.model(image_embeddings=torch.cat(embs), input_boxes=bt, multimask_output=self.params.multimask)
            iou = out.iou_scores.float()  # (B, n, k)
            best = iou.argmax(dim=2, keepdim=True)  # (B, n, 1)
            low = torch.take_along_dim(out.pred_masks, best[..., None, None], dim=2).float()  # (B, n, 1, h', w')
            best_iou = iou.gather(2, best)[..., 0].cpu().numpy()  # one small copy for the batch
            res = []
            for i, (s, (_, orig, reshaped)) in enumerate(items):
                k = len(s.meta["instances"])
                m = self.processor.post_process_masks([low[i, :k]], [orig], [reshaped],
                                                      mask_threshold=self.params.mask_threshold)[0]
                res.append((m[:, 0].cpu().numpy(), best_iou[i, :k].tolist()))
        return res
