"""GPU throughput of the model backends beside the raw library calls, in one run and one table.

Random weights cost the same compute as trained ones, so nothing is downloaded: every model is
built from its published hyperparameters, saved with ``save_pretrained`` (safetensors) to a work
folder, and loaded by the real stage classes through the code path a config takes.

    python bench/bench_gpu.py                       # make bench-gpu: every stage + end to end
    python bench/bench_gpu.py --device cpu          # host overhead per image, tiny test models

CUDA mode, per model stage at batch 16 (``--batch-sizes``): images/s of the stage (its
``process_batch``, host work included) and of the raw library call on the same loaded module at
the same batch size, dtype and input size (inputs already on the device: the ceiling), their
ratio, GPU busy (NVML, or ``nvidia-smi`` where NVML is absent) and peak memory. End to end:
``run_pipeline(local=True)`` (and ``--ray``: through Ray Data on local Ray) on 512 px procedural
scenes with the model set of ``configs/gpu.yaml`` at 20 steps and of ``configs/gpu_fast.yaml`` at
4 steps, pairs/s in steady state (after the first batch: model loading excluded) beside the
serial raw ceiling of the same models (the raw calls of one pair, summed), GPU busy in steady
state, and the seconds of the run outside every stage's code.

CPU mode (``--device cpu``): the tiny test models (tests/models_fixtures.py) at 512 px; per model
stage, stage time minus time inside the model's forward passes, per image: the host work this
code adds around the library. Since issue 28 a model stage's host work runs in CPU steps beside
its actor (``SplitStage``): the stage figure is the actor part alone (target: <= 5 ms/image outside
the forward), the CPU steps' time is reported apart. Timed on this process's CPU clock with one
thread by default (``--clock``), so a machine other jobs load still gives usable figures. Not
run by the test suite; ``--device cpu --parts e2e --ray`` is the device command's smoke run.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


class BusyMeter:
    """GPU utilization sampled every 50 ms with NVML (``nvidia-ml-py``), else ``nvidia-smi``;
    ``share(t0, t1)`` is the mean over a window (steady state)."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()

    def __enter__(self):
        def nvml():
            import pynvml

            pynvml.nvmlInit()
            h = pynvml.nvmlDeviceGetHandleByIndex(0)
            while not self._stop.is_set():
                self.samples.append((time.perf_counter(), float(pynvml.nvmlDeviceGetUtilizationRates(h).gpu)))
                time.sleep(0.05)

        def smi():
            p = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                  "-lms", "100"], stdout=subprocess.PIPE, text=True)
            while not self._stop.is_set():
                line = p.stdout.readline()
                if not line:
                    break
                try:
                    self.samples.append((time.perf_counter(), float(line.split()[0])))
                except (ValueError, IndexError):
                    continue
            p.terminate()

        def loop():
            try:
                nvml()
            except Exception:  # noqa: BLE001 - no NVML here: nvidia-smi, or no figure
                try:
                    smi()
                except OSError:
                    return

        self._t = threading.Thread(target=loop, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join(timeout=5)

    def share(self, t0: float | None = None, t1: float | None = None) -> float | None:
        v = [u for t, u in self.samples if (t0 is None or t >= t0) and (t1 is None or t <= t1)]
        return round(float(np.mean(v)) / 100, 3) if v else None


# --- full-size random-weight models -------------------------------------------------------------
def clip_tokenizer(max_len: int = 77):
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    alpha = sorted(ByteLevel.alphabet())
    vocab = {a: i for i, a in enumerate(alpha)} | {a + "</w>": len(alpha) + i for i, a in enumerate(alpha)}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_len)


def bert_tokenizer(work: Path):
    """A WordPiece tokenizer from a vocabulary written here (letters and the scene words): the
    text side costs what the real one does for the same number of tokens."""
    from transformers import BertTokenizerFast

    words = ["circle", "square", "triangle", "star", "red", "green", "blue", "yellow", "object", "cat", "dog"]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *"abcdefghijklmnopqrstuvwxyz",
             *("##" + c for c in "abcdefghijklmnopqrstuvwxyz"), *words]
    f = work / "bert-vocab.txt"
    f.write_text("\n".join(vocab) + "\n")
    return BertTokenizerFast(vocab_file=str(f))


def build_models(work: Path, which: set[str]) -> dict[str, Path]:
    """Full-size architectures (published hyperparameters), random weights, built on the GPU
    (initializing 1.5 B parameters on the CPU takes minutes) and saved once."""
    import torch

    out: dict[str, Path] = {}
    torch.manual_seed(0)
    dev = torch.device("cuda")
    if which & {"localize", "verify", "e2e"}:
        from transformers import (
            GroundingDinoConfig,
            GroundingDinoForObjectDetection,
            GroundingDinoImageProcessor,
            GroundingDinoProcessor,
        )

        p = out["gd"] = work / "grounding-dino-tiny"
        if not p.exists():
            with dev:
                GroundingDinoForObjectDetection(GroundingDinoConfig()).save_pretrained(p)  # Swin-T + BERT-base
            GroundingDinoProcessor(image_processor=GroundingDinoImageProcessor(),
                                   tokenizer=bert_tokenizer(work)).save_pretrained(p)
    if which & {"segment", "e2e"}:
        from transformers import (
            SamConfig,
            SamImageProcessor,
            SamModel,
            SamProcessor,
            SamVisionConfig,
        )

        for name, (dim, depth, heads, glob) in {"sam-vit-huge": (1280, 32, 16, [7, 15, 23, 31]),
                                                "sam-vit-base": (768, 12, 12, [2, 5, 8, 11])}.items():
            p = out[name] = work / name
            if not p.exists():
                vis = SamVisionConfig(hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads,
                                      global_attn_indexes=glob)
                with dev:
                    SamModel(SamConfig(vision_config=vis)).save_pretrained(p)
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
            with dev:
                unet = UNet2DConditionModel(sample_size=64, in_channels=9, out_channels=4, cross_attention_dim=768,
                                            attention_head_dim=8)
                vae = AutoencoderKL(block_out_channels=[128, 256, 512, 512], latent_channels=4, sample_size=512,
                                    down_block_types=["DownEncoderBlock2D"] * 4,
                                    up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2)
                te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                                  num_hidden_layers=12, vocab_size=49408, max_position_embeddings=77))
            sched = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                                steps_offset=1)
            StableDiffusionInpaintPipeline(vae=vae, text_encoder=te, tokenizer=clip_tokenizer(), unet=unet,
                                           scheduler=sched, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False).save_pretrained(p)
    torch.cuda.empty_cache()
    return out


def tiny_models(work: Path) -> dict[str, Path]:
    from tests import models_fixtures as fx

    return {"gd": fx.grounding_dino(work / "gd"), "sam-hf": fx.sam_hf(work / "sam_hf"), "sd": fx.sd_inpaint(work / "sd")}


# --- inputs ---------------------------------------------------------------------------------------
def base_config(work: Path, n: int, size: int) -> dict:
    import yaml

    data = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    data["inputs"] = [{"kind": "procedural", "count": n, "seed": 0, "size": [size, size], "questions_per_scene": 1}]
    data["output"]["root"] = str(work / "out")
    return data


def scene_samples(n: int, size: int, upto: str, work: Path):
    from counterfactory.pipeline.config import validate_config
    from counterfactory.pipeline.runner import local_batches
    from counterfactory.sample import decode_batch
    from tests.conftest import load_records

    cfg = validate_config(base_config(work, n, size), source="bench", base_dir=work)
    out = []
    for b in local_batches(cfg, load_records(cfg), stop_after=upto, batch_size=64):
        out += [s for s in decode_batch(b) if s.ok]
    return out


def fresh(samples):
    from counterfactory.sample import decode_batch, encode_batch

    return decode_batch(encode_batch(samples))


# --- timing ---------------------------------------------------------------------------------------
# The host-overhead split (CPU mode) reads this clock: the process's CPU time with one thread
# (``--clock cpu``, the default there: figures that hold on a machine other jobs load), or wall time.
clock = time.perf_counter


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


class ForwardTimer:
    """Wall time inside the forward passes of some modules (CPU: calls are synchronous, so the
    time between a module's pre- and post-hook is its compute). Nested calls count once."""

    def __init__(self, modules: list[Any]) -> None:
        self.seconds, self._depth, self._t0 = 0.0, 0, 0.0
        for m in modules:
            m.register_forward_pre_hook(self._pre)
            m.register_forward_hook(self._post)

    def _pre(self, *a):
        if self._depth == 0:
            self._t0 = clock()
        self._depth += 1

    def _post(self, *a):
        self._depth -= 1
        if self._depth == 0:
            self.seconds += clock() - self._t0


class CallTimer:
    """Wall time inside the libraries' own pre/post-processing (processors, diffusers' image
    processors): on a GPU they resize/normalize/upsample on the device, on the CPU they are
    counted apart from this code's host work."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def timed(self, fn):
        def wrapper(*a, **k):
            t0 = clock()
            try:
                return fn(*a, **k)
            finally:
                self.seconds += clock() - t0
        return wrapper

    def proxy(self, obj, methods=("post_process_masks",)):
        timer = self

        class Proxy:
            def __call__(self, *a, **k):
                return timer.timed(obj)(*a, **k)

            def __getattr__(self, name):
                v = getattr(obj, name)
                return timer.timed(v) if name in methods else v
        return Proxy()

    def patch(self, obj, *names):
        for n in names:
            setattr(obj, n, self.timed(getattr(obj, n)))


def time_stage(st, samples, batch: int, device: str, busy: BusyMeter | None = None) -> dict:
    import torch

    st.process_batch(fresh(samples[:batch]))  # warm-up: kernels, allocator, cached embeddings
    sync(device)
    todo = fresh(samples)
    # the actor's part alone, as a run places it (issue 28): host parts run in CPU steps beside it
    parts = getattr(st, "host_parts", ())
    st.split = bool(parts)
    if "before" in parts:
        st.host_before(todo)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(0, len(todo), batch):
        st.process_batch([s for s in todo[i:i + batch] if s.ok])
    sync(device)
    t1 = time.perf_counter()
    if "after" in parts:
        st.host_after([s for s in todo if s.ok])
    st.split = False
    row = {"images": len(todo), "seconds": round(t1 - t0, 3), "images_per_s": round(len(todo) / (t1 - t0), 2),
           "ok": sum(s.ok for s in todo)}
    if busy is not None:
        row["gpu_busy"] = busy.share(t0, t1)
    if device == "cuda":
        row["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return row


def time_raw(fn, batch: int, reps: int, device: str, busy: BusyMeter | None) -> dict:
    """``fn()`` processes one batch of ``batch`` images with inputs already on the device."""
    import torch

    fn()
    sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    t1 = time.perf_counter()
    return {"images_per_s": round(reps * batch / (t1 - t0), 2), "gpu_busy": busy.share(t0, t1) if busy else None}


# --- raw library calls on a stage's loaded module ---------------------------------------------------
def raw_detector(st, samples, batch: int):
    import torch

    det = st.detector
    imgs = [s.arrays["image"] for s in samples[:batch]]
    prompts = [". ".join(s.meta.get("targets") or ["object"]) + "." for s in samples[:batch]]
    inp = det.processor(images=imgs, text=prompts, return_tensors="pt", padding=True, **det.image_kw)
    inp = {k: (v.to(det.device, det.dtype) if v.is_floating_point() else v.to(det.device)) for k, v in inp.items()}

    def fn():
        with torch.inference_mode():
            det.model(**inp)
    return fn


def raw_sam(st, samples, batch: int):
    import torch

    imgs = [s.arrays["image"] for s in samples[:batch]]
    inp = st.processor(images=imgs, return_tensors="pt", device=st.device)
    px = inp["pixel_values"].to(st.device, st.dtype)
    box = torch.tensor([[[100.0, 100.0, 400.0, 400.0]]] * len(imgs), device=st.device, dtype=st.dtype)

    def fn():
        with torch.inference_mode():
            emb = st.model.get_image_embeddings(px)
            st.model(image_embeddings=emb, input_boxes=box, multimask_output=True)
    return fn


def raw_inpaint(st, samples, batch: int):
    import torch

    p = st.params
    jobs = [st._prepare(s, "remove") for s in samples[:batch]]
    embeds = st._prompt_embeds(jobs)
    img = torch.from_numpy(np.stack([j["crop"] for j in jobs])).to(st.device).permute(0, 3, 1, 2).float() / 255
    mask = torch.from_numpy(np.stack([j["mask"] for j in jobs])).to(st.device)[:, None].float() / 255

    def fn():
        with torch.inference_mode():
            st.pipe(image=img, mask_image=mask, height=st.native, width=st.native, num_inference_steps=p.steps,
                    guidance_scale=p.guidance_scale, output_type="pt", strength=p.strength,
                    generator=[torch.Generator("cpu").manual_seed(j["seed"]) for j in jobs], **embeds)
    return fn


# --- the model sets of configs/gpu.yaml and configs/gpu_fast.yaml ------------------------------------
def model_sets(paths: dict[str, Path], tiny: bool) -> dict[str, dict[str, dict]]:
    gd = {"model": str(paths["gd"]), "box_threshold": 0.0, "text_threshold": 0.0, "max_instances": 3}
    sam_h = str(paths["sam-hf"] if tiny else paths["sam-vit-huge"])
    sam_b = str(paths["sam-hf"] if tiny else paths["sam-vit-base"])
    edit = {"model": str(paths["sd"]), "variants": ["remove", "blackout", "random_mask"]}
    return {
        "gpu@20": {"localize": gd, "segment": {"model": sam_h},
                   "edit": edit | {"steps": 20, "scheduler": "dpmpp", "guidance_scale": 7.5},
                   "verify": {"model": str(paths["gd"]), "min_inside_mad": 0.0, "max_contrast_ratio": 1e9,
                              "redetect_threshold": 1.0}},
        "gpu_fast@4": {"localize": gd, "segment": {"model": sam_b},
                       "edit": edit | {"steps": 4, "scheduler": "lcm", "guidance_scale": 1.0},
                       "verify": {"model": str(paths["gd"]), "min_inside_mad": 0.0, "max_contrast_ratio": 1e9,
                                  "redetect_threshold": 1.0}},
    }


BACKENDS = {"localize": "grounding-dino", "segment": "sam-hf", "edit": "diffusers-inpaint", "verify": "redetect"}
INPUT_AFTER = {"localize": "ingest", "segment": "localize", "edit": "segment", "verify": "edit"}


def stage_rows(sets, inputs, batch: int, device: str, busy, log) -> dict[str, dict[str, float]]:
    """Every model stage of every set, beside its raw call. Returns per set the raw seconds per
    image of each stage (the serial ceiling's terms)."""
    import torch

    from counterfactory.stages import get_backend

    per_image: dict[str, dict[str, float]] = {}
    seen: dict[str, float] = {}
    for set_name, stages in sets.items():
        per_image[set_name] = {}
        for name, params in stages.items():
            key = json.dumps([name, params], sort_keys=True)
            if key in seen:  # the same model and settings in both sets: measured once
                per_image[set_name][name] = seen[key]
                continue
            params = params | {"batch_size": batch, "device": device}
            st = get_backend(name, BACKENDS[name])(params=params, run={"seed": 0, "abstain_answer": "unknown"})
            samples = inputs[INPUT_AFTER[name]]
            label = f"{name}/{set_name.split('@')[0]}" + (f"@{params.get('steps')}" if name == "edit" else "")
            row = {"batch": batch} | time_stage(st, samples, batch, device, busy)
            raw = {"localize": raw_detector, "verify": raw_detector, "segment": raw_sam, "edit": raw_inpaint}[name]
            r = time_raw(raw(st, samples, batch), batch, max(1, len(samples) // batch), device, busy)
            row |= {"raw_images_per_s": r["images_per_s"], "raw_gpu_busy": r["gpu_busy"],
                    "ratio": round(row["images_per_s"] / r["images_per_s"], 3)}
            # verify detects each edited image once (the original's detection comes from localize)
            seen[key] = per_image[set_name][name] = 1.0 / r["images_per_s"]
            log("stages", label, row)
            del st
            if device == "cuda":
                torch.cuda.empty_cache()
    return per_image


def host_overhead_rows(sets, inputs, batch: int, log) -> None:
    """CPU mode: per model stage and image, the stage's time split into the models' forward
    passes, the libraries' own pre/post-processing (device work on a GPU) and the rest: this
    code's host work (the figure to drive down)."""
    from counterfactory.stages import get_backend

    for name, params in sets["gpu_fast@4"].items():
        params = params | {"batch_size": batch, "device": "cpu"}
        st = get_backend(name, BACKENDS[name])(params=params, run={"seed": 0, "abstain_answer": "unknown"})
        mods = {"localize": lambda s: [s.detector.model], "verify": lambda s: [s.detector.model],
                "segment": lambda s: [s.model, s.model.vision_encoder],
                "edit": lambda s: [s.pipe.unet, s.pipe.vae.encoder, s.pipe.vae.decoder, s.pipe.text_encoder]}[name](st)
        samples = inputs[INPUT_AFTER[name]]
        st.process_batch(fresh(samples[:batch]))  # warm-up
        timer, lib = ForwardTimer(mods), CallTimer()
        if name in ("localize", "verify"):
            st.detector.processor = lib.proxy(st.detector.processor)
        elif name == "segment":
            st.processor = lib.proxy(st.processor)
        else:
            lib.patch(st.pipe.image_processor, "preprocess", "postprocess")
            lib.patch(st.pipe.mask_processor, "preprocess")
        todo = fresh(samples)
        # as a run's plan places it (issue 28): the host parts in CPU steps beside the actor,
        # timed apart; the stage's figure is its actor part alone (what the GPU waits on)
        parts = getattr(st, "host_parts", ())
        st.split = bool(parts)
        dt = host_s = 0.0
        for i in range(0, len(todo), batch):
            chunk = todo[i:i + batch]
            t0 = clock()
            if "before" in parts:
                st.host_before([s for s in chunk if s.ok])
            t1 = clock()
            st.process_batch([s for s in chunk if s.ok])
            t2 = clock()
            if "after" in parts:
                st.host_after([s for s in chunk if s.ok])
            host_s += (t1 - t0) + (clock() - t2)
            dt += t2 - t1
        n = len(todo)
        log("host", name, {"images": n, "stage_ms_per_image": round(1e3 * dt / n, 2),
                           "forward_ms_per_image": round(1e3 * timer.seconds / n, 2),
                           "library_prepost_ms_per_image": round(1e3 * lib.seconds / n, 2),
                           "host_ms_per_image": round(1e3 * (dt - timer.seconds - lib.seconds) / n, 2),
                           "outside_forward_ms_per_image": round(1e3 * (dt - timer.seconds) / n, 2),
                           "cpu_steps_ms_per_image": round(1e3 * host_s / n, 2), "ok": sum(s.ok for s in todo)})


def e2e_rows(sets, work: Path, pairs: int, size: int, batch: int, busy, ray: bool, log) -> None:
    """run_pipeline(local=True) (and Ray Data) with each model set; steady state is timed from
    the first finished batch to the last (model loading and the first batch's warm-up excluded)."""
    from counterfactory.pipeline import writer as writer_mod
    from counterfactory.pipeline.config import validate_config
    from counterfactory.pipeline.runner import run_pipeline

    stamps: list[tuple[float, int]] = []
    orig_add = writer_mod.DatasetWriter.add_batch

    def add_batch(self, b):
        orig_add(self, b)
        stamps.append((time.perf_counter(), sum(1 for x in b["status"] if x == "ok")))

    writer_mod.DatasetWriter.add_batch = add_batch
    if ray:
        import ray as ray_mod
        import torch

        if not ray_mod.is_initialized():
            # a machine without a GPU declares one (and enough CPUs for every actor), so the GPU
            # schedule itself runs: the smoke run of the device command on CPU (issue 28)
            cpu_only = not torch.cuda.is_available()
            ray_mod.init(include_dashboard=False, log_to_driver=False, num_gpus=1 if cpu_only else None,
                         num_cpus=8 if cpu_only else None)
    try:
        for set_name, stages in sets.items():
            for mode in ["local"] + (["ray"] if ray else []):
                data = base_config(work, pairs, size)
                data["dataset"] = f"bench-{set_name.replace('@', '-')}-{mode}"
                st = {s["name"]: s for s in data["stages"]}
                for s in st.values():
                    s["resources"]["batch_size"] = batch
                for name, params in stages.items():
                    st[name].update(backend=BACKENDS[name], params=params | {"batch_size": batch})
                    if mode == "ray":  # the model stages share the one GPU as overlapping actors
                        st[name]["resources"] = {"num_gpus": 0.2, "num_cpus": 1, "concurrency": 1,
                                                 "batch_size": batch}
                cfg = validate_config(copy.deepcopy(data), source="bench", base_dir=work)
                stamps.clear()
                t0 = time.perf_counter()
                res = run_pipeline(cfg, local=mode == "local", progress=False, force=True)
                ok = res.manifest["counts"].get("samples", 0)
                row = {"pairs": ok, "wall_s": round(res.seconds, 2), "pairs_per_s_wall": round(ok / res.seconds, 3)}
                if len(stamps) > 2:
                    (ta, _), (tb, _) = stamps[0], stamps[-1]
                    steady = sum(n for _, n in stamps[1:])
                    row["pairs_per_s"] = round(steady / (tb - ta), 3)
                    row["gpu_busy"] = busy.share(ta, tb) if busy else None
                    row["load_and_first_batch_s"] = round(ta - t0, 2)
                stage_s = sum(res.stage_seconds.values())
                row["stage_seconds"] = {k: round(v, 2) for k, v in res.stage_seconds.items()}
                row["seconds_outside_stages"] = round(res.seconds - stage_s, 2)  # negative: stages overlapped
                log("e2e", f"{mode}/{set_name}", row)
    finally:
        writer_mod.DatasetWriter.add_batch = orig_add


def print_table(report: dict) -> str:
    lines = ["| measurement | images/s (pairs/s e2e) | raw | ratio | GPU busy | peak GB | notes |",
             "|---|---|---|---|---|---|---|"]
    for label, r in report.get("stages", {}).items():
        lines.append(f"| {label} bs{r['batch']} | {r['images_per_s']} | {r.get('raw_images_per_s', '-')} | "
                     f"{r.get('ratio', '-')} | {r.get('gpu_busy', '-')} | {r.get('peak_mem_gb', '-')} | "
                     f"raw busy {r.get('raw_gpu_busy', '-')} |")
    for label, r in report.get("e2e", {}).items():
        lines.append(f"| e2e {label}, {r['pairs']} pairs | {r.get('pairs_per_s', '-')} (wall {r['pairs_per_s_wall']}) | "
                     f"{r.get('raw_serial_ceiling_pairs_per_s', '-')} | {r.get('ratio', '-')} | "
                     f"{r.get('gpu_busy', '-')} | - | load+first batch {r.get('load_and_first_batch_s', '-')} s, "
                     f"outside stages {r['seconds_outside_stages']} s |")
    for label, r in report.get("host", {}).items():
        lines.append(f"| host overhead {label} (CPU, tiny models) | {r['stage_ms_per_image']} ms/img | "
                     f"forward {r['forward_ms_per_image']} ms/img | - | - | - | library pre/post "
                     f"{r['library_prepost_ms_per_image']} ms/img, host {r['host_ms_per_image']} ms/img |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--parts", nargs="+", default=None, choices=["stages", "e2e", "host"],
                    help="default: stages e2e on cuda, host on cpu (stages/e2e on cpu: a smoke test)")
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[16])
    ap.add_argument("--images", type=int, default=32, help="images per stage measurement")
    ap.add_argument("--pairs", type=int, default=96, help="scenes per end-to-end run")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--ray", action=argparse.BooleanOptionalAction, default=None,
                    help="also end to end through Ray Data (local Ray; default: on with cuda); on CPU, Ray "
                         "declares one GPU so the GPU schedule runs")
    ap.add_argument("--work", type=Path, default=None, help="where the random-weight models are saved")
    ap.add_argument("--clock", choices=["wall", "cpu"], default=None,
                    help="host overhead timed in wall time or in this process's CPU time on one thread "
                         "(default: cpu with --device cpu, wall on cuda)")
    ap.add_argument("--out", type=Path, default=None, help="JSON report")
    ap.add_argument("--table", type=Path, default=None, help="the markdown table")
    a = ap.parse_args()

    import torch

    global clock
    if (a.clock or ("cpu" if a.device == "cpu" else "wall")) == "cpu":
        import cv2

        torch.set_num_threads(1)  # every thread's CPU time would count; one keeps the split honest
        cv2.setNumThreads(1)
        clock = time.process_time
    if a.device == "cuda":
        assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU (or --device cpu)"
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    work = a.work or Path(tempfile.mkdtemp(prefix="cf-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    paths = build_models(work, {"localize", "segment", "edit", "verify"}) if a.device == "cuda" else tiny_models(work)
    report: dict = {"device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu",
                    "clock": "cpu" if clock is time.process_time else "wall",
                    "torch": torch.__version__, "size": a.size, "build_seconds": round(time.perf_counter() - t0, 1)}
    import diffusers
    import transformers

    report["transformers"], report["diffusers"] = transformers.__version__, diffusers.__version__
    print(json.dumps(report), flush=True)

    def log(part, label, row):
        report.setdefault(part, {})[label] = row
        print(part, label, json.dumps(row), flush=True)
        if a.out:  # after every row: a run cut short by its time limit still leaves its figures
            a.out.write_text(json.dumps(report, indent=2))

    sets = model_sets(paths, tiny=a.device == "cpu")
    inputs = {k: scene_samples(a.images, a.size, k, work) for k in set(INPUT_AFTER.values())}
    for s in inputs["edit"]:  # as after a detector localize: verify reuses the original's scores
        for inst in s.meta["instances"]:
            inst.setdefault("score", 0.5)
    with (BusyMeter() if a.device == "cuda" else _Null()) as busy:
        busy = busy if a.device == "cuda" else None
        parts = a.parts or (["stages", "e2e"] if a.device == "cuda" else ["host"])
        if "host" in parts:
            host_overhead_rows(sets, inputs, a.batch_sizes[-1], log)
        # end to end first: the headline figure survives a run cut short
        if "e2e" in parts:
            ray = a.ray if a.ray is not None else a.device == "cuda"
            e2e_rows(sets, work, a.pairs, a.size, max(a.batch_sizes), busy, ray, log)
        ceilings: dict = {}
        if "stages" in parts:
            for bs in a.batch_sizes:
                ceilings = stage_rows(sets, inputs, bs, a.device, busy, log)
    for label, row in report.get("e2e", {}).items():  # the serial raw ceiling of the same models
        ceil = ceilings.get(label.split("/", 1)[1])
        if ceil:
            row["raw_serial_ceiling_pairs_per_s"] = round(1.0 / sum(ceil.values()), 3)
            row["raw_ms_per_pair"] = {k: round(1e3 * v, 2) for k, v in ceil.items()}
            if "pairs_per_s" in row:
                row["ratio"] = round(row["pairs_per_s"] / row["raw_serial_ceiling_pairs_per_s"], 3)
            print("e2e", label, json.dumps(row), flush=True)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    table = print_table(report)
    print(table, flush=True)
    if a.out:
        a.out.write_text(json.dumps(report, indent=2))
    if a.table:
        a.table.write_text(table + "\n")


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    main()
