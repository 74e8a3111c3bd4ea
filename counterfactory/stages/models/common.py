"""Shared plumbing for model backends: optional dependencies, device/dtype, safe loading,
provenance of weights, and CUDA out-of-memory back-off.

Nothing heavy is imported at module level: ``torch`` and friends are imported inside the
functions, so importing the stage registry stays cheap on CPU-only machines.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Device = Literal["auto", "cpu", "cuda"]
DType = Literal["auto", "float16", "bfloat16", "float32"]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class MissingDependency(ImportError):
    """An optional library a backend needs is not installed (raised at stage construction)."""


def require(module: str, install: str, backend: str) -> Any:
    """Import ``module`` or fail with a message naming the package to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependency(
            f"backend {backend!r} needs the Python module {module!r}: pip install '{install}' ({exc})"
        ) from exc


class ModelParams(BaseModel):
    """Parameters every model backend shares: where the weights are and where they run."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    model: str = Field(description="hub id or local directory (an air-gapped mirror works the same)")
    revision: str | None = Field(None, description="git revision of a hub id; recorded in provenance")
    trust_remote_code: bool = Field(False, description="allow custom code shipped with the model (off by default)")
    device: Device = "auto"
    dtype: DType = Field("auto", description="auto: bfloat16/float16 on GPU, float32 on CPU")
    batch_size: int = Field(8, ge=1, description="model micro-batch; halved on CUDA out-of-memory")
    compile: bool = Field(False, description="torch.compile the model's heavy module (GPU only; ignored on "
                          "CPU with a warning): the first batches pay the compile time")

    @field_validator("compile")
    @classmethod
    def _compile_needs_torch2(cls, v: bool) -> bool:
        return check_compile(v)

    @field_validator("model")
    @classmethod
    def _no_pickles_in_a_folder_seen_here(cls, v: str) -> str:
        # The worker refuses it again when it loads; checking it here too (where the driver sees
        # the folder) makes it one config line before Ray starts an actor that would die with
        # a page of traceback. A folder only the workers see is left to them.
        if Path(v).expanduser().exists():
            refuse_pickles(v)
        return v


MIN_COMPILE_TORCH = (2, 1)


def check_compile(v: bool) -> bool:
    """``compile: true`` on a torch without a working ``torch.compile`` is a config error (one
    line, before anything loads), not a crash at the first batch."""
    if not v:
        return v
    try:
        import torch
    except ImportError:
        return v  # the backend's own require() names torch when the stage starts
    parts = []
    for x in torch.__version__.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in x if ch.isdigit())
        parts.append(int(digits or 0))
    if tuple(parts) < MIN_COMPILE_TORCH or not hasattr(torch, "compile"):
        raise ValueError(f"compile: true needs torch>={'.'.join(map(str, MIN_COMPILE_TORCH))} "
                         f"(this is torch {torch.__version__})")
    return v


def maybe_compile(module: Any, enabled: bool, device: str, what: str) -> Any:
    """``torch.compile`` a module where it pays (CUDA); on CPU the flag is accepted and ignored
    with a warning, so one config serves a laptop dry run and the GPU job."""
    if not enabled:
        return module
    if device != "cuda":
        import warnings

        warnings.warn(f"compile: true ignored for {what} on {device} (compiled only on CUDA)", stacklevel=2)
        return module
    import torch

    return torch.compile(module)  # default mode: max-autotune tunes for minutes per shape


def images_to_device(images: Sequence[Any], device: str) -> list[Any]:
    """RGB uint8 HWC arrays -> CHW uint8 tensors on ``device``, one host-to-device copy per
    group of equal-sized images (a batch of scenes is one copy), no float conversion on the host:
    the processors then resize and normalize them where the model runs, 4x fewer bytes cross."""
    import numpy as np
    import torch

    out: list[Any] = [None] * len(images)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(tuple(im.shape), []).append(i)
    for idx in groups.values():
        batch = torch.from_numpy(np.stack([images[i] for i in idx])).to(device, non_blocking=True)
        for j, t in zip(idx, batch.permute(0, 3, 1, 2), strict=True):
            out[j] = t
    return out


def channels_last(module: Any, device: str) -> Any:
    """Convolution-heavy modules run faster in NHWC on CUDA (cuDNN picks tensor-core kernels
    without a transpose per layer); on CPU the layout is left alone (no gain, different bits)."""
    if device == "cuda":
        import torch

        module.to(memory_format=torch.channels_last)
    return module


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch.cuda.is_available() is False")
    return device


def resolve_dtype(dtype: str, device: str, prefer: str = "float16"):
    """float32 on CPU always (half precision there is slow or unsupported)."""
    import torch

    if device == "cpu":
        return torch.float32
    if dtype == "auto":
        if prefer == "bfloat16" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16
    return getattr(torch, dtype)


def refuse_pickles(ref: str) -> None:
    """A local model directory (or file) must hold safetensors weights: pickle checkpoints run
    code when loaded, so one without safetensors is refused before anything reads it."""
    p = Path(ref).expanduser()
    if not p.exists():
        if ref.startswith(("/", "./", "../", "~")) or ref.count("/") > 1:  # a path, not org/name
            raise FileNotFoundError(f"{ref}: no such model folder on this node (a hub id reads 'org/name')")
        return  # a hub id: from_pretrained(use_safetensors=True) refuses pickles there
    files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
    pickles = [f for f in files if f.suffix in PICKLE_SUFFIXES]
    safe = [f for f in files if f.suffix == ".safetensors"]
    if p.is_file() and p.suffix != ".safetensors":
        raise ValueError(f"{p}: only .safetensors checkpoints are loaded (pickle checkpoints run code); "
                         "convert it with safetensors.torch.save_file")
    if pickles and not safe:
        raise ValueError(f"{p}: holds only pickle checkpoints ({pickles[0].name}); "
                         "only safetensors weights are loaded")


def fingerprint(ref: str) -> str | None:
    """For a local directory: a short hash of its config files and weight file sizes, so
    provenance tells two local copies apart without reading gigabytes."""
    p = Path(ref).expanduser()
    if not p.exists():
        return None
    h = hashlib.sha256()
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    for f in files:
        rel = f.name if p.is_file() else str(f.relative_to(p))
        h.update(rel.encode())
        if f.suffix == ".json" and f.stat().st_size < 1_000_000:
            h.update(f.read_bytes())
        else:
            h.update(str(f.stat().st_size).encode())
    return h.hexdigest()[:16]


def resolved_commit(ref: str, revision: str | None) -> str | None:
    """The Hub commit a loaded ``ref@revision`` came from, read from the local Hub cache (its
    snapshot folder is named by the commit): a branch such as ``main`` moves, the commit does not,
    so provenance records both. None for a local folder or when nothing is cached."""
    if not ref or Path(ref).expanduser().exists():
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        for name in ("config.json", "model_index.json"):
            hit = try_to_load_from_cache(ref, name, revision=revision or "main")
            if isinstance(hit, str):
                parts = Path(hit).parts
                if "snapshots" in parts:
                    return parts[parts.index("snapshots") + 1]
    except Exception:  # noqa: BLE001 - provenance is best effort, never a reason to fail
        return None
    return None


def model_record(ref: str, revision: str | None, **extra: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {"id": ref, "revision": revision}
    fp = fingerprint(ref)
    if fp:
        rec["local_fingerprint"] = fp
    commit = resolved_commit(ref, revision)
    if commit and commit != revision:
        rec["commit"] = commit
    rec.update(extra)
    return rec


def place(obj: Any, weights: str, device: str, dtype: str, prefer: str = "float16") -> None:
    """What every model backend does before loading: refuse pickled weights, then pick the
    device and the dtype (``obj.device``, ``obj.dtype``)."""
    refuse_pickles(weights)
    obj.device = resolve_device(device)
    obj.dtype = resolve_dtype(dtype, obj.device, prefer=prefer)


def transformers_setup(obj: Any, p: ModelParams, backend: str, prefer: str = "float16") -> tuple[Any, dict[str, Any]]:
    """The start of every transformers backend: its libraries present, the weights not pickled,
    device and dtype chosen (``obj.device``/``obj.dtype``). Returns (transformers, load kwargs)."""
    require("torch", "torch", backend)
    tf = require("transformers", "transformers>=4.45", backend)
    place(obj, p.model, p.device, p.dtype, prefer=prefer)
    return tf, load_kwargs(p)


def load_pretrained(model_cls: Any, p: ModelParams, backend: str, **kw: Any) -> Any:
    """``model_cls.from_pretrained`` after checking that the folder or hub id holds that
    architecture: transformers only warns when, say, an OWLv2 folder is loaded as Grounding DINO,
    and the run would go on with random weights under the wrong name in provenance."""
    from transformers import PretrainedConfig

    want = getattr(model_cls.config_class, "model_type", "")
    config, _ = PretrainedConfig.get_config_dict(p.model, revision=p.revision)
    got = config.get("model_type")
    if want and got and got != want:
        raise ValueError(f"{p.model}: a '{got}' model, but the {backend} backend loads '{want}' "
                         f"({model_cls.__name__})")
    return model_cls.from_pretrained(p.model, **kw)


def load_kwargs(p: ModelParams) -> dict[str, Any]:
    return {"revision": p.revision, "trust_remote_code": p.trust_remote_code, "use_safetensors": True}


def is_oom(exc: BaseException) -> bool:
    try:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return True
    except ImportError:  # pragma: no cover
        pass
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _empty_cache() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass


@dataclass
class BatchRun:
    """Outputs per item (None where it failed), failures per item index, and the batch sizes
    actually tried (for the log and the tests)."""

    outputs: list[Any]
    failures: dict[int, tuple[str, str]] = field(default_factory=dict)
    sizes: list[int] = field(default_factory=list)


def run_batched(fn: Callable[[Sequence[Any]], Sequence[Any]], items: Sequence[Any], batch_size: int,
                *, oom: Callable[[BaseException], bool] = is_oom,
                on_oom: Callable[[], None] = _empty_cache) -> BatchRun:
    """Call ``fn`` on micro-batches. CUDA out-of-memory halves the batch size (it stays halved
    for the rest of the call) down to 1; an item that still runs out of memory alone fails
    with ``cuda_oom`` and the rest go on. Any other error of a multi-item batch is retried
    item by item, so one bad input fails alone (``model_error``)."""
    out: list[Any] = [None] * len(items)
    run = BatchRun(out)
    bs = max(1, int(batch_size))
    i = 0
    singles_until = -1  # after a non-OOM error, run items one by one up to this index
    while i < len(items):
        size = 1 if i < singles_until else bs
        chunk = items[i:i + size]
        run.sizes.append(len(chunk))
        try:
            res = list(fn(chunk))
            if len(res) != len(chunk):
                raise RuntimeError(f"model step returned {len(res)} outputs for {len(chunk)} inputs")
        except Exception as exc:  # noqa: BLE001 - sorted into OOM / other below
            if oom(exc):
                on_oom()
                if len(chunk) > 1:
                    bs = max(1, len(chunk) // 2)
                    continue
                run.failures[i] = ("cuda_oom", f"out of memory at batch size 1: {str(exc)[:200]}")
                i += 1
                continue
            if len(chunk) > 1:
                singles_until = i + len(chunk)
                continue
            run.failures[i] = ("model_error", f"{type(exc).__name__}: {str(exc)[:300]}")
            i += 1
            continue
        out[i:i + len(chunk)] = res
        i += len(chunk)
    return run


HostPart = Literal["before", "after"]


class SplitStage:
    """A model stage whose host work (crops, paste-back, pixel checks, mask dilation) can run in
    CPU steps beside its actor instead of inside it (issue 28): the GPU waits for none of it.

    A subclass (mixed in before ``Stage``) names its parts in ``host_parts`` and implements
    ``model_batch`` (what needs the model) and ``host_before`` / ``host_after`` (what does not:
    they use ``self.params``, ``self.run`` and whatever ``_init_host`` sets, never the model).
    Whole (``split`` False: a stage built by hand, a test) ``process_batch`` runs the three in
    order; ``runner.plan_steps`` splits it into a CPU task step, the actor step and a CPU task
    step, and the chain builds the host parts with ``host_only`` (no model loaded). Both ways
    run the same code on the same samples in the same order, so the bytes are the same."""

    host_parts: tuple[HostPart, ...] = ()
    split: bool = False

    def _init_host(self) -> None:
        """Light state the host parts need, read without loading the model (``host_only``); the
        model's constructor sets the same from the loaded model."""

    @classmethod
    def host_only(cls, params: Any, run: Any) -> Any:
        from counterfactory.sample import Stage

        obj = cls.__new__(cls)
        Stage.__init__(obj, params, run)  # params validated, no model loaded
        obj._init_host()
        return obj

    def host_before(self, samples: list[Any]) -> None:
        """CPU work before the model (default: none)."""

    def host_after(self, samples: list[Any]) -> None:
        """CPU work after the model (default: none)."""

    def model_batch(self, samples: list[Any]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def process_batch(self, samples: list[Any]) -> None:
        if not self.split and "before" in self.host_parts:
            self.host_before(samples)
        live = [s for s in samples if s.ok]
        if live:
            self.model_batch(live)
        if not self.split and "after" in self.host_parts:
            live = [s for s in samples if s.ok]
            if live:
                self.host_after(live)


class HostStep:
    """One host part of a split model stage, as a chain member of a CPU step: it times itself
    under ``<stage>+host`` (the model part keeps the stage's own figure) and leaves provenance
    to the model part (the same record as an unsplit run's)."""

    def __init__(self, stage: Any, part: HostPart) -> None:
        self.stage, self.part = stage, part
        self.name = stage.name

    def apply(self, samples: list[Any]) -> None:
        import time

        live = [s for s in samples if s.ok]
        if not live:
            return
        t0 = time.perf_counter()
        fn = self.stage.host_before if self.part == "before" else self.stage.host_after
        try:
            fn(live)
        except Exception:  # noqa: BLE001 - as Stage.apply: one by one, so only the bad one fails
            for s in live:
                if s.ok:
                    self.stage.guarded(s, lambda x: fn([x]))
        share = (time.perf_counter() - t0) / len(live)
        for s in live:
            secs = s.meta.setdefault("seconds", {})
            secs[f"{self.name}+host"] = round(secs.get(f"{self.name}+host", 0.0) + share, 6)
