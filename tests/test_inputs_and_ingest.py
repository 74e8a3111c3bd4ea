"""Bad and odd inputs: every one is either normalized and kept, or rejected with its reason."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from counterfactory.pipeline.inputs import pipeline_rows
from counterfactory.pipeline.runner import local_batches
from counterfactory.sample import decode_batch
from tests.conftest import load_records, make_config


def _run(cfg, upto: str):
    records = load_records(cfg)
    out = []
    for b in local_batches(cfg, records, stop_after=upto):
        out.extend(decode_batch(b))
    return records, out


def _name(rec) -> str:
    return "<bad line>" if "error" in rec and rec["error"].startswith("bad_manifest_line") else Path(rec["uri"]).name


def test_odd_inputs_are_normalized_or_rejected_with_reason(tmp_path: Path, odd_inputs):
    manifest, expect = odd_inputs
    cfg = make_config(tmp_path, [{"kind": "manifest", "path": str(manifest)}], limits={"max_pixels": 200_000})
    records, samples = _run(cfg, "localize")
    assert len(samples) == len(records) == len(expect)
    for rec, s in zip(records, samples, strict=True):
        want = expect[_name(rec)]
        if want == "ok":
            assert s.ok, (_name(rec), s.meta.get("reject"))
            img = s.arrays["image"]
            assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
        else:
            assert not s.ok, _name(rec)
            assert s.meta["reject"]["reason"] == want, (_name(rec), s.meta["reject"])
            assert s.meta["reject"]["stage"] in ("ingest", "localize")


def test_conversions_keep_content(tmp_path: Path, odd_inputs):
    manifest, _ = odd_inputs
    cfg = make_config(tmp_path, [{"kind": "manifest", "path": str(manifest)}], limits={"max_pixels": 200_000})
    records, samples = _run(cfg, "ingest")
    by = {_name(r): s for r, s in zip(records, samples, strict=True)}
    good = by["good.png"].arrays["image"].astype(int)
    gray = good.mean(axis=2)
    # 16-bit grayscale is scaled, not clipped to white
    g16 = by["gray16.png"].arrays["image"][..., 0].astype(int)
    assert abs(g16.mean() - by["gray.png"].arrays["image"][..., 0].mean()) < 1.0
    assert g16.max() < 255 or gray.max() > 250
    # RGBA with alpha 200 composited on white: brighter than the original, same geometry
    rgba = by["rgba.png"].arrays["image"].astype(int)
    assert rgba.shape == good.shape and rgba.mean() > good.mean()
    assert by["rgba.png"].meta["source"]["notes"] == ["alpha composited on white"]
    # CMYK comes back close to the RGB it was made from
    assert np.abs(by["cmyk.jpg"].arrays["image"].astype(int) - good).mean() < 12
    # EXIF orientation 6 is applied: the image is upright (120 wide, 160 high) and the red
    # square sits where the upright annotation says
    ex = by["exif.jpg"].arrays["image"]
    assert ex.shape[:2] == (160, 120)
    assert ex[55:95, 35:75, 0].mean() > 180 and ex[55:95, 35:75, 1].mean() < 80
    assert by["exif.jpg"].meta["source"]["exif_orientation"] == 6


def test_keys_are_stable_and_dot_free(tmp_path: Path, odd_inputs):
    manifest, _ = odd_inputs
    cfg = make_config(tmp_path, [{"kind": "manifest", "path": str(manifest)}], limits={"max_pixels": 200_000})
    _, a = _run(cfg, "ingest")
    _, b = _run(cfg, "ingest")
    keys = [s.key for s in a if s.ok]
    assert keys == [s.key for s in b if s.ok]
    assert all(k and "." not in k and len(k) == 24 for k in keys)


def test_oversize_downscale_scales_annotations(tmp_path: Path):
    from tests.conftest import save, square_line, square_scene

    img = square_scene(400, 300, box=(100, 100, 200, 200))
    save(img, tmp_path / "big.png")
    (tmp_path / "m.jsonl").write_text(json.dumps(square_line("big.png", box=(100, 100, 200, 200))) + "\n")
    cfg = make_config(tmp_path, [{"kind": "manifest", "path": str(tmp_path / "m.jsonl")}],
                      limits={"max_pixels": 30_000, "oversize": "downscale"})
    _, samples = _run(cfg, "segment")
    s = samples[0]
    assert s.ok, s.meta.get("reject")
    h, w = s.arrays["image"].shape[:2]
    assert h * w <= 30_000 and abs(w / h - 4 / 3) < 0.02
    core = s.arrays["mask_core"] > 0
    img_small = s.arrays["image"]
    assert img_small[core][:, 0].mean() > 180  # the scaled polygon still covers the red square


def test_coco_inputs_generate_questions(tmp_path: Path):
    from tests.conftest import save, square_scene

    save(square_scene(), tmp_path / "a.png")
    save(square_scene(seed=1), tmp_path / "b.png")
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "width": 160, "height": 120},
                   {"id": 2, "file_name": "b.png", "width": 160, "height": 120}],
        "categories": [{"id": 7, "name": "box"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [50, 30, 50, 50],
                         "segmentation": [[50, 30, 99, 30, 99, 79, 50, 79]], "area": 2500, "iscrowd": 0}],
    }
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    cfg = make_config(tmp_path, [{"kind": "coco", "path": str(tmp_path / "instances.json"),
                                  "question_kinds": ["existence", "count", "position"]}])
    records = load_records(cfg)
    qs = [r["question"]["question"] for r in records if "question" in r]
    assert qs == ["Is there a box in the image?", "How many boxes are there?", "Is the box on the left or the right?"]
    assert [r.get("error", "")[:11] for r in records][-1] == "no_question"  # b.png has no annotations
    _, samples = _run(cfg, "qa")
    assert [s.ok for s in samples] == [True, True, False, False]
    assert samples[2].meta["reject"]["reason"] == "no_answer"  # centred box: left/right is undecidable
    assert samples[1].meta["qa"][0]["answers"]["remove"] == "0"


def test_more_formats_with_box_annotations_through_grabcut(tmp_path: Path):
    """Box-only annotations (GrabCut refinement, seeded from the 32-bit sample seed) on WebP,
    BMP, TIFF, 16-bit RGB PNG, progressive JPEG, EXIF orientation 8, animated GIF."""
    import cv2
    from PIL import Image

    from tests.conftest import square_scene

    rgb = square_scene()
    (tmp_path / "rgb16.png").write_bytes(cv2.imencode(".png", (rgb.astype(np.uint16) * 257)[..., ::-1])[1].tobytes())
    Image.fromarray(rgb).save(tmp_path / "a.webp", quality=95)
    Image.fromarray(rgb).save(tmp_path / "a.bmp")
    Image.fromarray(rgb).save(tmp_path / "a.tiff")
    Image.fromarray(rgb).save(tmp_path / "prog.jpg", progressive=True, quality=95)
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90 CCW... stored rotated the other way
    Image.fromarray(np.ascontiguousarray(np.rot90(rgb, -1))).save(tmp_path / "exif8.jpg", exif=exif, quality=95)
    Image.fromarray(rgb).save(tmp_path / "anim.gif", save_all=True, append_images=[Image.fromarray(255 - rgb)])
    names = ["rgb16.png", "a.webp", "a.bmp", "a.tiff", "prog.jpg", "exif8.jpg", "anim.gif"]
    with open(tmp_path / "m.jsonl", "w") as f:
        for n in names:
            f.write(json.dumps({"image": n, "question": "Is there a box in the image?", "answer": "yes",
                                "objects": [{"category": "box", "box": [50, 30, 100, 80]}]}) + "\n")
    cfg = make_config(tmp_path, [{"kind": "manifest", "path": str(tmp_path / "m.jsonl")}])
    _, samples = _run(cfg, "verify")
    for name, s in zip(names, samples, strict=True):
        assert s.ok, (name, s.meta.get("reject"))
        img = s.arrays["image"]
        assert img.shape == (120, 160, 3), name
        assert img[40:70, 60:90, 0].mean() > 190, name  # the red box is where the box says
        core = s.arrays["mask_core"] > 0
        assert s.meta["instances"][0]["mask_method"] in ("grabcut", "box")
        assert core[35:75, 55:95].mean() > 0.9 and core[:, :40].sum() == 0, name


def test_manifest_slices_are_read_where_processed_and_bad_bytes_are_rejects(tmp_path: Path):
    """The driver plans byte-offset slices; a worker re-reads them. A BOM is ignored, a line that
    is not UTF-8 is a bad line (a reject with its reason), and line numbers survive slicing."""
    from counterfactory.pipeline.inputs import plan_inputs, read_slice
    from tests.conftest import save, square_scene

    save(square_scene(), tmp_path / "a.png")
    good = b'{"image": "a.png", "questions": ["Is there a red square?", "How many squares are there?"]}\n'
    (tmp_path / "m.jsonl").write_bytes(b"\xef\xbb\xbf" + good + b"\n" + b'{"image": "a.png", "question": "caf\xe9?"}\n'
                                       + good * 6)
    cfg = make_config(tmp_path, [{"kind": "manifest", "path": str(tmp_path / "m.jsonl")}])
    plan = plan_inputs(cfg, per_slice=4)
    assert plan.n == 15 and [sl["n"] for sl in plan.slices] == [3, 4, 4, 4]  # whole lines per slice
    assert all("objects" not in json.dumps(sl) for sl in plan.slices)  # offsets, not records
    records = [r for sl in plan.slices for r in read_slice(sl)]
    assert records == load_records(cfg)
    assert [r["origin"] for r in records[:5]] == ["m.jsonl:1#q0", "m.jsonl:1#q1", "m.jsonl:3", "m.jsonl:4#q0",
                                                  "m.jsonl:4#q1"]
    assert records[2]["error"].startswith("bad_manifest_line: not UTF-8")
    _, samples = _run(cfg, "ingest")
    assert [s.ok for s in samples].count(False) == 1
    assert samples[2].meta["reject"]["reason"] == "bad_manifest_line"
    # the limit cuts inside a line: exactly that many records
    assert plan_inputs(cfg, limit=6).n == 6 and len(load_records(cfg, 6)) == 6


def test_a_manifest_changed_after_planning_gives_rejects_not_other_records(tmp_path: Path, monkeypatch):
    """A slice is checked by the digest of its bytes (not size and mtime, which differ between
    nodes for the same file); lone CR line ends split lines as text mode does; ``~/`` is the
    planning driver's home on every worker."""
    from counterfactory.pipeline.inputs import plan_inputs, read_slice

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    line = '{"image": "~/a.png", "question": "Is there a cat?"}'
    (tmp_path / "m.jsonl").write_text(f"{line}\r{line}\r\n{line}", newline="")
    cfg = make_config(tmp_path, [{"kind": "manifest", "path": str(tmp_path / "m.jsonl")}])
    plan = plan_inputs(cfg)
    assert plan.n == 3 and set(plan.sources) == {str(tmp_path / "m.jsonl"), str(tmp_path / "home" / "a.png")}
    monkeypatch.setenv("HOME", "/elsewhere")
    assert [r["uri"] for r in read_slice(plan.slices[0])] == [str(tmp_path / "home" / "a.png")] * 3
    stat = (tmp_path / "m.jsonl").stat()
    os.utime(tmp_path / "m.jsonl", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched, same bytes
    assert "error" not in read_slice(plan.slices[0])[0]
    (tmp_path / "m.jsonl").write_text(line.replace("cat", "dog") + "\n" + line + "\n" + line)  # same size
    recs = read_slice(plan.slices[0])
    assert len(recs) == 3 and all(r["error"].startswith("source_changed") for r in recs)
    (tmp_path / "m.jsonl").unlink()
    assert all(r["error"].startswith("read_error") for r in read_slice(plan.slices[0]))


def test_a_read_task_block_is_cut_into_batches_of_the_first_stage(tmp_path: Path):
    """Ray joins a read task's slices into one block; the fused first step still runs its
    stages on at most batch_size rows at a time, with the same output."""
    from counterfactory.pipeline import datasink, runner
    from counterfactory.pipeline.inputs import plan_inputs

    cfg = make_config(tmp_path, [{"kind": "procedural", "count": 10, "seed": 2, "questions_per_scene": 2}])
    rows = pipeline_rows(load_records(cfg), 0, 0, cfg.seed, cfg.config_hash())
    batch = {k: np.array([r[k] for r in rows], dtype=np.int64 if k == "idx" else object) for k in rows[0]}
    specs = [spec for step in runner.plan_steps(cfg, "ingest") for spec in step.specs]
    run = cfg.run_settings()
    seen: list[int] = []
    chain = runner.StageChain(specs, run)
    original = chain.stages[0].apply
    chain.stages[0].apply = lambda samples: (seen.append(len(samples)), original(samples))
    datasink._CHAINS[datasink.chain_key(specs, run, None)] = chain
    try:
        cut = runner._chain_task(batch, specs=specs, run=run, encode=None, max_rows=8)
        assert seen == [8, 8, 4]
        whole = runner._chain_task(batch, specs=specs, run=run, encode=None)
    finally:
        datasink._CHAINS.clear()
    def untimed(out):  # per-stage seconds differ run to run; everything else must not
        return [{k: v for k, v in json.loads(m).items() if k != "seconds"} for m in out["meta"]]

    assert list(cut["idx"]) == list(range(20)) and untimed(cut) == untimed(whole)
    assert list(cut["blob"]) == list(whole["blob"])
    assert plan_inputs(cfg).n == 20


def test_the_driver_plan_holds_no_scene(tmp_path: Path):
    """Procedural scenes are counted in the driver and built on the workers: a plan of 10,000
    scenes is a list of small slices of whole scenes (the sources list holds one URI per scene)."""
    import pickle

    from counterfactory.pipeline.inputs import plan_inputs, read_slice

    cfg = make_config(tmp_path, [{"kind": "procedural", "count": 10_000, "seed": 4, "questions_per_scene": 3}])
    plan = plan_inputs(cfg, per_slice=8)
    assert plan.n == 30_000 and len(plan.slices) == 5_000  # two scenes of 3 questions each
    assert len(pickle.dumps(plan.slices)) < 200 * len(plan.slices)
    sl = plan.slices[1234]
    recs = read_slice(sl)
    assert len(recs) == 6 == sl["n"] and recs[0]["origin"] == f"procedural:4/{sl['first']}#q0"
    assert recs == load_records(cfg, limit=sl["idx0"] + 6)[-6:]


def test_read_tasks_group_slices_only_while_every_cpu_keeps_several(tmp_path: Path):
    """Up to 4 slices per Ray read task on few CPUs (Ray's per-task cost), one per task when
    there are many CPUs or few slices; a resumed run leaves out what is done, row counts exact."""
    from counterfactory.pipeline.inputs import plan_inputs
    from counterfactory.pipeline.source import InputSlices

    cfg = make_config(tmp_path, [{"kind": "procedural", "count": 1000, "questions_per_scene": 1}])
    plan = plan_inputs(cfg, per_slice=8)
    assert len(plan.slices) == 125

    def tasks(cpus, start=0, p=plan):
        source = InputSlices(p, start, 0, "x", cpus)
        n = source.num_tasks
        got = source.get_read_tasks(n)
        assert len(got) == n
        return [t.metadata.num_rows for t in got]

    assert tasks(2) == [32] * 31 + [8]
    assert tasks(64) == [8] * 125
    assert tasks(2, start=996) == [4]
    assert sum(tasks(2, start=100)) == 900 and len(tasks(2, start=100)) == 29
    assert tasks(2, p=plan_inputs(cfg, limit=100, per_slice=8)) == [8] * 12 + [4]


def test_sources_that_cannot_be_read_are_rejects_and_never_block(tmp_path: Path):
    """A device or FIFO named as an image is never read (it would never end), not even by the
    driver's source hashing; a name too long is a read error; file:// URIs are local paths; a
    URI nothing here opens keeps its text in the reject."""
    import threading

    from counterfactory.spec import SourceHasher
    from tests.conftest import save, square_line, square_scene

    save(square_scene(), tmp_path / "good.png")
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    lines = {
        "/dev/zero": "not_a_file",
        str(fifo): "not_a_file",
        str(tmp_path / ("x" * 300)) + ".png": "read_error",
        "nosuchscheme://bucket/a.jpg": "unsupported_uri",
        "file://otherhost/a.jpg": "unsupported_uri",
        (tmp_path / "good.png").as_uri(): "ok",
    }
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(square_line(k)) + "\n" for k in lines))
    cfg = make_config(tmp_path, [{"kind": "manifest", "path": str(tmp_path / "m.jsonl")}])
    hashed: dict[str, str] = {}
    t = threading.Thread(target=lambda: hashed.update(SourceHasher(None).hash_all(["/dev/zero", str(fifo)])),
                         daemon=True)
    t.start()
    t.join(timeout=20)
    assert not t.is_alive(), "hashing a device or a FIFO must not read it"
    assert all(v.startswith("not_a_file:") for v in hashed.values())
    records, samples = _run(cfg, "ingest")
    assert len(samples) == len(lines)
    for (src, want), rec, s in zip(lines.items(), records, samples, strict=True):
        if want == "ok":
            assert s.ok, s.meta.get("reject")
            assert rec["uri"] == str(tmp_path / "good.png")
        else:
            assert not s.ok and s.meta["reject"]["reason"] == want, (src, s.meta.get("reject"))
            assert "\n" not in s.meta["reject"]["detail"]
            if want == "unsupported_uri":
                assert rec["uri"] == src  # the source as written, not a path made of it


def test_images_named_by_http_uris_are_read_by_the_workers(tmp_path: Path):
    """A web server on loopback: an image by URL is read (its key from the bytes, as for a
    file), a 404 is file_not_found; the spec names the object by its size and date."""
    import functools
    import http.server
    import threading

    from counterfactory.spec import SourceHasher
    from tests.conftest import save, square_line, square_scene

    www = tmp_path / "www"
    www.mkdir()
    save(square_scene(), www / "a.png")
    save(square_scene(), tmp_path / "a.png")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        lines = [square_line(f"{base}/a.png"), square_line(f"{base}/missing.png"), square_line("a.png")]
        (tmp_path / "m.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        cfg = make_config(tmp_path, [{"kind": "manifest", "path": str(tmp_path / "m.jsonl")}])
        records, (web, missing, local) = _run(cfg, "ingest")
        assert records[0]["uri"] == f"{base}/a.png"
        assert web.ok and local.ok, (web.meta.get("reject"), local.meta.get("reject"))
        assert web.key == local.key and np.array_equal(web.arrays["image"], local.arrays["image"])
        assert not missing.ok and missing.meta["reject"]["reason"] == "file_not_found"
        stamps = SourceHasher(None).hash_all([f"{base}/a.png", f"{base}/missing.png"])
        assert stamps[f"{base}/a.png"].startswith("object:")
        assert stamps[f"{base}/missing.png"].startswith("missing:")
        small = make_config(tmp_path, [{"kind": "manifest", "path": str(tmp_path / "m.jsonl")}],
                            limits={"max_image_bytes": 100})
        big = _run(small, "ingest")[1][0]
        assert not big.ok and big.meta["reject"]["reason"] == "too_large"
    finally:
        server.shutdown()


def test_downscale_never_decodes_past_max_decode_pixels(tmp_path: Path):
    """PNG has no reduced decode: a canvas over max_decode_pixels is refused before load (a
    small file can declare a huge one); a JPEG decodes at 1/8 and still passes."""
    from tests.conftest import save, square_line, square_scene

    img = np.tile(square_scene(200, 200, box=(50, 50, 150, 150)), (8, 8, 1))  # 1600x1600
    save(img, tmp_path / "big.png")
    save(img, tmp_path / "big.jpg", quality=90)
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(square_line(n, box=(50, 50, 150, 150))) + "\n"
                                              for n in ("big.png", "big.jpg")))
    cfg = make_config(tmp_path, [{"kind": "manifest", "path": str(tmp_path / "m.jsonl")}],
                      limits={"max_pixels": 40_000, "oversize": "downscale", "max_decode_pixels": 1_000_000})
    _, (png, jpg) = _run(cfg, "ingest")
    assert not png.ok and png.meta["reject"]["reason"] == "too_large"
    assert "max_decode_pixels" in png.meta["reject"]["detail"]
    assert jpg.ok, jpg.meta.get("reject")
    assert jpg.arrays["image"].shape[0] * jpg.arrays["image"].shape[1] <= 40_000


def test_wide_integer_and_float_images_use_their_own_range(tmp_path: Path, recwarn):
    """32-bit integers beyond 16 bits and floats with NaN are min-max scaled, not clipped to
    white, and print no numpy warning."""
    from PIL import Image

    from counterfactory.stages.ingest import _to_rgb
    from tests.conftest import square_scene

    gray = Image.fromarray(square_scene()).convert("L")
    base = np.asarray(gray).astype(np.int64)
    wide, notes = _to_rgb(Image.fromarray((base * 1000).astype(np.int32), mode="I"))
    assert "min-max" in notes[0]
    ref = (base - base.min()) * 255 / (base.max() - base.min())
    assert np.abs(wide[..., 0] - ref).max() <= 1
    f = np.asarray(gray).astype(np.float32)
    f[0, :10] = np.nan
    fl, notes = _to_rgb(Image.fromarray(f, mode="F"))
    assert fl[0, 0, 0] == 0 and "NaN" in notes[0]
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_a_run_where_every_input_is_rejected_publishes_nothing(tmp_path: Path):
    """An empty version would become `latest` and be reused by the rerun meant to fix it: the
    run fails with the commonest reasons and leaves no version and no staging behind."""
    import pytest

    from counterfactory.pipeline.runner import run_pipeline
    from counterfactory.publish import FailureBudgetExceeded

    (tmp_path / "m.jsonl").write_text('{"image": "gone.png", "question": "Is there a cat?"}\n{broken\n')
    cfg = make_config(tmp_path, [{"kind": "manifest", "path": str(tmp_path / "m.jsonl")}])
    with pytest.raises(FailureBudgetExceeded, match=r"all 2 input\(s\) were rejected .*file_not_found"):
        run_pipeline(cfg, local=True, progress=False)
    ds = tmp_path / "out" / cfg.dataset
    assert not list(ds.glob("v*")) and not (ds / "latest").exists()
    assert not [p for p in ds.rglob("*") if p.name.startswith(".staging")]


def test_procedural_scenes_and_clips_are_their_own_content_in_the_spec():
    """Neither kind of procedural URI is taken for an object-store address."""
    from counterfactory.spec import SourceHasher

    refs = ["procedural://1/2?size=64x64", "procedural-video://0/1?size=64x64&frames=8&fps=8"]
    assert all(v.startswith("uri:") for v in SourceHasher(None).hash_all(refs).values())
