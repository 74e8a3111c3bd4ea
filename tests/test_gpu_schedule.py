"""Issue 28: the GPU path proven without a GPU.

A model stage's host work (pixel checks, crops and paste-back, mask finish) runs in CPU steps
beside its actor, with the same bytes as the stage run whole; and the schedule a GPU node gets
(configs/gpu.yaml: model stages as actor pools holding fractions of one GPU, host work in CPU
tasks) runs here under a declared GPU, with the tiny test models in place of the real ones.
"""

from __future__ import annotations

import json
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from counterfactory.pipeline.config import load_config, validate_config
from counterfactory.pipeline.runner import plan_steps, run_pipeline
from counterfactory.sample import Sample
from counterfactory.stages import get_backend
from counterfactory.stages.models.common import HostStep
from tests import models_fixtures as fx
from tests.conftest import fresh, scenes_input, segmented_scenes
from tests.models_fixtures_removers import tiny_sdxl_inpaint

GPU_YAML = Path(__file__).resolve().parents[1] / "configs" / "gpu.yaml"
RUN = {"seed": 0, "abstain_answer": "unknown"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("tiny-models-i28")
    return {"gd": fx.grounding_dino(d / "gd"), "sam_hf": fx.sam_hf(d / "sam_hf"), "sd": fx.sd_inpaint(d / "sd"),
            "sdxl": tiny_sdxl_inpaint(d / "sdxl"), "llm": fx.tiny_llm(d / "llm")}


@pytest.fixture(scope="module")
def segmented(tmp_path_factory) -> list[Sample]:
    return segmented_scenes(tmp_path_factory.mktemp("seg-i28"), questions=2)


def rows(samples: list[Sample]) -> list[tuple]:
    """What a step hands on, less the timings (which differ run to run)."""
    out = []
    for s in samples:
        meta = {k: v for k, v in s.meta.items() if k != "seconds"}
        out.append((s.key, s.status, json.dumps(meta, sort_keys=True), sorted(s.arrays),
                    [s.arrays[k].tobytes() for k in sorted(s.arrays)]))
    return out


SPLIT_CASES = {
    "segment": ("sam-hf", lambda m: {"model": str(m["sam_hf"])}),
    "edit": ("diffusers-inpaint", lambda m: {"model": str(m["sd"]), "steps": 2, "guidance_scale": 1.0,
                                              "variants": ["remove", "insert", "blackout", "random_mask"]}),
    "verify": ("redetect", lambda m: {"model": str(m["gd"]), "redetect_threshold": 0.5, "min_overlap": 0.0,
                                      "text_threshold": 0.0}),
}


@pytest.mark.parametrize("name", list(SPLIT_CASES))
def test_a_split_model_stage_writes_what_the_whole_stage_writes(name, tiny, segmented):
    """Host parts in CPU steps, the model part in its actor, rows (de)serialized between them as
    Ray hands them on: the same samples, arrays and metadata as the stage run whole."""
    backend, params = SPLIT_CASES[name]
    cls = get_backend(name, backend)
    p = cls.Params.model_validate(params(tiny) | {"device": "cpu", "batch_size": 2})
    inputs = fresh(segmented)
    assert all(s.meta["instances"] and s.meta["variants"] for s in inputs)  # boxes to prompt, edits to verify
    whole = cls(params=p, run=RUN)
    assert whole.host_parts and not whole.split
    a = fresh(inputs)
    whole.apply(a)

    host = cls.host_only(p, RUN)
    for attr in ("model", "pipe", "detector"):
        assert not hasattr(host, attr), f"the host part of {name} loaded its {attr}"
    model = cls(params=p, run=RUN)
    model.split = True
    b = fresh(inputs)
    if "before" in cls.host_parts:
        HostStep(host, "before").apply(b)
        b = fresh(b)
    model.apply(b)
    b = fresh(b)
    if "after" in cls.host_parts:
        HostStep(host, "after").apply(b)
    assert rows(a) == rows(b)
    assert any(s.ok for s in a)
    assert not any(k.startswith("_") for s in b for k in [*s.meta, *s.arrays]), "temporary keys left"
    assert all(f"{name}+host" in s.meta["seconds"] for s in b if s.ok)


def test_the_gpu_plan_puts_host_work_in_cpu_steps_beside_the_actors():
    """configs/gpu.yaml as a GPU node gets it: each model stage one actor holding its fraction of
    the one GPU; its host work in CPU task steps (fused where they meet); encoding on CPU."""
    cfg = load_config(GPU_YAML)
    steps = [(st.names, st.actors, st.resources.num_gpus, st.resources.concurrency) for st in plan_steps(cfg)]
    assert steps == [
        ("ingest", False, 0.0, None),
        ("localize", True, 0.15, 1),
        ("segment", True, 0.2, 1),
        ("segment(after)+edit(before)", False, 0.0, None),
        ("edit", True, 0.4, 1),
        ("edit(after)", False, 0.0, None),
        ("qa", True, 0.2, 1),
        ("verify(before)", False, 0.0, None),
        ("verify", True, 0.05, 1),
    ]
    gpu = [st for st in plan_steps(cfg) if st.resources.num_gpus]
    assert abs(sum(st.resources.num_gpus for st in gpu) - 1.0) < 1e-9  # all of them fit on one GPU at once
    assert all(st.actors for st in gpu)


def gpu_config_with_tiny_models(tiny: dict[str, Path], root: Path, n: int) -> dict:
    """configs/gpu.yaml with the tiny test models in place of the hub ones (GPU fractions and
    concurrency kept; one CPU per stage, so the test cluster's few CPUs hold every actor)."""
    data = yaml.safe_load(GPU_YAML.read_text())
    data["inputs"] = [scenes_input(n, seed=3, questions=1)]
    data["output"].update(root=str(root), shard_size=4)
    st = {s["name"]: s for s in data["stages"]}
    for s in st.values():
        s["resources"].update(num_cpus=1, batch_size=4)
    st["localize"]["params"].update(model=str(tiny["gd"]), revision=None, box_threshold=0.0, text_threshold=0.0,
                                    max_instances=3, batch_size=4)
    st["segment"]["params"].update(model=str(tiny["sam_hf"]), revision=None, batch_size=4)
    if st["edit"]["backend"] == "remover-sdxl":  # gpu.yaml's remover (issue 31): a tiny SDXL inpainting UNet
        st["edit"]["params"].update(model=str(tiny["sdxl"]), revision=None, loras=[], steps=2, native_size=64,
                                    batch_size=4)
    else:
        st["edit"]["params"].update(model=str(tiny["sd"]), revision=None, steps=2, scheduler="default",
                                    guidance_scale=1.0, batch_size=4)
    st["qa"]["params"].update(model=str(tiny["llm"]), revision=None, max_new_tokens=16, max_reasks=1, batch_size=4)
    st["verify"]["params"].update(model=str(tiny["gd"]), revision=None, redetect_threshold=1.0, min_inside_mad=0.0,
                                  batch_size=4)
    return data


@pytest.fixture(scope="module")
def ray_one_gpu():
    """Local Ray that declares one GPU on this CPU machine (a session's ``ray_local`` is put back)."""
    import ray

    was = ray.is_initialized()
    if was:
        ray.shutdown()
    ray.init(num_cpus=6, num_gpus=1, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
    if was:
        ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)


def test_the_gpu_schedule_runs_under_a_declared_gpu_with_the_local_bytes(tiny, tmp_path, ray_one_gpu):
    """The GPU config's stage graph through Ray Data with a declared GPU: every model actor holds
    its fraction at the same time (the GPU's free share falls to 0 while they run), the models
    run on the CPU (no CUDA here: device auto resolves by torch.cuda.is_available()), and the
    version is byte for byte the single-process run's."""
    ray = ray_one_gpu
    assert ray.cluster_resources().get("GPU") == 1
    local_cfg = validate_config(gpu_config_with_tiny_models(tiny, tmp_path / "local", 4), source="test",
                                base_dir=tmp_path)
    ray_cfg = validate_config(gpu_config_with_tiny_models(tiny, tmp_path / "ray", 4), source="test",
                              base_dir=tmp_path)
    local = run_pipeline(local_cfg, local=True, progress=False)

    free: list[float] = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            free.append(ray.available_resources().get("GPU", 0.0))
            time.sleep(0.05)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        res = run_pipeline(ray_cfg, local=False, progress=False)
    finally:
        stop.set()
        t.join(5)
    assert free and min(free) < 1e-6, f"the five model actors never held the GPU together (free: {min(free)})"
    assert res.manifest["counts"]["samples"] >= 1
    assert res.manifest["counts"] == local.manifest["counts"]
    shards = sorted(p.name for p in res.out_dir.glob("*.tar"))
    assert shards == sorted(p.name for p in local.out_dir.glob("*.tar"))
    for name in shards:
        assert (res.out_dir / name).read_bytes() == (local.out_dir / name).read_bytes(), name
    docs = [json.loads(tarfile.open(res.out_dir / shards[0]).extractfile(m).read())
            for m in tarfile.open(res.out_dir / shards[0]).getmembers() if m.name.endswith(".json")]
    models = [rec for d in docs for st in d["provenance"]["stages"].values() for rec in st.get("models", {}).values()]
    assert models and all(rec["device"] == "cpu" for rec in models if isinstance(rec, dict) and "device" in rec)
    assert np.isfinite(res.seconds)


def test_owlv2_takes_uint8_tensors_with_the_processors_exact_inputs(tmp_path):
    """OWLv2 (localize and the verify re-detection) now hands the processor uint8 tensors moved
    once, as Grounding DINO and SAM do: the model gets exactly what the numpy path gives it."""
    import torch
    from transformers import Owlv2Processor

    from counterfactory.stages.models.common import images_to_device

    proc = Owlv2Processor.from_pretrained(fx.owlv2(tmp_path / "owl"))
    rng = np.random.default_rng(1)
    imgs = [rng.integers(0, 255, (80, 96, 3), dtype=np.uint8) for _ in range(2)]
    imgs.append(rng.integers(0, 255, (64, 48, 3), dtype=np.uint8))
    text = [["a cat", "a dog"]] * 3
    kw = {"return_tensors": "pt", "padding": "max_length", "truncation": True, "device": "cpu"}
    a = proc(images=imgs, text=text, **kw)
    b = proc(images=images_to_device(imgs, "cpu"), text=text, **kw)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
