"""Property tests (hypothesis) over what a user or an attacker hands us: manifest lines, COCO
documents, configs and a version's shard metadata. Whatever the input: no traceback (only the
documented error types), no hang (each example is bounded), and every input accounted for
(each planned record comes back from the stages, accepted or rejected with a specific reason,
never ``stage_error``). Bounded to a few seconds each: ``max_examples`` is small and fixed, the
draws are derandomized so CI sees the same cases every run."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from counterfactory import versions as V
from counterfactory.loader import LoaderError, resolve_shards
from counterfactory.pipeline.config import ConfigError, load_config
from counterfactory.pipeline.inputs import plan_inputs
from counterfactory.pipeline.runner import local_batches, run_pipeline
from counterfactory.sample import decode_batch
from counterfactory.verify import verify
from tests.conftest import demo_dict, make_config, save, scenes_input, square_scene

# CF_FUZZ_EXAMPLES=2000 runs a longer, randomized search by hand (RELIABILITY.md)
_LONG = int(os.environ.get("CF_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=_LONG or 40, deadline=None, derandomize=not _LONG, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])

scalars = st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True) | st.text(max_size=12)
json_values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
                           max_leaves=12)
numbers = st.integers(-50, 400) | st.floats(-50, 400, allow_nan=False) | st.just(float("inf"))
boxes = st.lists(numbers, min_size=0, max_size=6) | json_values
polygons = st.lists(st.lists(numbers, min_size=1, max_size=3), max_size=5) | json_values
objects = st.fixed_dictionaries({}, optional={
    "category": st.sampled_from(["box", "cup", ""]) | json_values, "box": boxes, "polygon": polygons,
    "polygons": st.lists(polygons, max_size=2) | json_values,
    "attributes": st.fixed_dictionaries({"color": st.sampled_from(["red", "blue"])}) | json_values})
questions = st.sampled_from(["Is there a box in the image?", "How many boxes are there?", "What color is the box?",
                             "Is the box on the left or the right?", "", "<script>?"]) | json_values
lines = st.fixed_dictionaries({}, optional={
    "image": st.sampled_from(["sq.png", "missing.png", "text.png", "/dev/zero", ".", "s3://", "https://127.0.0.1:9/x.jpg",
                              "sq\ud800.png"]) | json_values,
    "question": questions, "answer": json_values, "kind": st.sampled_from(["existence", "count", "color"]) | json_values,
    "targets": st.sampled_from([["box"], "box", ["cup"], []]) | json_values,
    "questions": st.lists(st.fixed_dictionaries({"question": questions}, optional={"kind": json_values}), max_size=2)
    | json_values,
    "objects": st.lists(objects, max_size=4) | json_values})
raw_lines = st.one_of(lines.map(lambda d: json.dumps(d)), st.text(max_size=40).map(lambda t: t.replace("\n", " ")),
                      json_values.map(json.dumps))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("fuzz")
    save(square_scene(), d / "sq.png")
    (d / "text.png").write_text("not an image")
    return d


def _accounted(cfg) -> None:
    plan = plan_inputs(cfg)
    out = [s for b in local_batches(cfg, plan, stop_after="segment") for s in decode_batch(b)]
    assert len(out) == plan.n, "every planned record comes back"
    errors = [s.meta["reject"] for s in out if not s.ok and s.meta["reject"]["reason"] == "stage_error"]
    assert not errors, errors


@FUZZ
@given(st.lists(raw_lines, min_size=1, max_size=4))
def test_fuzz_manifest_lines(images, lines):
    (images / "m.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
    cfg = make_config(images, [{"kind": "manifest", "path": str(images / "m.jsonl")}])
    try:
        _accounted(cfg)
    except ConfigError as exc:  # only: no records at all is not a failure of the reader
        assert "max_inputs" in str(exc)


coco_images = st.lists(st.fixed_dictionaries({"id": st.integers(0, 3) | json_values},
                                             optional={"file_name": st.sampled_from(["sq.png", "missing.png"]) | json_values})
                       | json_values, max_size=3)
coco_anns = st.lists(st.fixed_dictionaries({"image_id": st.integers(0, 3), "category_id": st.integers(0, 3) | json_values},
                                           optional={"bbox": st.lists(numbers, max_size=5) | json_values,
                                                     "segmentation": st.lists(st.lists(numbers, max_size=8), max_size=2)
                                                     | json_values})
                     | json_values, max_size=4)
coco_cats = st.lists(st.fixed_dictionaries({"id": st.integers(0, 3)}, optional={"name": st.sampled_from(["box", ""])
                                                                               | json_values}) | json_values, max_size=3)
coco_docs = st.fixed_dictionaries({}, optional={"images": coco_images | json_values, "annotations": coco_anns | json_values,
                                                "categories": coco_cats | json_values}) | json_values


@FUZZ
@given(coco_docs)
def test_fuzz_coco_documents(images, doc):
    (images / "a.json").write_text(json.dumps(doc))
    cfg = make_config(images, [{"kind": "coco", "path": str(images / "a.json")}])
    try:
        _accounted(cfg)
    except ConfigError:
        pass  # a file that is not COCO at all: one line, exit 2


config_keys = st.sampled_from(["dataset", "seed", "inputs", "output", "output.shard_size", "limits.max_pixels",
                               "limits.max_inputs", "stages", "stages.0.params", "stages.edit.params.variants",
                               "inputs.0.count", "inputs.0.size", "ray.num_cpus", "abstain_answer", "extra"])


@FUZZ
@given(st.lists(st.tuples(config_keys, json_values), max_size=3), st.binary(max_size=64))
def test_fuzz_configs(tmp_path_factory, edits, junk):
    tmp = tmp_path_factory.mktemp("cfg")
    data = demo_dict()
    data["inputs"] = [scenes_input(2)]
    overrides = [f"{k}={json.dumps(v)}" for k, v in edits]
    (tmp / "c.yaml").write_text(yaml.safe_dump(data))
    (tmp / "junk.yaml").write_bytes(junk)
    for path in (tmp / "c.yaml", tmp / "junk.yaml"):
        try:
            load_config(path, overrides)
        except ConfigError as exc:
            assert "\n" not in str(exc).strip()


@pytest.fixture(scope="module")
def version(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzzv")
    res = run_pipeline(make_config(tmp, [scenes_input(3)], output={"shard_size": 2}), local=True, progress=False)
    return res.out_dir


shard_fields = st.sampled_from(["name", "bytes", "samples", "sha256", "url", "nsamples", "filesize"])


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(["manifest", "shards"]), st.integers(0, 3), shard_fields,
                          json_values | st.just("../../etc/passwd") | st.just("/dev/zero")), min_size=1, max_size=3),
       st.booleans())
def test_fuzz_shard_metadata(version, tmp_path_factory, edits, drop_list):
    """verify and the loader on a version whose manifest.json / shards.json were edited: verify
    returns failed checks (never raises), the loader raises LoaderError or reads only inside."""
    vdir = Path(shutil.copytree(version, tmp_path_factory.mktemp("m") / "v1"))
    docs = {"manifest": json.loads((vdir / "manifest.json").read_text()),
            "shards": json.loads((vdir / "shards.json").read_text())}
    for which, i, field, value in edits:
        lst = docs[which]["shards" if which == "manifest" else "shardlist"]
        if lst and isinstance(lst, list):
            entry = lst[i % len(lst)]
            if isinstance(entry, dict):
                entry[field] = value
    if drop_list:
        docs["manifest"]["files"] = list(docs["manifest"].get("files", {}))
    (vdir / "manifest.json").write_text(json.dumps(docs["manifest"]))
    (vdir / "shards.json").write_text(json.dumps(docs["shards"]))
    checks = verify(V.read_version(vdir))
    assert checks and all(isinstance(c.ok, bool) for c in checks)
    try:
        shards, _ = resolve_shards(str(vdir))
    except LoaderError:
        return
    for s in shards:
        assert Path(s.url).resolve().parent == vdir.resolve()
