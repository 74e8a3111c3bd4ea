"""The unit that flows through the stage graph, and the base class every stage derives from.

A Ray Data batch is a dict of numpy columns with one row per input:

- ``idx``    int64   position of the input in the run's input list (the writer's stable order)
- ``key``    str     the sample key ("" until ingest computes it)
- ``status`` str     "ok" or "rejected"
- ``meta``   str     JSON: everything small (source, questions, boxes, answers, metrics, rejects)
- ``blob``   bytes   pickled dict of numpy arrays (image, masks, variants); empty once rejected

Arrays travel as one pickled blob instead of tensor columns because their shapes differ per
row and per variant; pickle protocol 5 of contiguous arrays is a plain memory copy. The blob is
produced and consumed only inside the pipeline, never read from user-supplied files.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

COLUMNS = ("idx", "key", "status", "meta", "blob")


# The answer every question gets where its evidence was removed (config ``abstain_answer``)
ABSTAIN_ANSWER = "unknown"


class LimitsConfig(BaseModel):
    """Bounds on what one input may cost (config ``limits:``), read by ingest on the workers."""

    model_config = ConfigDict(extra="forbid")

    max_pixels: int = Field(16_000_000, ge=1, description="pixel cap per decoded image")
    min_side: int = Field(16, ge=1)
    oversize: Literal["reject", "downscale"] = "reject"
    # downscale decodes first: a JPEG at 1/2..1/8 of its size, PNG/TIFF/WebP only at full size,
    # so a small file declaring a huge canvas (a decompression bomb) is refused above this
    max_decode_pixels: int = Field(100_000_000, ge=1, description="with oversize: downscale, the largest "
                                   "decode before downscaling")
    max_image_bytes: int = Field(512 << 20, ge=1, description="largest image file read")
    # bounds on what a config or an annotation file can make the driver hold, checked before
    # anything is allocated: a typo such as count: 1000000000000 is an error, not a hang
    max_inputs: int = Field(1_000_000, ge=1, description="most input records of a run (procedural "
                            "scenes x questions, manifest questions, COCO questions)")
    max_objects: int = Field(256, ge=1, description="most annotated objects per image; more is a "
                             "too_many_objects reject (each box may cost a GrabCut)")
    max_annotation_bytes: int = Field(2 << 30, ge=1, description="largest COCO annotation file read")


class RunSettings(BaseModel):
    """Run-level settings every stage may read, typed: the config's values, built once in the
    driver (``PipelineConfig.run_settings``) and handed to each stage as this object."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = 0
    abstain_answer: str = ABSTAIN_ANSWER
    limits: LimitsConfig = Field(default_factory=LimitsConfig)


class StageStartError(RuntimeError):
    """A stage that could not be built where it runs (weights missing, refused, unreachable)."""


class Reject(Exception):
    """Raised inside a stage's ``process`` to reject the sample with a reason (a data fault)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class Sample:
    idx: int
    key: str
    status: str
    meta: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def reject(self, stage: str, reason: str, detail: str = "") -> None:
        self.status = "rejected"
        self.meta["reject"] = {"stage": stage, "reason": reason, "detail": detail[:500]}
        self.arrays = {}

    def reject_variant(self, stage: str, variant: str, reason: str, detail: str = "") -> None:
        """Drop one variant of an otherwise good sample, recording why (never silently)."""
        self.meta.setdefault("variant_rejects", []).append(
            {"stage": stage, "variant": variant, "reason": reason, "detail": detail[:500]}
        )
        self.arrays.pop(f"variant/{variant}", None)
        self.arrays.pop(f"mask/{variant}", None)
        self.meta["variants"] = [v for v in self.meta.get("variants", []) if v != variant]
        self.meta.get("edits", {}).pop(variant, None)
        for item in self.meta.get("qa", []):
            item["answers"].pop(variant, None)

    @property
    def seed(self) -> int:
        """Per-sample seed from the run seed and the key: independent of batching and order."""
        digest = hashlib.sha256(f"{self.meta['run_seed']}:{self.key}".encode()).digest()
        return int.from_bytes(digest[:4], "little")


def decode_batch(batch: dict[str, np.ndarray]) -> list[Sample]:
    out = []
    for i in range(len(batch["idx"])):
        blob = batch["blob"][i]
        out.append(
            Sample(
                idx=int(batch["idx"][i]),
                key=str(batch["key"][i]),
                status=str(batch["status"][i]),
                meta=json.loads(batch["meta"][i]),
                arrays=pickle.loads(blob) if len(blob) else {},
            )
        )
    return out


def encode_batch(samples: list[Sample]) -> dict[str, np.ndarray]:
    return {
        "idx": np.array([s.idx for s in samples], dtype=np.int64),
        "key": np.array([s.key for s in samples], dtype=object),
        "status": np.array([s.status for s in samples], dtype=object),
        "meta": np.array([json.dumps(s.meta, sort_keys=True) for s in samples], dtype=object),
        "blob": np.array(
            [pickle.dumps(s.arrays, protocol=5) if s.ok and s.arrays else b"" for s in samples],
            dtype=object,
        ),
    }


class Stage:
    """One pipeline step. Subclasses set ``name``/``backend``/``Params`` and implement ``process``.

    The constructor receives validated params and run-level settings and builds any heavy state
    (models) once per Ray worker; ``__call__`` is what Ray Data's ``map_batches`` invokes.
    A bad sample never raises out of ``__call__``: it is marked rejected with a reason.
    """

    name: ClassVar[str]
    backend: ClassVar[str] = "default"
    # Stages that hold models set this: they always run as a Ray actor pool.
    stateful: ClassVar[bool] = False

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

    def __init__(self, params: BaseModel | dict[str, Any] | None = None,
                 run: RunSettings | dict[str, Any] | None = None) -> None:
        # a run hands over the objects the driver validated (``PipelineConfig``); a dict (tests,
        # benchmarks, a stage built by hand) is validated here, the one other place
        self.params = params if isinstance(params, self.Params) else self.Params.model_validate(params or {})
        self.run = run if isinstance(run, RunSettings) else RunSettings.model_validate(run or {})

    def describe(self) -> dict[str, Any]:
        """Backend name and parameters, recorded in every sample's provenance."""
        return {"backend": self.backend, "params": self.params.model_dump(mode="json")}

    def process(self, sample: Sample) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def process_batch(self, samples: list[Sample]) -> None:
        """Per-sample by default; model backends override this to batch on the GPU."""
        for s in samples:
            self.guarded(s, self.process)

    def guarded(self, sample: Sample, fn: Any) -> None:
        try:
            fn(sample)
        except Reject as r:
            sample.reject(self.name, r.reason, r.detail)
        except Exception as exc:  # a bug or an unexpected input: reject this one, keep the run
            tb = traceback.format_exc(limit=3).strip().splitlines()[-1]
            sample.reject(self.name, "stage_error", f"{type(exc).__name__}: {exc} | {tb}")

    def apply(self, samples: list[Sample]) -> None:
        """Process the live samples in place: timing, provenance, rejects."""
        live = [s for s in samples if s.ok]
        if not live:
            return
        t0 = time.perf_counter()
        try:
            self.process_batch(live)
        except Exception:  # a batched backend failed as a whole: retry one by one, so only
            for s in live:  # the samples that fail on their own are rejected
                if s.ok:
                    self.guarded(s, lambda x: self.process_batch([x]))
        share = (time.perf_counter() - t0) / len(live)
        desc = self.describe()
        for s in live:
            s.meta.setdefault("seconds", {})[self.name] = round(share, 6)
            if s.ok:
                s.meta.setdefault("provenance", {}).setdefault("stages", {})[self.name] = desc

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        samples = decode_batch(batch)
        self.apply(samples)
        return encode_batch(samples)
