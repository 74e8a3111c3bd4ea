"""The unit that flows through the stage graph, and the base class every stage derives from.

A Ray Data batch is a dict of numpy columns with one row per input:

- ``idx``    int64   position of the input in the run's input list (the writer's stable order)
- ``key``    str     the sample key ("" until ingest computes it)
- ``status`` str     "ok" or "rejected"
- ``meta``   str     JSON: everything small (source, questions, boxes, answers, metrics, rejects;
                     every key is declared in ``SampleMeta``)
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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, TypedDict

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from counterfactory.video_io import MAX_PIXELS

# The answer every question gets where its evidence was removed (config ``abstain_answer``)
ABSTAIN_ANSWER = "unknown"


class LimitsConfig(BaseModel):
    """Bounds on what one input may cost (config ``limits:``), read by ingest on the workers."""

    model_config = ConfigDict(extra="forbid")

    max_pixels: int = Field(MAX_PIXELS, ge=1, description="pixel cap per decoded image (a clip: per frame)")
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
    # the run's cut-out bank for photo inserts (``pipeline.cutout_bank.build_bank``, made in the driver)
    cutouts: tuple[dict[str, Any], ...] = ()


class StageStartError(RuntimeError):
    """A stage that could not be built where it runs (weights missing, refused, unreachable)."""


class Reject(Exception):
    """Raised inside a stage's ``process`` to reject the sample with a reason (a data fault)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class SampleMeta(TypedDict, total=False):
    """Every key of ``Sample.meta``: what the driver puts in, what each stage reads and writes,
    and what the writer takes out (``pipeline.writer.sample_json``). All optional: a key exists
    from the stage that sets it on. Nested records (a question, an instance, an edit) stay
    plain dicts; their fields are described where they are made."""

    # --- the input record (pipeline.inputs) and the run (pipeline.runner) --------------------
    origin: str  # where the input came from: "file#line", "procedural:seed/i#q0", ...; popped by ingest
    uri: str  # the input's image or clip (a path or URI), until ingest moves it into source
    media: Literal["video"]  # set on clip inputs; absent for images
    question: dict[str, Any]  # an image input's one question: question, kind, answer?, targets?
    questions: list[dict[str, Any]]  # a clip's questions (localize keeps those whose targets are found)
    objects: list[dict[str, Any]]  # annotated objects as read (category, box/polygons/keyframes, attributes)
    exhaustive: str | list[str]  # categories annotated exhaustively: "*" or names (qa asserts absence only there)
    span: list[float] | None  # a clip's [start, end] seconds, None for the whole clip
    error: str  # "reason: detail" of an input the driver found broken (ingest rejects with it)
    run_seed: int  # the run's seed (Sample.seed derives the per-sample seed from it)
    config_hash: str  # the run's config hash, recorded in provenance
    # --- ingest -------------------------------------------------------------------------------
    # the input as read: "image" (an image's URI) or "video" (a clip's; ``index.source_uri``
    # reads either), origin, sha256, width, height, format, scale, notes; a clip: times, fps
    source: dict[str, Any]
    # --- localize -----------------------------------------------------------------------------
    targets: list[str]  # the categories the question is about (the evidence)
    target_phrase: str  # "red circle" where the question names an attribute of its target
    target_source: str  # where a detector's phrases came from: input, rules, llm, rules-fallback
    annotated: list[dict[str, Any]]  # every annotated object (category, box, polygons): never covered or copied
    presence: dict[str, float]  # SAM 3: presence score per phrase
    detections: dict[str, list[dict[str, Any]]]  # clip: keyframe detections per sampled frame (segment consumes)
    tracking: dict[str, Any]  # clip: keyframes used, tracks, tracker, keyframe IoU
    instances: list[dict[str, Any]]  # one per evidence object (a clip: per track): category, box, polygons, path
    # --- segment ------------------------------------------------------------------------------
    mask: dict[str, Any]  # the evidence mask's figures: area_frac, core_area, dilate_px (clip: per frame max)
    # --- edit (through Sample.add_variant / reject_variant) ------------------------------------
    variants: list[str]  # the variants made and not rejected, in the configured order
    edits: dict[str, dict[str, Any]]  # per variant: the edit record (method, region, affects, ...)
    variant_rejects: list[dict[str, Any]]  # per dropped variant: stage, variant, reason, detail
    # --- qa -----------------------------------------------------------------------------------
    qa: list[dict[str, Any]]  # question, kind, targets, source and answers per variant ("orig" too)
    qa_generation: dict[str, Any]  # an LLM qa backend's record: backend, attempts, errors
    # --- verify -------------------------------------------------------------------------------
    metrics: dict[str, Any]  # sample-level figures and, per variant, its measured figures
    # --- every stage (Stage.apply, Sample.reject) ----------------------------------------------
    notes: list[str]  # what a stage dropped or changed without rejecting (shipped in KEY.json)
    reject: dict[str, str]  # why the whole sample was rejected: stage, reason, detail
    seconds: dict[str, float]  # per stage: its share of the batch's time
    provenance: dict[str, Any]  # per stage: backend, params (and models) that made this sample


def _variant_key(variant: str) -> str:
    return f"variant/{variant}"


def _region_key(variant: str) -> str:
    return f"mask/{variant}"


@dataclass
class Sample:
    idx: int
    key: str
    status: str
    meta: SampleMeta
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    # figures of this sample's arrays computed once and read by several stages (``memo``); never
    # serialized (``encode_batch``): a row decoded in another process computes them again
    _memo: dict[str, tuple[tuple[Any, ...], Any]] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def reject(self, stage: str, reason: str, detail: str = "") -> None:
        self.status = "rejected"
        self.meta["reject"] = {"stage": stage, "reason": reason, "detail": detail[:500]}
        self.arrays = {}

    # --- variants: the one owner of adding and dropping them --------------------------------
    # A variant is its image or clip (array ``variant/<v>``), optionally the region it changed
    # when that is not the evidence mask (``mask/<v>``: the control, an inserted object's place;
    # H x W for an image, T x H x W for a clip), its name in ``meta["variants"]`` and its edit
    # record in ``meta["edits"]``. Stages add and drop variants only through these methods, so
    # a dropped variant leaves no array behind that the writer could ship.

    def begin_variants(self) -> None:
        """An edit stage starts: no variant yet."""
        self.meta["variants"], self.meta["edits"] = [], {}

    def add_variant(self, variant: str, media: np.ndarray, edit: dict[str, Any],
                    region: np.ndarray | None = None) -> None:
        """Add one variant: its image or clip, its edit record and, when the edit changed a
        region of its own (not the evidence mask), that region."""
        self.arrays[_variant_key(variant)] = media
        if region is not None:
            self.arrays[_region_key(variant)] = region
        self.meta["variants"].append(variant)
        self.meta["edits"][variant] = edit

    def variant(self, variant: str) -> np.ndarray:
        """The image or clip of a variant."""
        return self.arrays[_variant_key(variant)]

    def region(self, variant: str, default: np.ndarray | None = None) -> np.ndarray | None:
        """The region a variant's edit changed, when it has one of its own; else ``default``."""
        return self.arrays.get(_region_key(variant), default)

    def reject_variant(self, stage: str, variant: str, reason: str, detail: str = "") -> None:
        """Drop one variant of an otherwise good sample, recording why (never silently): its
        arrays (image or clip, and its region) go with it."""
        self.meta.setdefault("variant_rejects", []).append(
            {"stage": stage, "variant": variant, "reason": reason, "detail": detail[:500]}
        )
        self.arrays.pop(_variant_key(variant), None)
        self.arrays.pop(_region_key(variant), None)
        self.meta["variants"] = [v for v in self.meta.get("variants", []) if v != variant]
        self.meta.get("edits", {}).pop(variant, None)
        for item in self.meta.get("qa", []):
            item["answers"].pop(variant, None)

    def memo(self, name: str, fn: Callable[[], Any], *arrays: str) -> Any:
        """``fn()``, computed once per sample while the arrays named ``arrays`` are the same
        objects (issue 27: a statistic of the original that edit and verify both read, e.g. the
        real object's texture). Stages never change an array in place, they replace it, so a
        replaced array (or one added or dropped) computes it again."""
        deps = tuple(self.arrays.get(k) for k in arrays)
        hit = self._memo.get(name)
        if hit is not None and len(hit[0]) == len(deps) and all(a is b for a, b in zip(hit[0], deps, strict=True)):
            return hit[1]
        value = fn()
        self._memo[name] = (deps, value)
        return value

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
