"""Video counterfactuals on generated clips with exact per-frame masks: decoding caps, tracking
against ground truth, temporally consistent removal, temporal edits and their answers, bad
inputs, byte-identical reruns, and a whole run read back with webdataset and PyAV."""

from __future__ import annotations

import copy
import io
import json
import zipfile
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
import yaml

from counterfactory import video_scenes
from counterfactory.pipeline.config import PipelineConfig, validate_config
from counterfactory.pipeline.inputs import pipeline_rows
from counterfactory.pipeline.runner import run_pipeline
from counterfactory.pipeline.writer import PartEncoder
from counterfactory.sample import Sample
from counterfactory.scenes import COLORS
from counterfactory.stages import get_backend
from counterfactory.stages.video.edit import temporal_fill
from counterfactory.video_io import (
    Caps,
    VideoError,
    decode_clip,
    encode_mp4,
    encode_npz,
    read_frames,
)
from tests.conftest import load_records

REPO = Path(__file__).resolve().parents[1]
DEMO_VIDEO = REPO / "configs" / "demo_video.yaml"
SIZE = (192, 144)


def video_config(tmp_path: Path, inputs: list[dict[str, Any]], **stage_params: dict[str, Any]) -> PipelineConfig:
    data = copy.deepcopy(yaml.safe_load(DEMO_VIDEO.read_text()))
    data["inputs"] = inputs
    data["output"]["root"] = str(tmp_path / "out")
    for st in data["stages"]:
        st.setdefault("params", {}).update(stage_params.get(st["name"], {}))
    return validate_config(data, source="test", base_dir=tmp_path)


def clips_input(count: int = 3, seed: int = 0, frames: int = 24) -> dict[str, Any]:
    return {"kind": "procedural_video", "count": count, "seed": seed, "size": list(SIZE), "frames": frames, "fps": 8}


def run_stages(cfg: PipelineConfig, records: list[dict[str, Any]], stop_after: str = "verify") -> list[Sample]:
    """The stages in a plain loop on Sample objects (what Stage.__call__ does, minus the rows)."""
    run = cfg.run_settings()
    samples = [Sample(r["idx"], "", "ok", json.loads(r["meta"])) for r in pipeline_rows(records, 0, 0, cfg.seed, cfg.config_hash())]
    for sc in cfg.stages:
        stage = get_backend(sc.name, sc.backend)(params=sc.params, run=run)
        stage.process_batch([s for s in samples if s.ok])
        if sc.name == stop_after:
            break
    return samples


def noise_clip(n: int, w: int = 96, h: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([128 + 90 * np.sin(x / 7.0), 128 + 80 * np.cos(y / 5.0), 128 + 60 * np.sin((x + y) / 9.0)], -1)
    base = np.clip(base + rng.normal(0, 4, base.shape), 0, 255).astype(np.uint8)
    return np.stack([np.roll(base, 3 * t, axis=1) for t in range(n)])


# --- decoding -------------------------------------------------------------------------------


def test_decode_samples_by_fps_and_caps_frames(tmp_path):
    path = tmp_path / "a.mp4"
    path.write_bytes(encode_mp4(noise_clip(40, 100, 70), 20))  # 2 s at 20 fps
    clip = decode_clip(path, Caps(fps=10, max_frames=100, max_side=50))
    assert clip.frames.shape == (20, 36, 50, 3)  # 10 fps over 2 s; 100x70 -> 50x36 (even sides)
    assert np.allclose(np.diff(clip.times), 0.1, atol=1e-3)
    assert clip.info["fps"] == 10 and any("resized" in n for n in clip.info["notes"])
    trimmed = decode_clip(path, Caps(fps=10, max_frames=8))
    assert len(trimmed.frames) == 8 and trimmed.times[-1] == pytest.approx(0.7, abs=1e-3)
    assert any(n.startswith("trimmed") for n in trimmed.info["notes"])
    with pytest.raises(VideoError) as e:
        decode_clip(path, Caps(fps=10, max_frames=8, over_frames="reject"))
    assert e.value.reason == "too_long"
    with pytest.raises(VideoError) as e:
        decode_clip(path, Caps(max_duration_s=1.5))
    assert e.value.reason == "too_long"
    span = decode_clip(path, Caps(fps=10, max_frames=100), span=(1.0, 1.5))
    assert len(span.frames) == 5 and span.times[0] == pytest.approx(1.0, abs=1e-3)
    slow = decode_clip(path, Caps(fps=60, max_frames=100))  # never above the source rate
    assert len(slow.frames) == 40 and slow.info["fps"] == 20


def test_encoding_is_byte_stable_and_decodes_back():
    frames = noise_clip(10)
    a, b = encode_mp4(frames, 8), encode_mp4(frames.copy(), Fraction(8))
    assert a == b
    back, fps = read_frames(a)
    assert back.shape == frames.shape and fps == 8
    assert np.abs(back.astype(int) - frames).mean() < 12  # lossy, but close
    masks = {"masks": (frames[..., 0] > 128).astype(np.uint8)}
    z1 = encode_npz(masks)
    assert z1 == encode_npz(copy.deepcopy(masks))
    with zipfile.ZipFile(io.BytesIO(z1)) as zf:
        assert all(i.date_time == (1980, 1, 1, 0, 0, 0) for i in zf.infolist())
    assert np.array_equal(np.load(io.BytesIO(z1))["masks"], masks["masks"])


# --- tracking, removal, temporal edits ------------------------------------------------------


@pytest.fixture(scope="module")
def processed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("video")
    cfg = video_config(tmp, [clips_input(4, seed=2)])
    records = load_records(cfg)
    return records, run_stages(cfg, records)


def _truth(rec: dict[str, Any], targets: list[str]) -> tuple[dict[str, Any], np.ndarray]:
    seed, idx, size, n, fps = video_scenes.parse_clip_uri(rec["uri"])
    spec = video_scenes.clip_spec(seed, idx, size, n, fps)
    gt = video_scenes.object_masks(spec)
    keep = [k for k, o in enumerate(spec["objects"]) if o["category"] in targets]
    return spec, gt[keep].any(axis=0)


def test_masks_tracked_through_time_match_ground_truth(processed):
    records, samples = processed
    entered = 0
    for rec, s in zip(records, samples, strict=True):
        assert s.ok, s.meta.get("reject")
        spec, truth = _truth(rec, s.meta["targets"])
        core = s.arrays["masks_core"] > 0
        assert core.shape == truth.shape
        ious = [(core[t] & truth[t]).sum() / (core[t] | truth[t]).sum() if (core[t] | truth[t]).any() else 1.0
                for t in range(len(core))]
        assert np.mean(ious) > 0.8 and min(ious) > 0.5, (rec["uri"], np.round(ious, 2))
        # annotations were used on every 4th frame only: the others are tracking
        assert s.meta["tracking"]["detection_frames"] == list(range(0, len(core), 4))
        # one track per object, including one that entered mid-clip (caught, carried back)
        targeted = [o for o in spec["objects"] if o["category"] in s.meta["targets"]]
        assert len(s.meta["instances"]) == len(targeted)
        for o, inst in zip(targeted, sorted(s.meta["instances"], key=lambda i: i["frames"][0]), strict=False):
            if o["enter"] > 0:
                entered += 1
                assert inst["frames"][0] <= o["enter"] + 1
        dil = s.arrays["masks"] > 0
        assert dil[core].all() and dil.sum() > core.sum()
    assert entered >= 1


def test_remove_keeps_outside_pixels_and_erases_the_object(processed):
    records, samples = processed
    for rec, s in zip(records, samples, strict=True):
        spec, truth = _truth(rec, s.meta["targets"])
        orig, masks = s.arrays["video"], s.arrays["masks"] > 0
        out = s.arrays["variant/remove"]
        assert np.array_equal(out[~masks], orig[~masks])  # bit-identical outside, before encoding
        gt = video_scenes.object_masks(spec)
        for k, o in enumerate(spec["objects"]):
            if o["category"] not in s.meta["targets"]:
                continue
            c = np.array(COLORS[o["color"]])
            near = lambda v, c=c: np.abs(v.astype(int) - c).max(-1) < 48  # noqa: E731
            assert near(orig)[gt[k]].mean() > 0.5  # the object is there in the original
            assert near(out)[gt[k]].mean() < 0.01, o  # and gone from every frame
        # background recovered from other frames: close to the true (object-free) photograph
        bg = video_scenes._background(spec["photo"], spec["crop"], spec["width"], spec["height"])
        err = np.abs(out.astype(int) - bg.astype(int))[masks].mean()
        assert err < 8, err
        vm = s.meta["metrics"]["remove"]
        assert vm["outside_changed_frac"] == 0.0 and vm["propagated_frac"] > 0.9
        assert vm["flicker_inside"] is not None and vm["flicker_inside"] < vm["flicker_inside_orig"]
        assert {"flicker_background", "contrast_ratio", "inpainted_frac"} <= set(vm)
        bo = s.arrays["variant/blackout"]
        assert np.array_equal(bo[~masks], orig[~masks]) and (bo[masks] == 0).all()


def test_a_rejected_control_leaves_no_control_masks_in_the_shard(processed):
    """Issue 17: the sample owns a variant's arrays, so a random_mask dropped after edit (by qa
    or verify) takes its per-frame control masks with it: masks.npz has no control_masks."""
    s = next(s for s in processed[1] if s.ok and "random_mask" in s.meta["variants"])
    s = copy.deepcopy(s)
    s.reject_variant("verify", "random_mask", "test", "dropped after edit")
    assert s.region("random_mask") is None and "variant/random_mask" not in s.arrays
    PartEncoder().encode_samples([s])
    with np.load(io.BytesIO(s.arrays["parts"]["masks.npz"])) as z:
        assert "control_masks" not in z.files
    assert "random_mask.mp4" not in s.arrays["parts"]


def test_random_mask_control_moves_the_evidence_shape_clear_of_its_footprint(processed):
    made = 0
    for _, s in zip(*processed, strict=True):
        if "random_mask" not in s.meta["variants"]:
            assert any(r["variant"] == "random_mask" for r in s.meta.get("variant_rejects", []))
            continue
        made += 1
        ctrl, masks = s.arrays["mask/random_mask"], s.arrays["masks"] > 0
        frames, out = s.arrays["video"], s.arrays["variant/random_mask"]
        assert not (ctrl & masks.any(axis=0)[None]).any()  # clear of the whole footprint, every frame
        assert np.array_equal(ctrl.sum(axis=(1, 2)), masks.sum(axis=(1, 2)))  # same area, frame by frame
        assert np.array_equal(out[~ctrl], frames[~ctrl]) and (out[ctrl] == 0).all()
        assert all(q["answers"]["random_mask"] == q["answers"]["orig"] for q in s.meta["qa"])
    assert made


def test_pixels_no_frame_shows_are_inpainted_once():
    rng = np.random.default_rng(0)
    frames = np.repeat(rng.integers(60, 200, (1, 48, 64, 3), dtype=np.uint8), 6, axis=0)
    masks = np.zeros((6, 48, 64), np.uint8)
    masks[:, 10:20, 10:20] = 1  # a static object: never uncovered
    masks[:3, 30:40, 40:50] = 1  # uncovered later
    out, stats = temporal_fill(frames, masks)
    assert 0 < stats["inpainted_frac"] < 1 and stats["propagated_frac"] > 0
    assert np.array_equal(out[:, 30:40, 40:50], frames[:, 30:40, 40:50])  # recovered exactly
    assert (out[:, 10:20, 10:20] == out[0, 10:20, 10:20]).all()  # one fill for every frame: no flicker
    assert np.array_equal(out[masks == 0], frames[masks == 0])


def test_temporal_edits_and_their_answers(processed):
    records, samples = processed
    kinds = set()
    for rec, s in zip(records, samples, strict=True):
        orig = s.arrays["video"]
        n = len(orig)
        e = s.meta["edits"]
        assert np.array_equal(s.arrays["variant/reverse"], orig[::-1])
        order = e["shuffle"]["frame_order"]
        assert sorted(order) == list(range(n)) and order != list(range(n))
        assert all(p != i for i, p in enumerate(e["shuffle"]["segment_order"]))
        a, b = e["freeze"]["frames"]
        fz = s.arrays["variant/freeze"]
        assert all(np.array_equal(fz[t], orig[a]) for t in range(a, b + 1))
        assert np.array_equal(fz[:a], orig[:a]) and np.array_equal(fz[b + 1:], orig[b + 1:])
        assert e["freeze"]["t_start"] < e["freeze"]["t_end"]
        for v in ("reverse", "shuffle", "freeze"):
            assert s.meta["metrics"][v]["only_original_frames"] and s.meta["metrics"][v]["frames_moved_frac"] > 0.3
        truth = {q["question"]: q["answer"] for q in rec["questions"]}
        for q in s.meta["qa"]:
            kinds.add(q["kind"])
            ans = q["answers"]
            if q["question"] in truth:  # questions written from the generator's geometry
                assert ans["orig"] == truth[q["question"]]
            if q["kind"] == "direction":
                assert {ans["orig"], ans["reverse"]} == {"left", "right"}
                assert ans["shuffle"] == ans["freeze"] == ans["remove"] == "unknown"
            elif q["kind"] == "order":
                assert {ans["orig"], ans["reverse"]} == {"before", "after"}
                assert ans["shuffle"] == "unknown" and ans["freeze"] == ans["orig"]
            elif q["kind"] == "existence":
                assert ans["orig"] == "yes" and ans["remove"] == "no" and ans["blackout"] == "unknown"
                assert ans["reverse"] == ans["shuffle"] == ans["freeze"] == "yes"
            elif q["kind"] == "temporal":
                assert all(ans[v] == "unknown" for v in ("reverse", "shuffle", "freeze", "remove"))
            # questions never mention the edit
            assert not any(w in q["question"].lower() for w in ("revers", "shuffl", "froz", "remov", "edit"))
        for v in s.meta["variants"]:  # every counterfactual changes some answer; the control none
            changed = any(q["answers"][v] != q["answers"]["orig"] for q in s.meta["qa"])
            assert changed == (v != "random_mask"), v
    assert {"existence", "direction", "temporal"} <= kinds


# --- bad inputs -----------------------------------------------------------------------------


def _audio_only(path: Path) -> None:
    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("aac", rate=16000)
        s.layout = "mono"
        fr = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        fr.sample_rate = 16000
        for i in range(8):
            fr.pts = i * 1024
            for p in s.encode(fr):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def _vfr(path: Path, frames: np.ndarray) -> None:
    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        s.codec_context.time_base = Fraction(1, 1000)
        pts = np.cumsum([0] + [40, 40, 200, 40, 40, 300, 40, 40, 40, 200, 40][: len(frames) - 1])
        for f, p in zip(frames, pts, strict=True):
            vf = av.VideoFrame.from_ndarray(f, format="rgb24")
            vf.pts, vf.time_base = int(p), Fraction(1, 1000)
            for pk in s.encode(vf):
                c.mux(pk)
        for pk in s.encode():
            c.mux(pk)


def test_bad_videos_are_rejected_with_reasons(tmp_path):
    d = tmp_path / "v"
    d.mkdir()
    good = encode_mp4(noise_clip(12), 10)
    (d / "good.mp4").write_bytes(good)
    (d / "zero.mp4").write_bytes(b"")
    (d / "text.mp4").write_bytes(b"not a video at all\n" * 50)
    (d / "truncated.mp4").write_bytes(good[: len(good) // 2])
    (d / "long.mp4").write_bytes(encode_mp4(noise_clip(60), 20))
    (d / "one.mp4").write_bytes(encode_mp4(noise_clip(1), 10))
    (d / "huge.mp4").write_bytes(encode_mp4(noise_clip(4, 320, 240), 10))
    _audio_only(d / "audio.m4a")
    _vfr(d / "vfr.mp4", noise_clip(12))
    expect = {"good.mp4": "ok", "zero.mp4": "empty_file", "text.mp4": "not_a_video", "truncated.mp4": "corrupt_video",
              "long.mp4": "too_long", "one.mp4": "too_few_frames", "huge.mp4": "too_large", "audio.m4a": "no_video_stream",
              "vfr.mp4": "variable_frame_rate", "missing.mp4": "file_not_found"}
    q = [{"question": "Does the scene change?", "answer": "yes", "kind": "temporal"}]
    with open(d / "videos.jsonl", "w") as f:
        for name in expect:
            f.write(json.dumps({"video": name, "questions": q}) + "\n")
        f.write('{"video": "good.mp4"}\n')  # no question
        f.write("{broken\n")
    cfg = video_config(tmp_path, [{"kind": "video_manifest", "path": str(d / "videos.jsonl")}],
                       ingest={"fps": 10, "max_frames": 16, "over_frames": "reject", "vfr": "reject"})
    cfg.limits.max_pixels = 20_000  # 96x64 passes, 320x240 does not
    records = load_records(cfg)
    samples = run_stages(cfg, records, stop_after="ingest")
    got = {Path(r["uri"]).name if "error" not in r else r["error"].split(":")[0]:
           ("ok" if s.ok else s.meta["reject"]["reason"]) for r, s in zip(records, samples, strict=True)}
    assert {k: got[k] for k in expect} == expect
    assert got["bad_manifest_line"] == "bad_manifest_line" and got["no_question"] == "no_question"
    # variable frame rate is resampled by timestamp unless the config says reject
    cfg2 = video_config(tmp_path, [{"kind": "video_manifest", "path": str(d / "videos.jsonl")}], ingest={"fps": 10})
    vfr = [s for r, s in zip(records, run_stages(cfg2, records[:9], stop_after="ingest"), strict=False)
           if r["uri"].endswith("vfr.mp4")][0]
    assert vfr.ok and vfr.meta["source"]["vfr"] and np.all(np.diff(vfr.meta["source"]["times"]) > 0)


def test_image_inputs_into_video_backends_are_rejected(tmp_path):
    cfg = video_config(tmp_path, [{"kind": "procedural", "count": 1}])
    s = run_stages(cfg, load_records(cfg), stop_after="ingest")
    assert s[0].meta["reject"]["reason"] == "not_a_video_input"


# --- whole runs -----------------------------------------------------------------------------


def test_end_to_end_shards_read_back_and_reruns_are_byte_identical(tmp_path):
    cfg = video_config(tmp_path / "a", [clips_input(3, seed=2, frames=16)])
    res = run_pipeline(cfg, local=True, progress=False)
    out = res.out_dir
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["samples"] == 3
    index = pq.read_table(out / "index.parquet").to_pylist()
    assert len(index) == 3 and all("reverse" in r["variants"] for r in index)
    n = 0
    for shard in sorted(out.glob("*.tar")):
        for sample in wds.WebDataset(str(shard), shardshuffle=False):
            n += 1
            doc = json.loads(sample["json"])
            assert set(doc["parts"]) == {k for k in sample if not k.startswith("__")}
            assert {"orig.mp4", "masks.npz", *[f"{v}.mp4" for v in doc["variants"]]} <= set(sample)
            T = len(doc["source"]["times"])
            masks = np.load(io.BytesIO(sample["masks.npz"]))
            assert masks["masks"].shape == (T, doc["source"]["height"], doc["source"]["width"])
            for part in ("orig.mp4", *[f"{v}.mp4" for v in doc["variants"]]):
                frames, fps = read_frames(sample[part])
                assert frames.shape[0] == T and fps == doc["source"]["fps"] == 8
            for q in doc["qa"]:
                assert set(q["answers"]) == {"orig", *doc["variants"]}
            assert doc["provenance"]["stages"]["edit"]["backend"] == "video"
            # a clip is named under source.video (an image under source.image), never both
            assert doc["source"]["video"].startswith("procedural-video://") and "image" not in doc["source"]
    assert n == 3
    assert all(r["source"].startswith("procedural-video://") for r in index)
    card = (out / "README.md").read_text()
    assert "`KEY.orig.mp4`" in card and "`KEY.masks.npz`" in card and ".jpg" not in card
    assert "video-text-to-text" in card and "original clip" in card
    # the viewer plays each clip from a copy next to the page, its first frame as the poster
    from counterfactory.versions import read_version
    from counterfactory.viewer import build_viewer

    page = build_viewer(read_version(out))
    data = json.loads(page.read_text().split('id="cf-data">')[1].split("</script>")[0])
    assert len(data["samples"]) == 3
    for smp in data["samples"]:
        assert smp["frames"]["orig"].endswith(".mp4") and smp["outline"]
        assert smp["source"].startswith("procedural-video://")
        for name, src in smp["frames"].items():
            assert (page.parent / src).is_file() and (page.parent / smp["posters"][name]).is_file()
    # the trainer loader: clips with a time axis, masks per frame, batches through collate_pairs
    import torch

    from counterfactory.loader import collate_pairs, load

    recs = list(load(out, image_size=(48, 64)))
    assert len(recs) == 3
    for r in recs:
        T = len(r["meta"]["source"]["times"])
        assert r["orig"].shape == (T, 3, 48, 64) and r["orig"].dtype == torch.float32
        assert r["mask"].shape == (T, 1, 48, 64) and set(r["mask"].unique().tolist()) <= {0.0, 1.0}
        assert set(r["variants"]) == set(r["meta"]["variants"]) and r["mask"].sum() > 0
    batch = next(iter(torch.utils.data.DataLoader(load(out), batch_size=3, collate_fn=collate_pairs)))
    assert batch["orig"].shape[:2] == (3, 16) and batch["mask"].shape[2] == 1
    pil = next(iter(load(out, decode="pil")))
    assert len(pil["orig"]) == 16 and pil["orig"][0].mode == "RGB"
    again = run_pipeline(video_config(tmp_path / "b", [clips_input(3, seed=2, frames=16)]), local=True, progress=False)
    m2 = json.loads((again.out_dir / "manifest.json").read_text())
    assert [s["sha256"] for s in m2["shards"]] == [s["sha256"] for s in manifest["shards"]]


def _offset_mp4(path: Path, frames: np.ndarray, first_ms: int, step_ms: int = 100) -> None:
    """An MP4 whose timestamps start at ``first_ms`` (cut from a longer recording)."""
    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=1000 // step_ms)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        s.codec_context.time_base = Fraction(1, 1000)
        for i, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(f, format="rgb24")
            vf.pts, vf.time_base = first_ms + step_ms * i, Fraction(1, 1000)
            for pk in s.encode(vf):
                c.mux(pk)
        for pk in s.encode():
            c.mux(pk)


def _rotated(mp4: bytes) -> bytes:
    """The same MP4 with a display matrix that turns it 90 degrees (as phones store portrait
    video): the track header's matrix a=0, b=1, c=-1, d=0."""
    import struct

    data = bytearray(mp4)
    i = data.find(b"tkhd")
    assert data[i + 4] == 0, "version-0 tkhd expected"
    m = i + 4 + 4 + 4 * 5 + 8 + 8
    data[m:m + 36] = struct.pack(">9i", 0, 0x10000, 0, -0x10000, 0, 0, 0, 0, 0x40000000)
    return bytes(data)


def test_times_count_from_the_stream_start_and_rotation_is_applied(tmp_path):
    clip = noise_clip(20, 96, 64)
    _offset_mp4(tmp_path / "late.mp4", clip, first_ms=5000)
    caps = Caps(fps=10, max_frames=32, min_frames=4)
    late = decode_clip(tmp_path / "late.mp4", caps)
    assert late.times[0] == 0.0 and late.info["start_time"] == 5.0 and len(late.frames) == 20
    part = decode_clip(tmp_path / "late.mp4", caps, span=(0.5, 1.5))
    assert part.times[0] == 0.5 and len(part.frames) == 10
    ref = decode_clip(encode_mp4(clip, 10), caps)
    def diff(a, b):  # two encodes of the same frames differ by a few levels
        return np.abs(a.astype(int) - b.astype(int)).mean()

    assert diff(part.frames, ref.frames[5:15]) < min(diff(part.frames, ref.frames[4:14]),
                                                      diff(part.frames, ref.frames[6:16]))
    turned = decode_clip(_rotated(encode_mp4(clip, 10)), caps)
    assert turned.frames.shape[1:3] == (96, 64) and turned.info["rotation"] in (90, 270)
    k = turned.info["rotation"] // 90
    assert diff(turned.frames, np.rot90(ref.frames, k, axes=(1, 2))) < diff(
        turned.frames, np.rot90(ref.frames, k + 2, axes=(1, 2))) / 2
    assert any("rotated" in n for n in turned.info["notes"])


def test_remove_on_textured_ground_is_kept_and_a_faded_object_is_not(tmp_path):
    """The removal check compares the object itself with a ring clear of the dilated mask: a
    square erased from a strongly textured background passes, the same square only faded does not."""
    import copy as copymod

    h, w, n, sq = 64, 96, 16, 16
    y, x = np.mgrid[0:h, 0:w]
    bg = np.stack([128 + 60 * np.sin(x / 7.0), 128 + 60 * np.cos(y / 5.0), 120 + 0 * x], -1).astype(np.uint8)
    clip, kfs = [], []
    for t in range(n):
        f = bg.copy()
        x0 = 4 + t * (w - sq - 8) // (n - 1)
        f[24:24 + sq, x0:x0 + sq] = (230, 20, 20)
        clip.append(f)
        kfs.append({"t": t / 8, "box": [x0, 24, x0 + sq, 24 + sq]})
    (tmp_path / "sq.mp4").write_bytes(encode_mp4(np.stack(clip), 8))
    line = {"video": "sq.mp4", "questions": [{"question": "Is there a red square in the video?", "answer": "yes",
                                               "kind": "existence", "targets": ["square"]}],
            "objects": [{"category": "square", "attributes": {"color": "red"}, "keyframes": kfs}]}
    (tmp_path / "v.jsonl").write_text(json.dumps(line) + "\n")
    cfg = video_config(tmp_path, [{"kind": "video_manifest", "path": str(tmp_path / "v.jsonl")}],
                       ingest={"fps": 8, "max_frames": 16})
    (edited,) = run_stages(cfg, load_records(cfg), stop_after="edit")
    assert edited.ok and "remove" in edited.meta["variants"], edited.meta.get("reject")
    faded = copymod.deepcopy(edited)
    core = faded.arrays["masks_core"] > 0
    orig = faded.arrays["video"].astype(np.int16)
    faded.arrays["variant/remove"] = np.where(core[..., None], (orig * 0.7).astype(np.int16), orig).astype(np.uint8)
    sc = next(s for s in cfg.stages if s.name == "verify")
    verify = get_backend(sc.name, sc.backend)(params=sc.params, run=cfg.run_settings())
    verify.process_batch([edited, faded])
    assert "remove" in edited.meta["variants"], edited.meta.get("variant_rejects")
    rej = [r for r in faded.meta.get("variant_rejects", []) if r["variant"] == "remove"]
    assert rej and rej[0]["reason"] == "object_still_visible", faded.meta.get("variant_rejects")
