"""Typed pipeline configuration: one YAML file, validated completely before anything runs.

Every stage entry names a backend; the backend's own pydantic params model validates its
``params`` here too, so a typo in a stage parameter fails at load time, not an hour into a run.
Relative paths are resolved against the config file's folder; ``pkg:PACKAGE/path`` names a file
shipped inside an installed package (the bundled demo data and scikit-image's photographs).
The file itself is read defensively (regular file, size, UTF-8, duplicate keys, depth, alias
expansion) so that a wrong file is one ConfigError line, never a hang; that reader and the
schema it feeds are kept together, which makes this module longer than most.
"""

# Over ~450 lines on purpose: the whole config schema and its one-line errors in one place, so
# every rule a user's YAML meets is read here (the stage params live with their stages).

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from counterfactory.audit_config import AuditConfig
from counterfactory.sample import ABSTAIN_ANSWER, LimitsConfig, RunSettings
from counterfactory.spec import config_hash
from counterfactory.storage import resolve_path


class ConfigError(Exception):
    """A config problem, reported as one line: ``FILE: KEY: what is wrong``."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _pool(concurrency: int | tuple[int, int] | None) -> tuple[int, int]:
    if concurrency is None:
        return 1, 1
    return (concurrency, concurrency) if isinstance(concurrency, int) else tuple(concurrency)  # type: ignore[return-value]


class Resources(Strict):
    """Where and how wide a stage runs; turned into Ray Data ``map_batches`` arguments."""

    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    memory: int | None = Field(None, ge=0, description="bytes of heap memory to reserve per worker")
    # None: stateless stages run as Ray tasks (fused with neighbours); an int or [min, max]
    # runs an actor pool, which stages holding models always use.
    concurrency: int | tuple[int, int] | None = None
    batch_size: int = Field(8, ge=1)

    @property
    def pool(self) -> tuple[int, int]:
        """(min, max) actors: a fixed pool has both the same; no concurrency is one."""
        return _pool(self.concurrency)

    @field_validator("concurrency")
    @classmethod
    def _workers(cls, v: int | tuple[int, int] | None) -> int | tuple[int, int] | None:
        lo, hi = _pool(v)
        if lo < 1 or hi < lo:
            raise ValueError("must be a number of workers >= 1, or [min, max] with 1 <= min <= max")
        return v

    @field_validator("num_gpus")
    @classmethod
    def _gpus(cls, v: float) -> float:
        if v > 1 and v != int(v):  # Ray: a fraction of one GPU, or whole GPUs
            raise ValueError("above 1, GPUs are whole numbers (a fraction shares one GPU)")
        return v


class StageConfig(Strict):
    name: str
    backend: str = "default"
    params: dict[str, Any] = Field(default_factory=dict)  # as saved: defaults filled in, JSON
    resources: Resources = Field(default_factory=Resources)
    _typed: BaseModel | None = PrivateAttr(None)

    def typed_params(self) -> BaseModel:
        """The params as the backend's own validated ``Params`` object, which is what the stage
        receives on the worker (validated once, in the driver: ``_check_stages`` or here)."""
        if self._typed is None:
            from counterfactory.stages import get_backend

            self._typed = get_backend(self.name, self.backend).Params.model_validate(self.params)
        return self._typed

    def set_params(self, **changes: Any) -> None:
        """Change params of a loaded config (programmatic use, tests): validated again, so the
        saved dict and the object the stage receives never disagree."""
        typed = type(self.typed_params()).model_validate({**self.params, **changes})
        self.params, self._typed = typed.model_dump(mode="json"), typed


# Which categories an input's annotations name *every* instance of, in every image: only for
# those may an answer assert absence ("Is there a triangle? no", "How many ...? 0"). ``true``:
# all categories (procedural scenes); ``false``: none; ``"annotated"``: the categories each
# image annotates (the default for manifests: a line that annotates towers annotates all of
# them, and says nothing of triangles); a list: exactly those category names. A manifest line
# may carry its own ``exhaustive`` with the same values.
Exhaustive = bool | Literal["annotated"] | list[Annotated[str, Field(min_length=1)]]


class ManifestInput(Strict):
    """JSONL, one image per line with one question (``question``) or several (``questions``)."""

    kind: Literal["manifest"]
    path: str
    images_root: str | None = None  # default: the manifest's folder
    exhaustive: Exhaustive = Field("annotated", description="categories whose every instance is annotated "
                                   "(true, false, \"annotated\" or a list); a line's own 'exhaustive' wins")


class CocoInput(Strict):
    """COCO instance annotations; questions are generated per (image, category)."""

    kind: Literal["coco"]
    path: str
    images_root: str | None = None
    question_kinds: list[Literal["existence", "count", "color", "position"]] = ["existence", "count"]
    max_categories_per_image: int = Field(3, ge=1)
    # COCO annotates every instance of each of its categories (crowds aside): by default the
    # file's category list, and nothing outside it
    exhaustive: Exhaustive | None = Field(None, description="null: the categories listed in the file")


def _size(min_side: int, what: str) -> Any:
    """(width, height) with both sides at least ``min_side``: checked with the config, not when
    a worker first draws one."""
    def check(v: tuple[int, int]) -> tuple[int, int]:
        if min(v) < min_side:
            raise ValueError(f"{what} size {v[0]}x{v[1]} too small (min side {min_side})")
        return v

    return Annotated[tuple[int, int], AfterValidator(check)]


SceneSize = _size(32, "scene")
ClipSize = _size(64, "clip")


class ProceduralInput(Strict):
    """Seeded synthetic scenes with exact masks, rendered in memory (tests and benchmarks)."""

    kind: Literal["procedural"]
    count: int = Field(ge=0)
    seed: int = 0
    size: SceneSize = (256, 256)  # width, height
    questions_per_scene: int = Field(2, ge=1, le=4)  # every scene has at least 4 distinct questions


class VideoManifestInput(Strict):
    """JSONL, one video per line: ``{"video": "a.mp4", "questions": [...], "targets": [...],
    "span": [t0, t1], "objects": [{"category", "attributes", "keyframes": [{"t"|"frame", "polygon"|"box"}]}]}``;
    one sample per clip (all its questions). Read by the ``video`` stage backends."""

    kind: Literal["video_manifest"]
    path: str
    videos_root: str | None = None  # default: the manifest's folder


class ProceduralVideoInput(Strict):
    """Seeded short clips: a scikit-image photograph with shapes moving across it, exact masks."""

    kind: Literal["procedural_video"]
    count: int = Field(ge=0)
    seed: int = 0
    size: ClipSize = (256, 192)  # width, height
    frames: int = Field(24, ge=8, le=240)
    fps: int = Field(8, ge=1, le=60)


InputConfig = Annotated[
    ManifestInput | CocoInput | ProceduralInput | VideoManifestInput | ProceduralVideoInput,
    Field(discriminator="kind"),
]


class OutputConfig(Strict):
    root: str = Field("outputs", description="a local folder, or an object-store URI (s3://bucket/prefix, "
                                         "gs://, hdfs://, abfs://: anything pyarrow.fs or fsspec opens)")
    shard_size: int = Field(64, ge=1, description="inputs per shard: shard k holds the accepted samples of inputs [k*size, (k+1)*size)")
    image_format: Literal["jpg", "png"] = "jpg"
    jpeg_quality: int = Field(95, ge=50, le=100)
    pairs: bool = Field(True, description="also write pairs/: one sample per original x variant with the same "
                                          "members in each (what datasets.load_dataset and Ray read natively)")


class CardConfig(Strict):
    """What the data card declares beyond the figures (the Hugging Face front matter)."""

    license: str | None = Field(None, description="a license id as the Hub lists them (cc-by-4.0, apache-2.0, "
                                                   "other, ...); none: the card says that no license is declared")
    tags: list[str] = Field(default_factory=list, description="extra tags for the card's front matter")


class RayConfig(Strict):
    address: str | None = None  # None: $RAY_ADDRESS if set, else a local instance
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local instance")
    preserve_order: bool = False  # output never depends on it; the writer reorders by input index
    # Ray Data reserves a share of the cluster per operator; with the CPU default fused into one
    # operator that left one of two cores idle (bench: 36 -> 46 pairs/s on 2 cores). Turn it on
    # for long multi-operator GPU pipelines where a starved downstream operator is the risk.
    op_resource_reservation: bool = False


class FailureBudget(Strict):
    """When a run gives up. Excluded from the spec: raising the budget resumes the same run."""

    # a dataset over the audit's thresholds (``audit:``) is refused at publish (exit 3, nothing
    # published) instead of published with a warning in its card; ``run --strict`` sets it
    refuse_on_audit: bool = False

    # more rejected inputs than this share of all inputs stops the run (null: never)
    max_reject_share: float | None = Field(None, ge=0.0, le=1.0)
    # blocks Ray Data may give up on after retries; their inputs become rejects (errored_block)
    max_errored_blocks: int = Field(0, ge=0)
    # retries of a task, restarts of an actor, after a system failure (worker or node died)
    system_retries: int = Field(3, ge=0)


MAX_DATASET_NAME = 128
REQUIRED_STAGES = ("ingest", "localize", "segment", "edit", "qa", "verify")


class PipelineConfig(Strict):
    # a folder name and the stem of every shard name (DATASET-000000.tar): well under the 255
    # bytes a file name may have, so a long name is this line, not an errno mid-run
    dataset: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_\-]*$", max_length=MAX_DATASET_NAME)
    seed: int = 0
    inputs: list[InputConfig] = Field(min_length=1)
    output: OutputConfig = Field(default_factory=OutputConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    abstain_answer: str = ABSTAIN_ANSWER
    card: CardConfig = Field(default_factory=CardConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    failure_budget: FailureBudget = Field(default_factory=FailureBudget)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    stages: list[StageConfig]

    @field_validator("stages")
    @classmethod
    def _stage_order(cls, stages: list[StageConfig]) -> list[StageConfig]:
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        order = [n for n in names if n in REQUIRED_STAGES]
        if order != list(REQUIRED_STAGES):
            raise ValueError(f"stages must include, in this order, {list(REQUIRED_STAGES)}; got {names}")
        return stages

    @model_validator(mode="after")
    def _within_limits(self) -> PipelineConfig:
        """Procedural inputs are sized by the config alone: check them against ``limits`` here,
        before planning would spend memory on a trillion scenes."""
        lim = self.limits
        total = 0
        for i, inp in enumerate(self.inputs):
            if isinstance(inp, ProceduralInput | ProceduralVideoInput):
                w, h = inp.size
                if w * h > lim.max_pixels:
                    raise ValueError(f"inputs.{i}.size: {w}x{h} = {w * h} pixels > limits.max_pixels {lim.max_pixels}")
                total += inp.count * (inp.questions_per_scene if isinstance(inp, ProceduralInput) else 1)
                if total > lim.max_inputs:
                    raise ValueError(f"inputs.{i}.count: {inp.count} makes {total} input records > "
                                     f"limits.max_inputs {lim.max_inputs} (raise the limit if this is meant)")
        return self

    # Set by load_config: the folder relative paths are resolved against.
    base_dir: Path | None = Field(None, exclude=True)

    def path(self, p: str) -> Path:
        return resolve_path(p, self.base_dir)

    def stage(self, name: str) -> StageConfig:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)

    def resolved(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"base_dir"})

    def run_settings(self) -> RunSettings:
        """The run-level settings every stage reads, as one typed object."""
        from counterfactory.pipeline.cutout_bank import build_bank

        return RunSettings(seed=self.seed, abstain_answer=self.abstain_answer, limits=self.limits,
                           cutouts=build_bank(self))

    def config_hash(self) -> str:
        """Hash of everything that shapes the output (``spec.OUTPUT_NEUTRAL`` excluded)."""
        return config_hash(self.resolved())


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """``a.b.c=v`` into nested dicts; a list of stages is addressed by stage name or index."""
    parts = dotted.split(".")
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            match = [s for s in node if isinstance(s, dict) and s.get("name") == part]
            if match:
                idx = node.index(match[0])
            elif part.isdigit() and int(part) < len(node):
                idx = int(part)
            else:
                raise ConfigError(f"override {dotted}: no list item named {part!r}")
            if last:
                node[idx] = value
            else:
                node = node[idx]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {'.'.join(parts[:i])} is not a mapping")
        if last:
            node[part] = value
        else:
            node = node.setdefault(part, {})


def _loc(err: dict[str, Any], data: dict[str, Any]) -> str:
    """Pydantic's error location as a dotted key, list indices replaced by stage names."""
    out: list[str] = []
    node: Any = data
    for part in err["loc"]:
        if isinstance(part, int) and isinstance(node, list) and part < len(node):
            item = node[part]
            name = item.get("name") if isinstance(item, dict) else None
            out.append(str(name) if name else str(part))
            node = item
        else:
            if isinstance(node, dict):
                node = node.get(part)
            else:
                node = None
            # discriminated unions add the tag to the location; it is not a key of the file
            if part in ("manifest", "coco", "procedural", "video_manifest", "procedural_video") and out and out[-1].isdigit():
                continue
            out.append(str(part))
    return ".".join(out) or "(top level)"


def _check_stages(cfg: PipelineConfig, source: str) -> None:
    """Resolve each stage's backend and validate its params with the backend's own model
    (defaults filled in, so the saved config is the complete one that ran)."""
    from counterfactory.stages import get_backend

    for sc in cfg.stages:
        try:
            cls = get_backend(sc.name, sc.backend)
        except ValueError as exc:
            raise ConfigError(f"{source}: stages.{sc.name}.backend: {exc}") from None
        try:
            typed = cls.Params.model_validate(sc.params)
            sc.params, sc._typed = typed.model_dump(mode="json"), typed
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            raise ConfigError(f"{source}: stages.{sc.name}.params.{loc}: {err['msg']}") from None


def _check_files(cfg: PipelineConfig, source: str) -> None:
    for i, inp in enumerate(cfg.inputs):
        for key in ("path", "images_root", "videos_root"):
            value = getattr(inp, key, None)
            if value is None:
                continue
            try:
                p = cfg.path(value)
            except ValueError as exc:
                raise ConfigError(f"{source}: inputs.{i}.{key}: {exc}") from None
            if not p.exists():
                raise ConfigError(f"{source}: inputs.{i}.{key}: file not found: {p}")
            # a manifest that is a FIFO or a device would be read forever while planning
            if key == "path" and not p.is_file():
                raise ConfigError(f"{source}: inputs.{i}.{key}: not a regular file: {p}")
            if key != "path" and not p.is_dir():
                raise ConfigError(f"{source}: inputs.{i}.{key}: not a folder: {p}")


# pseudo filesystems: nothing a run writes belongs there (/proc refuses new folders with ENOENT,
# /sys with EPERM; /dev is devices); /dev/shm is an ordinary tmpfs
_PSEUDO_ROOTS = ("/proc", "/sys", "/dev")
_NAME_MAX = 255


def check_output_root(root: str, base: Path | None) -> str | None:
    """What makes a local ``output.root`` unusable, as a phrase (None: usable or remote). Checked
    with the config so that a file, a pseudo filesystem, a name too long or a read-only folder
    is one line before Ray starts, not an errno from ``mkdir`` after planning."""
    from counterfactory.storage import is_remote, local_path

    if is_remote(root):
        return None
    if "\x00" in root:
        return "a path cannot hold a NUL byte"
    try:
        p = local_path(root) if root.startswith("file://") else resolve_path(root, base)
        p = Path(os.path.abspath(p))
    except (ValueError, RuntimeError) as exc:
        return str(exc)
    if any(len(part.encode("utf-8", "surrogateescape")) > _NAME_MAX for part in p.parts):
        return f"a folder name over {_NAME_MAX} bytes"
    existing = p
    while not os.path.lexists(existing) and existing.parent != existing:
        existing = existing.parent
    real = os.path.realpath(existing)
    pseudo = [r for r in _PSEUDO_ROOTS if real == r or real.startswith(r + "/")]
    if pseudo and not (real == "/dev/shm" or real.startswith("/dev/shm/")):
        return f"{p} is under {pseudo[0]}, a pseudo filesystem: choose a real folder"
    if not os.path.isdir(real):
        return f"{existing} is {'a file' if os.path.exists(real) else 'a broken link'}, not a folder"
    # only a root that exists: a missing one may be a cluster's shared path (submit)
    if existing == p and not os.access(real, os.W_OK | os.X_OK):
        return f"{p} is not writable"
    return None


def _check_output(cfg: PipelineConfig, source: str) -> None:
    problem = check_output_root(cfg.output.root, cfg.base_dir)
    if problem:
        raise ConfigError(f"{source}: output.root: {problem}")


MAX_CONFIG_BYTES = 1 << 20  # a pipeline config is a page of YAML; more is a wrong file
MAX_CONFIG_DEPTH = 64
MAX_CONFIG_NODES = 200_000  # values counted as the YAML expands (aliases count every time)


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping (PyYAML keeps the last
    silently, so the first setting a user wrote would be ignored without a word)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                dup = key in seen
                seen.add(key)
            except TypeError:
                continue  # an unhashable key: the base class reports it
            if dup:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, f"duplicate key {key!r}", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def _check_shape(data: Any, source: str) -> None:
    """Depth and expanded size of the loaded YAML, walked without recursion: deeply nested or
    alias-bombed documents are refused before pydantic or json would recurse or loop over them."""
    stack: list[tuple[Any, int]] = [(data, 0)]
    nodes = 0
    while stack:
        node, depth = stack.pop()
        nodes += 1
        if depth > MAX_CONFIG_DEPTH:
            raise ConfigError(f"{source}: nested deeper than {MAX_CONFIG_DEPTH} levels; not a pipeline config")
        if nodes > MAX_CONFIG_NODES:
            raise ConfigError(f"{source}: more than {MAX_CONFIG_NODES} values (with aliases expanded); "
                              "not a pipeline config")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for kv in node.items() for v in kv)
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)


def read_config_text(path: Path, source: str) -> str:
    """The config's text: a regular file (a FIFO would block, /dev/zero never ends), at most
    ``MAX_CONFIG_BYTES``, UTF-8."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{source}: not a regular file (a folder, FIFO, socket or device); give a YAML file")
        if st.st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{source}: {st.st_size} bytes; a config is at most {MAX_CONFIG_BYTES} bytes")
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read config: {exc.strerror or exc}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{source}: over {MAX_CONFIG_BYTES} bytes; a config is at most that")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not UTF-8 text (byte {exc.start}): not a YAML config") from None


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return _yaml_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        why = " ".join(str(getattr(exc, "problem", None) or exc).split())  # a ReaderError spans lines
        raise ConfigError(f"{source}:{where}: invalid YAML: {why}") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply to be a pipeline config") from None


def load_config(
    path: str | Path, overrides: list[str] | None = None, *, check_files: bool = True
) -> PipelineConfig:
    """Read, override, validate. Every problem becomes one ConfigError line."""
    path = Path(path)
    source = str(path)
    data = _parse_yaml(read_config_text(path, source), source)
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the config must be a mapping at the top level")
    _check_shape(data, source)
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        try:
            value = _yaml_load(raw)
        except (yaml.YAMLError, RecursionError):
            value = raw
        _set_dotted(data, key.strip(), value)
    _check_shape(data, source)
    return validate_config(data, source=source, base_dir=path.resolve().parent, check_files=check_files)


def validate_config(
    data: dict[str, Any], *, source: str = "<config>", base_dir: Path | None = None, check_files: bool = True
) -> PipelineConfig:
    try:
        cfg = PipelineConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        msg = err["msg"].removeprefix("Value error, ")
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ConfigError(f"{source}: {_loc(err, data)}: {msg}{more}") from None
    _check_stages(cfg, source)
    cfg.base_dir = base_dir
    if check_files:
        _check_files(cfg, source)
        _check_output(cfg, source)
    return cfg
