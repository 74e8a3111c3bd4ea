"""Throughput of the issue-19 backends beside their raw library calls, with FULL-size
architectures and random weights (random weights cost the same compute as trained ones).

Each model is built from its published configuration, saved with ``save_pretrained`` to a work
folder, and measured twice on the same inputs: the raw library call (processor + model, as the
model card shows it) and the stage (the real Stage class, loaded through ``from_pretrained`` as a
config does). The ratio stage/raw is what the stage's own work costs.

    python bench/bench_gpu_models.py --out bench/gpu_models.json              # GPU, full size
    python bench/bench_gpu_models.py --device cpu --tiny --batch 2            # smoke test (CI)

- judge: Qwen2.5-VL-3B-shaped ``AutoModelForImageTextToText``, 448 px, 3 answer tokens, greedy:
  questions/s (raw ``generate`` vs ``verify: vlm-judge``, pixel checks off);
- sam3: ``Sam3Model`` at 1008 px, one text prompt per image: images/s (raw forward +
  post-processing vs ``localize: sam3``);
- instruct: ``FluxKontextPipeline`` (FLUX.1 12B transformer, T5-XXL, CLIP-L): images/s at
  1024 px and ``--steps`` (raw pipeline call on crops vs ``edit: instruction``);
- track: ``Sam2VideoModel`` (SAM 2.1 base-plus): frames/s over a ``--batch``-frame clip (raw
  session + propagation vs ``segment: sam2-video``).
The tokenizers are small ones built here (no download); token ids stay inside the full vocabularies.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests import models_fixtures_new as fxn  # noqa: E402 - the tiny builders and the tokenizers


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def timed(fn, device: str, reps: int) -> float:
    fn()  # warm-up (kernels, caches)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / reps


def _dtype(device: str):
    import torch

    return torch.bfloat16 if device == "cuda" else torch.float32


# --- builders: full size from the published configs, or the test fixtures' tiny ones ---------
def build_judge(work: Path, tiny: bool) -> Path:
    path = work / "judge"
    if tiny:
        return fxn.tiny_vlm(path)
    import torch
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    tok = fxn.vlm_tokenizer()
    tok.chat_template = fxn.VLM_TEMPLATE
    ids = {t: tok.convert_tokens_to_ids(t) for t in fxn.VLM_SPECIAL}
    cfg = Qwen2_5_VLConfig(  # Qwen2.5-VL-3B-Instruct's published shape
        text_config=dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                         num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<pad>"], bos_token_id=None,
                         tie_word_embeddings=True),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[7, 15, 23, 31]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<pad>"], tie_word_embeddings=True)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2_5_VLForConditionalGeneration(cfg).to(torch.bfloat16)
    model.save_pretrained(path)
    ip = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=448 * 448)
    Qwen2_5_VLProcessor(image_processor=ip, tokenizer=tok, video_processor=Qwen2VLVideoProcessor(),
                        chat_template=fxn.VLM_TEMPLATE).save_pretrained(path)
    return path


def build_sam3(work: Path, tiny: bool) -> Path:
    path = work / "sam3"
    if tiny:
        return fxn.tiny_sam3(path)
    import torch
    from transformers import Sam3Config, Sam3ImageProcessor, Sam3Model, Sam3Processor

    from tests.models_fixtures import clip_tokenizer

    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Sam3Model(Sam3Config()).to(torch.bfloat16)  # the published SAM 3 (1008 px)
    model.save_pretrained(path)
    Sam3Processor(image_processor=Sam3ImageProcessor(), tokenizer=clip_tokenizer(max_len=32)).save_pretrained(path)
    return path


def build_instruct(work: Path, tiny: bool) -> Path:
    path = work / "kontext"
    if tiny:
        return fxn.tiny_flux_kontext(path)
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxKontextPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from tests.models_fixtures import clip_tokenizer

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(dev):  # FLUX.1 [dev]/Kontext shapes
        transformer = FluxTransformer2DModel(guidance_embeds=True).to(torch.bfloat16)
        te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                          num_hidden_layers=12, projection_dim=768, max_position_embeddings=77)).to(torch.bfloat16)
        te2 = T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                                      feed_forward_proj="gated-gelu")).to(torch.bfloat16)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                            layers_per_block=2, use_quant_conv=False, use_post_quant_conv=False,
                            shift_factor=0.1159, scaling_factor=0.3611).to(torch.bfloat16)
    FluxKontextPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True), vae=vae,
                        text_encoder=te, tokenizer=clip_tokenizer(max_len=77), text_encoder_2=te2,
                        tokenizer_2=fxn.vlm_tokenizer(), transformer=transformer).save_pretrained(path)
    return path


def build_track(work: Path, tiny: bool) -> Path:
    path = work / "sam2video"
    if tiny:
        return fxn.tiny_sam2_video(path)
    from transformers import (
        Sam2ImageProcessor,
        Sam2VideoConfig,
        Sam2VideoModel,
        Sam2VideoProcessor,
        Sam2VideoVideoProcessor,
    )

    Sam2VideoModel(Sam2VideoConfig()).save_pretrained(path)
    Sam2VideoProcessor(image_processor=Sam2ImageProcessor(), video_processor=Sam2VideoVideoProcessor()).save_pretrained(path)
    return path


# --- inputs ------------------------------------------------------------------------------------
def scene_samples(n: int, size: int, upto: str, work: Path):
    from counterfactory.pipeline.runner import local_batches
    from counterfactory.sample import decode_batch
    from tests.conftest import load_records, make_config

    cfg = make_config(work / f"scenes-{upto}-{size}", [{"kind": "procedural", "count": n, "seed": 0,
                                                         "size": [size, size], "questions_per_scene": 1}])
    out = [s for b in local_batches(cfg, load_records(cfg), stop_after=upto) for s in decode_batch(b)]
    return [s for s in out if s.ok]


def clip_sample(frames: int, work: Path):
    from tests.conftest import load_records
    from tests.test_video import clips_input, run_stages, video_config

    cfg = video_config(work / "clip", [clips_input(1, seed=2, frames=frames)])
    return run_stages(cfg, load_records(cfg), stop_after="localize")[0]


def fresh(samples):
    from counterfactory.sample import decode_batch, encode_batch

    return decode_batch(encode_batch(samples))


def stage(name: str, backend: str, params: dict[str, Any]):
    from counterfactory.stages import get_backend

    return get_backend(name, backend)(params=params, run={"seed": 0, "abstain_answer": "unknown"})


# --- measurements ------------------------------------------------------------------------------
def bench_judge(path: Path, a: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch
    from PIL import Image

    from counterfactory.stages.models.judge import fit_image

    st = stage("verify", "vlm-judge", {"model": str(path), "device": a.device, "batch_size": a.batch,
                                       "answer_tokens": 3, "image_size": 448, "pixel_checks": False,
                                       "variants": ["remove"]})
    samples = scene_samples(max(2, a.batch // 4), 448, "qa", work)
    asks = sum(len(st._plan(s).get(k, [])) for s in samples for k in st._plan(s))
    prompts = [("k", "orig", 0, 0, st._prompt("Is there a circle in the image?", "existence", 0),
                fit_image(samples[0].arrays["image"], 448))] * a.batch
    proc, model = st.processor, st.model

    def raw():
        convs = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p[4]}]}] for p in prompts]
        texts = [proc.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in convs]
        enc = proc(text=texts, images=[[Image.fromarray(p[5])] for p in prompts], padding=True, return_tensors="pt")
        enc = {k: (v.to(a.device, st.dtype) if v.is_floating_point() else v.to(a.device)) for k, v in enc.items()}
        with torch.inference_mode():
            model.generate(**enc, max_new_tokens=3, do_sample=False)

    t_raw = timed(raw, a.device, a.reps)
    t_stage = timed(lambda: st.process_batch(fresh(samples)), a.device, a.reps)
    return {"raw_questions_per_s": round(a.batch / t_raw, 3), "stage_questions_per_s": round(asks / t_stage, 3),
            "stage_over_raw": round((asks / t_stage) / (a.batch / t_raw), 3), "questions_per_batch": asks,
            "batch": a.batch, "image_px": 448, "answer_tokens": 3, "dtype": str(st.dtype)}


def bench_sam3(path: Path, a: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch

    st = stage("localize", "sam3", {"model": str(path), "device": a.device, "batch_size": a.batch,
                                    "presence_threshold": 0.0, "instance_threshold": 0.5})
    samples = scene_samples(a.batch, 512, "ingest", work)
    for s in samples:
        s.meta["question"]["targets"] = ["circle"]  # one text prompt per image, as the raw call
    images = [s.arrays["image"] for s in samples]
    proc, model = st.processor, st.model

    def raw():
        inp = proc(images=images, text=["circle"] * len(images), return_tensors="pt")
        with torch.inference_mode():
            out = model(pixel_values=inp["pixel_values"].to(a.device, st.dtype),
                        input_ids=inp["input_ids"].to(a.device), attention_mask=inp["attention_mask"].to(a.device))
        proc.post_process_instance_segmentation(out, threshold=0.5, target_sizes=[i.shape[:2] for i in images])

    t_raw = timed(raw, a.device, a.reps)
    t_stage = timed(lambda: st.process_batch(fresh(samples)), a.device, a.reps)
    n = len(images)
    return {"raw_images_per_s": round(n / t_raw, 3), "stage_images_per_s": round(n / t_stage, 3),
            "stage_over_raw": round(t_raw / t_stage, 3), "batch": n, "image_px": proc.target_size,
            "dtype": str(st.dtype)}


def bench_instruct(path: Path, a: argparse.Namespace, work: Path) -> dict[str, Any]:
    native = 32 if a.tiny else 1024
    st = stage("edit", "instruction", {"model": str(path), "device": a.device, "batch_size": a.batch,
                                       "native_size": native, "steps": a.steps, "true_cfg_scale": 1.0,
                                       "variants": ["attribute"], "max_sequence_length": 16 if a.tiny else 512})
    samples = scene_samples(a.batch, 512, "segment", work)
    jobs = [st._prepare(s, "attribute") for s in samples]
    t_raw = timed(lambda: st._diffuse(jobs), a.device, a.reps)  # the pipeline call on the prepared crops
    t_stage = timed(lambda: st.process_batch(fresh(samples)), a.device, a.reps)
    n = len(samples)
    return {"raw_images_per_s": round(n / t_raw, 3), "stage_images_per_s": round(n / t_stage, 3),
            "stage_over_raw": round(t_raw / t_stage, 3), "batch": n, "native_px": native, "steps": a.steps,
            "pipeline": st.record["pipeline"], "dtype": str(st.dtype)}


def bench_track(path: Path, a: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch

    st = stage("segment", "sam2-video", {"model": str(path), "device": a.device, "prompts": "first"})
    clip = clip_sample(max(8, a.batch), work)  # the procedural clips have 8 frames at least
    frames = clip.arrays["video"]
    t0 = min(int(k) for k in clip.meta["detections"])
    d = clip.meta["detections"][str(t0)][0]
    from counterfactory.stages.shared import det_mask

    ys, xs = np.nonzero(det_mask(d, frames.shape[2], frames.shape[1]))
    box = [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
    proc, model = st.processor, st.model

    def raw():
        sess = proc.init_video_session(video=list(frames), inference_device=a.device, dtype=st.dtype)
        proc.add_inputs_to_inference_session(inference_session=sess, frame_idx=t0, obj_ids=1, input_boxes=[[box]])
        with torch.inference_mode():
            for o in model.propagate_in_video_iterator(inference_session=sess, start_frame_idx=t0):
                proc.post_process_masks([o.pred_masks.float()], original_sizes=[frames.shape[1:3]])

    t_raw = timed(raw, a.device, a.reps)
    t_stage = timed(lambda: st.process_batch([copy.deepcopy(clip)]), a.device, a.reps)
    n = len(frames)
    return {"raw_frames_per_s": round(n / t_raw, 3), "stage_frames_per_s": round(n / t_stage, 3),
            "stage_over_raw": round(t_raw / t_stage, 3), "frames": n, "dtype": str(st.dtype),
            "note": "the stage tracks every annotated object; the raw call one"}


BENCHES = {"judge": (build_judge, bench_judge), "sam3": (build_sam3, bench_sam3),
           "instruct": (build_instruct, bench_instruct), "track": (build_track, bench_track)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", choices=sorted(BENCHES), default=sorted(BENCHES))
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--tiny", action="store_true", help="the tests' tiny models (a smoke test, not a measurement)")
    ap.add_argument("--batch", type=int, default=16, help="images, questions or clip frames per call")
    ap.add_argument("--steps", type=int, default=4, help="diffusion steps (instruct)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--work", type=Path, default=None, help="where the random-weight models are saved")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            ap.error("--device cuda but no CUDA device (use --device cpu --tiny for a smoke test)")
    work = a.work or Path(tempfile.mkdtemp(prefix="bench-models-"))
    report: dict[str, Any] = {"device": a.device, "tiny": a.tiny, "batch": a.batch, "results": {}}
    for name in a.models:
        build, run = BENCHES[name]
        path = build(work, a.tiny)
        report["results"][name] = run(path, a, work)
        print(name, json.dumps(report["results"][name]), flush=True)
    if a.out:
        a.out.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return report


if __name__ == "__main__":
    main()
