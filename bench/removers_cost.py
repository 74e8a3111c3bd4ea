"""Issue 31: what the removers and the object_invented check cost per removal, counted on tiny
real models on CPU (random weights cost what trained ones do, so the counts carry over to a GPU;
the seconds here do not). Prints one JSON line.

    PYTHONPATH=. python bench/removers_cost.py passes      # denoiser passes per removal
    PYTHONPATH=. python bench/removers_cost.py verify      # detector rows + CPU s of verify: redetect

``passes``: the edit stage of configs/gpu.yaml before issue 31 (SD 1.5 inpainting, 25 DPM++ steps,
guidance 7.5) and after (remover-sdxl, RORem's 4 LCM steps without CFG), and the two other
removers at their gpu.yaml settings, each on the same 12 procedural samples: the rows that went
through the UNet/transformer per removal. ``verify``: the redetect verifier on the same edited
samples (tiny Grounding DINO, one thread): detector image rows per batch and process CPU seconds
per batch (getrusage, mean of 5); run it in a checkout of 87cce25 for the before row
(``invented`` is then absent), and here with ``--off`` for the check turned off.
"""

from __future__ import annotations

import json
import resource
import sys
import tempfile
from pathlib import Path

import torch

from counterfactory.pipeline.runner import local_batches
from counterfactory.sample import decode_batch, encode_batch
from counterfactory.stages import get_backend
from tests import models_fixtures as fx
from tests.conftest import load_records, make_config, scenes_input


def samples(d: Path):
    cfg = make_config(d, [scenes_input(12, seed=5, questions=1)])
    return [s for b in local_batches(cfg, load_records(cfg), stop_after="edit") for s in decode_batch(b)]


def rows_of(module) -> list[int]:
    rows: list[int] = []

    def hook(mod, args, kw):
        x = args[0] if args else kw.get("sample", kw.get("hidden_states"))
        rows.append(int(x.shape[0]))

    module.register_forward_pre_hook(hook, with_kwargs=True)
    return rows


def passes(d: Path) -> dict:
    from tests import models_fixtures_removers as fr

    seg = samples(d)
    sdxl, fill, klein = fr.tiny_sdxl_inpaint(d / "sdxl"), fr.tiny_flux_fill(d / "fill"), fr.tiny_flux2_klein(d / "klein")
    setups = {
        "diffusers-inpaint (gpu.yaml before: SD 1.5, 25 dpmpp, cfg 7.5)": (
            "diffusers-inpaint", {"model": str(fx.sd_inpaint(d / "sd")), "steps": 25, "scheduler": "dpmpp",
                                  "guidance_scale": 7.5}),
        "remover-sdxl (gpu.yaml after: RORem, 4 lcm, no cfg)": (
            "remover-sdxl", {"model": str(sdxl), "steps": 4, "scheduler": "lcm", "guidance_scale": 1.0}),
        "remover-flux-fill (28 steps, distilled guidance)": (
            "remover-flux-fill", {"model": str(fill), "steps": 28, "native_size": 32, "max_sequence_length": 16,
                                  "loras": [{"id": str(fr.transformer_lora(d / "fl", fill, "FluxFillPipeline"))}]}),
        "remover-flux2-klein (4 steps, distilled)": (
            "remover-flux2-klein", {"model": str(klein), "steps": 4, "native_size": 32, "max_sequence_length": 32,
                                    "text_encoder_out_layers": [1],
                                    "loras": [{"id": str(fr.transformer_lora(d / "kl", klein,
                                                                             "Flux2KleinInpaintPipeline"))}]}),
    }
    out = {}
    for label, (backend, params) in setups.items():
        st = get_backend("edit", backend)(params=params | {"device": "cpu", "variants": ["remove"], "batch_size": 16},
                                          run={"seed": 0})
        rows = rows_of(getattr(st.pipe, "unet", None) or st.pipe.transformer)
        ss = decode_batch(encode_batch(seg))
        st.process_batch(ss)
        made = sum("remove" in s.meta["variants"] for s in ss)
        out[label] = {"removals": made, "denoiser_rows_per_removal": round(sum(rows) / made, 2)}
    return out


def verify(d: Path, off: bool) -> dict:
    torch.set_num_threads(1)
    seg = samples(d)
    params = {"model": str(fx.grounding_dino(d / "gd")), "detector": "grounding-dino", "device": "cpu",
              "batch_size": 16, "score_original": False}
    if off:
        params["invented_threshold"] = None
    st = get_backend("verify", "redetect")(params=params, run={"seed": 0})
    rows: list[int] = []
    st.detector.model.register_forward_pre_hook(lambda m, a, kw: rows.append(kw["pixel_values"].shape[0]),
                                                with_kwargs=True)
    st.process_batch(decode_batch(encode_batch(seg)))  # warm-up
    rows.clear()

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    reps, t0 = 5, cpu()
    for _ in range(reps):
        ss = decode_batch(encode_batch(seg))
        st.process_batch(ss)
    reasons = [r["reason"] for s in ss for r in s.meta.get("variant_rejects", []) if r["stage"] == "verify"]
    return {"samples": len(ss), "invented": "off" if off else ("on" if "invented_threshold" in type(st.params).model_fields
                                                                else "absent"),
            "detector_rows_per_batch": sum(rows) // reps, "cpu_s_per_batch": round((cpu() - t0) / reps, 3),
            "verify_rejects": {r: reasons.count(r) for r in sorted(set(reasons))}}


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        what = sys.argv[1] if len(sys.argv) > 1 else "verify"
        res = passes(Path(tmp)) if what == "passes" else verify(Path(tmp), "--off" in sys.argv)
        print(json.dumps(res))
