"""The shard writer writes the bytes tarfile (and webdataset's TarWriter) would write."""

from __future__ import annotations

import hashlib
import io
import tarfile

import pytest
import webdataset as wds

from counterfactory.pipeline.writer import (
    TAR_MTIME,
    DatasetCommit,
    ShardWriter,
    _TarShard,
    _ustar_header,
    shard_range,
)


def _tarfile_header(name: str, size: int) -> bytes:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode, ti.mtime, ti.uname, ti.gname = size, 0o644, TAR_MTIME, "", ""
    return ti.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")


@pytest.mark.parametrize("name", [
    "0123456789abcdef.orig.jpg", "k.json", "a" * 96 + ".png", "a" * 97 + ".png",  # 100 and 101 chars
    "clé.json", "dir/key.mask.png", "k" * 200 + ".jpg",
])
@pytest.mark.parametrize("size", [0, 1, 511, 512, 513, 8**11 - 1, 8**11])
def test_header_is_tarfiles(name, size):
    assert _ustar_header(name, size) == _tarfile_header(name, size)


def _wds_shard(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    """What the writer wrote before it wrote tar headers itself (webdataset's TarWriter)."""
    buf = io.BytesIO()
    w = wds.TarWriter(buf, user="", group="", mode=0o644, mtime=TAR_MTIME)
    for key, parts in samples:
        w.write({"__key__": key, **parts})
    w.close()
    return buf.getvalue()


@pytest.mark.parametrize("sizes", [[], [0], [1, 511, 512, 513], [10240 - 3 * 512], [10240], [30_000, 7]])
def test_shard_bytes_equal_webdataset_tarwriter(tmp_path, sizes):
    samples = [(f"{i:04x}key", {"json": b"{}", "orig.jpg": bytes([i % 251]) * n, "mask.png": b"m" * (n // 3)})
               for i, n in enumerate(sizes)]
    shard = _TarShard(tmp_path / "x.tar.tmp")
    for key, parts in samples:
        shard.write_sample(key, parts)
    shard.finish()
    data = (tmp_path / "x.tar.tmp").read_bytes()
    assert data == _wds_shard(samples)
    assert shard.size == len(data) and shard.sha.hexdigest() == hashlib.sha256(data).hexdigest()
    with tarfile.open(tmp_path / "x.tar.tmp") as tf:
        got = {m.name: tf.extractfile(m).read() for m in tf}
    assert got == {f"{k}.{e}": v for k, p in samples for e, v in p.items()}


def test_shard_rejects_non_bytes(tmp_path):
    shard = _TarShard(tmp_path / "x.tar.tmp")
    with pytest.raises(ValueError, match="not bytes"):
        shard.write_sample("k", {"json": {"a": 1}})


def _write(out, shard_size: int, rows: list[tuple], *, pairs: bool = False, config=None) -> dict:
    """Each shard written by its own ShardWriter (as a Ray task would), last shard first, the
    results committed as they come; returns the manifest."""
    n = len(rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / ".d-000000.tar.4242.tmp").write_bytes(b"half")  # a worker killed mid-shard
    commit = DatasetCommit(out, "d", shard_size, n, config or {}, "h", pairs=pairs)
    for k in reversed(commit.on_write_start()):
        lo, hi = shard_range(k, shard_size, n)
        w = ShardWriter(out, "d", k, lo, hi, pairs=pairs)
        for r in rows[lo:hi]:
            w.add(*r)
        commit.on_write_result(w.finish())
    return commit.on_write_complete()


META = {"source": {"image": "x.png", "origin": "t", "sha256": "s"}, "variants": ["remove"],
        "qa": [{"question": "q", "kind": "exists", "answers": {"orig": "yes", "remove": "no"}}],
        "targets": ["cat"], "instances": [{}], "mask": {"area_frac": 0.1}, "metrics": {}}


def test_writer_shards_manifest_and_journal(tmp_path):
    """Shards are renamed into place whole, checksummed, journaled; no temporary file remains;
    shards written in any order are committed in shard order."""
    rows = [(i, f"k{i}", "ok", META, {"json": b"{}", "orig.jpg": b"x" * (100 * i)}) for i in range(5)]
    manifest = _write(tmp_path, 2, rows, config={"a": 1})
    assert [s["samples"] for s in manifest["shards"]] == [2, 2, 1]
    for s in manifest["shards"]:
        data = (tmp_path / s["name"]).read_bytes()
        assert len(data) == s["bytes"] and hashlib.sha256(data).hexdigest() == s["sha256"]
    assert sorted(p.name for p in (tmp_path / ".journal").iterdir()) == ["000000.json", "000001.json",
                                                                        "000002.json"]
    assert not list(tmp_path.glob(".*.tmp")) and not list(tmp_path.glob("*.tmp"))
    with tarfile.open(tmp_path / "d-000000.tar") as tf:
        assert tf.getnames() == ["k0.json", "k0.orig.jpg", "k1.json", "k1.orig.jpg"]


def test_shard_is_a_fixed_input_range_and_a_rewrite_is_identical(tmp_path):
    """A range whose inputs were all rejected has an empty tar (names 0..K-1, no gaps); a
    retried write of a shard gives the same bytes; inputs must come in order."""
    rej = {"uri": "gone.png", "origin": "m", "reject": {"stage": "ingest", "reason": "file_not_found", "detail": ""}}
    rows = [(0, "k0", "ok", META, {"json": b"{}"}), (1, "", "rejected", rej, {}),
            (2, "", "rejected", rej, {}), (3, "k3", "ok", META, {"json": b"{}"})]
    manifest = _write(tmp_path, 2, rows)
    assert [(s["name"], s["samples"]) for s in manifest["shards"]] == [("d-000000.tar", 1), ("d-000001.tar", 1)]
    manifest = _write(tmp_path / "b", 1, rows)
    assert [(s["name"], s["samples"]) for s in manifest["shards"]] == [
        ("d-000000.tar", 1), ("d-000001.tar", 0), ("d-000002.tar", 0), ("d-000003.tar", 1)]
    with tarfile.open(tmp_path / "b" / "d-000001.tar") as tf:
        assert tf.getnames() == []
    assert manifest["counts"]["samples"] + manifest["counts"]["rejected_inputs"] == 4
    before = (tmp_path / "b" / "d-000003.tar").read_bytes()
    again = ShardWriter(tmp_path / "b", "d", 3, 3, 4, pairs=False)
    again.add(*rows[3])
    assert again.finish()["shard"] == manifest["shards"][3]
    assert (tmp_path / "b" / "d-000003.tar").read_bytes() == before
    w = ShardWriter(tmp_path, "d", 0, 0, 2, pairs=False)
    with pytest.raises(RuntimeError, match="expected 0"):
        w.add(1, "k1", "ok", META, {})
    with pytest.raises(RuntimeError, match="never arrived"):
        w.finish()


def test_index_has_typed_answers_and_metrics(tmp_path):
    """Answers and metrics are parquet columns a reader filters without parsing JSON; pairs are
    written beside the shard from the same bytes, with the same members in every pair."""
    import json

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from counterfactory.index import ANSWERS_TYPE, METRICS_TYPE, answers_of, metrics_of

    meta = {"source": {"image": "x.png", "origin": "t", "sha256": "s"}, "variants": ["remove", "flip"],
            "qa": [{"question": "Is there a cat?", "kind": "existence", "targets": ["cat"],
                    "answers": {"orig": "yes", "remove": "no", "flip": "yes"}}],
            "targets": ["cat"], "instances": [{}], "mask": {"area_frac": 0.1}, "edits": {"remove": {"method": "telea"}},
            "metrics": {"mask_area_frac": 0.1, "remove": {"inside_mad": 12.5, "note": "text"},
                        "flip": {"mirror_exact": True}}}
    parts = {"json": b"{}", "orig.jpg": b"o", "remove.jpg": b"r", "flip.jpg": b"f", "mask.png": b"m",
             "remove_mask.png": b"rm"}
    manifest = _write(tmp_path, 2, [(0, "k0", "ok", meta, parts)], pairs=True)
    t = pq.read_table(tmp_path / "index.parquet")
    assert t.schema.field("answers").type == ANSWERS_TYPE and t.schema.field("metrics").type == METRICS_TYPE
    flat = pc.list_flatten(t.column("answers"))
    assert pc.struct_field(flat, "remove").to_pylist() == ["no"] and pc.struct_field(flat, "swap").to_pylist() == [None]
    row = t.to_pylist()[0]
    assert answers_of(row["answers"]) == [{"orig": "yes", "remove": "no", "flip": "yes"}]
    assert metrics_of(row["metrics"]) == {"mask_area_frac": 0.1, "remove": {"inside_mad": 12.5}, "flip": {"mirror_exact": 1.0}}
    with tarfile.open(tmp_path / "pairs" / "d-000000.tar") as tf:
        names = tf.getnames()
        mask = {m.name: tf.extractfile(m).read() for m in tf if m.name.endswith("mask.png")}
        docs = [json.loads(tf.extractfile(m).read()) for m in tf if m.name.endswith(".json")]
    assert names == [f"k0_{v}.{p}" for v in ("remove", "flip")
                     for p in ("counterfactual.jpg", "json", "mask.png", "orig.jpg")]
    assert mask == {"k0_remove.mask.png": b"rm", "k0_flip.mask.png": b"m"}  # the edit's own region, else the evidence
    assert [(d["variant"], d["qa"][0]["answer_counterfactual"], d["qa"][0]["changed"]) for d in docs] == \
        [("remove", "no", True), ("flip", "yes", False)]
    assert manifest["counts"]["pairs"] == 2 and manifest["files"]["pairs/d-000000.tar"]["samples"] == 2


def test_an_answer_for_an_unknown_variant_is_refused(tmp_path):
    meta = {"source": {"image": "x.png", "origin": "t", "sha256": "s"}, "variants": ["warp"],
            "qa": [{"question": "q", "kind": "existence", "answers": {"orig": "yes", "warp": "no"}}],
            "targets": [], "instances": [], "mask": {"area_frac": 0.1}, "metrics": {}}
    w = ShardWriter(tmp_path, "d", 0, 0, 1, pairs=False)
    with pytest.raises(ValueError, match="warp"):
        w.add(0, "k0", "ok", meta, {"json": b"{}", "orig.jpg": b"o"})


def test_index_and_rejects_name_an_image_or_a_clip_by_its_source_uri(tmp_path):
    """One ``source`` column for images (``source.image``) and clips (``source.video``), and for
    an input rejected before ingest made its source record (the record's ``uri``)."""
    import pyarrow.parquet as pq

    from counterfactory.index import source_uri

    assert source_uri({"image": "a.png"}) == "a.png" and source_uri({"video": "b.mp4"}) == "b.mp4"
    assert source_uri({"origin": "x"}) == "" and source_uri({}) == ""
    base = {"qa": [{"question": "q", "kind": "existence", "answers": {"orig": "yes", "remove": "no"}}],
            "targets": [], "instances": [], "mask": {"area_frac": 0.1}, "metrics": {}, "variants": ["remove"],
            "variant_rejects": [{"stage": "edit", "variant": "blackout", "reason": "r", "detail": ""}]}
    _write(tmp_path, 4, [
        (0, "k0", "ok", {**base, "source": {"image": "x.png", "origin": "m:1", "sha256": "s0"}}, {"json": b"{}"}),
        (1, "k1", "ok", {**base, "source": {"video": "c.mp4", "origin": "m:2", "sha256": "s1"}}, {"json": b"{}"}),
        (2, "", "rejected", {"uri": "gone.mp4", "origin": "m:3", "media": "video",
                             "reject": {"stage": "ingest", "reason": "file_not_found", "detail": ""}}, {})])
    assert [r["source"] for r in pq.read_table(tmp_path / "index.parquet").to_pylist()] == ["x.png", "c.mp4"]
    rejects = pq.read_table(tmp_path / "rejects.parquet").to_pylist()
    assert [(r["source"], r["origin"], r["variant"]) for r in rejects] == [
        ("x.png", "m:1", "blackout"), ("c.mp4", "m:2", "blackout"), ("gone.mp4", "m:3", None)]


def _masks() -> list:
    """Masks as the stages make them (0/255 shapes, dilated blobs, empty, full, odd sizes)."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(7)
    out = [np.zeros((256, 256), np.uint8), np.full((64, 48), 255, np.uint8), np.zeros((1, 17), np.uint8)]
    for h, w in ((256, 256), (97, 131), (480, 640)):
        m = np.zeros((h, w), np.uint8)
        for _ in range(3):
            cv2.circle(m, (int(rng.integers(w)), int(rng.integers(h))), int(rng.integers(4, 40)), 255, -1)
        out.append(cv2.dilate(m, np.ones((5, 5), np.uint8)))
    out.append(((rng.random((33, 70)) > 0.5) * 255).astype(np.uint8))  # no runs at all
    out.append(rng.integers(0, 256, (20, 30), dtype=np.uint8))  # not binary: still lossless
    return out


def test_mask_png_reads_back_the_same_array_in_every_reader():
    """issue 27 (s27encode): the mask parts are written by ``encode_mask`` (rows unfiltered,
    zlib's run-length strategy) instead of libpng's all-filters default; PIL (the loader, the
    export recipes, webdataset's decoders) and OpenCV read the very same 0/255 array back, and a
    stage's mask takes about half the bytes."""
    import cv2
    import numpy as np
    from PIL import Image
    from webdataset.autodecode import Decoder, imagehandler

    from counterfactory.export_recipes import _mask
    from counterfactory.pipeline.writer import encode_mask

    for m in _masks():
        png = encode_mask(m)
        with Image.open(io.BytesIO(png)) as im:
            assert im.format == "PNG" and im.mode == "L" and im.size == (m.shape[1], m.shape[0])
            assert np.array_equal(np.asarray(im), m)
        assert np.array_equal(cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED), m)
        assert np.array_equal(cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_GRAYSCALE), m)
        got = Decoder([imagehandler("l8")])({"__key__": "k", "mask.png": png})["mask.png"]
        assert np.array_equal(got, m)
        assert np.array_equal(_mask(png), m > 0)
        # OpenCV >= 4.11 can say the same (libpng narrows zlib's window under 32 KiB of rows)
        if hasattr(cv2, "IMWRITE_PNG_FILTER") and (m.shape[1] + 1) * m.shape[0] >= 32768:
            ref = cv2.imencode(".png", m, [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_FILTER,
                                           cv2.IMWRITE_PNG_FILTER_NONE, cv2.IMWRITE_PNG_STRATEGY,
                                           cv2.IMWRITE_PNG_STRATEGY_RLE])[1].tobytes()
            if len(ref) < 8192:  # one IDAT chunk (libpng splits larger streams)
                assert png == ref
    blobs = _masks()[3:6]
    old = sum(len(cv2.imencode(".png", m, [cv2.IMWRITE_PNG_COMPRESSION, 3])[1]) for m in blobs)
    assert sum(len(encode_mask(m)) for m in blobs) < 0.75 * old
    # anything else still goes through OpenCV
    assert cv2.imdecode(np.frombuffer(encode_mask(np.zeros((8, 8, 3), np.uint8)), np.uint8), -1).shape == (8, 8, 3)


def _questions_of_one_image(rng, n: int = 3):
    """``n`` encoder-ready samples of one source image (one per question, as inputs are made):
    the same original, a flip shared by all, an edit and a mask of each question's own."""
    import numpy as np

    from counterfactory.sample import Sample

    img = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    flip = np.ascontiguousarray(img[:, ::-1])
    out = []
    for q in range(n):
        mask = np.zeros((48, 64), np.uint8)
        mask[4 * q:4 * q + 10, 5:20] = 255
        edit = img.copy()
        edit[mask > 0] = 10 * q
        meta = {**META, "source": {**META["source"], "sha256": "same-image"}, "variants": ["remove", "flip"],
                "edits": {"remove": {}, "flip": {}}}
        out.append(Sample(q, f"k{q}", "ok", meta, {"image": img.copy(), "mask": mask, "variant/remove": edit,
                                                   "variant/flip": flip.copy()}))
    return out


def test_encoder_reuses_the_parts_a_source_image_shares_across_its_questions(monkeypatch):
    """s28write: consecutive inputs of one image (one per question) share its original and any
    picture their edits share; those are encoded once, the bytes the same as each sample encoded
    on its own. Another source, or the same source with another array, is encoded afresh."""
    import numpy as np

    from counterfactory.pipeline import writer

    rng = np.random.default_rng(3)
    alone = _questions_of_one_image(rng)
    for s in alone:
        writer.PartEncoder().encode_samples([s])
    calls = []
    real = writer._encode_image
    monkeypatch.setattr(writer, "_encode_image", lambda arr, *a: calls.append(1) or real(arr, *a))
    together = _questions_of_one_image(np.random.default_rng(3))
    writer.PartEncoder().encode_samples(together)
    assert [s.arrays["parts"] for s in together] == [s.arrays["parts"] for s in alone]
    assert len(calls) == 3 + 2  # original and flip once, each question's own edit
    a, b, c = _questions_of_one_image(np.random.default_rng(4))
    b.arrays["image"] = b.arrays["image"][::-1].copy()  # the same source, another original
    c.meta["source"] = {**c.meta["source"], "sha256": "another-image"}
    b_orig = real(b.arrays["image"], "jpg", 95)
    calls.clear()
    enc = writer.PartEncoder()
    enc.encode_samples([a])
    enc.encode_samples([b, c])  # the encoder keeps its last sample across batches
    assert len(calls) == 3 + 2 + 3  # b: its original and edit (its flip is a's); c: all three
    assert b.arrays["parts"]["orig.jpg"] == b_orig != a.arrays["parts"]["orig.jpg"]
    assert b.arrays["parts"]["flip.jpg"] == a.arrays["parts"]["flip.jpg"] == c.arrays["parts"]["flip.jpg"]


def test_encoder_reuse_never_trusts_an_array_changed_in_place():
    """The kept array is compared, not trusted: a later sample whose picture is the same memory
    (a view, or the very object, changed in place since) is encoded afresh."""
    import numpy as np

    from counterfactory.pipeline import writer

    a, b = _questions_of_one_image(np.random.default_rng(5), 2)
    shared = a.arrays["image"]
    b.arrays["image"] = shared  # the same object in both samples
    enc = writer.PartEncoder()
    enc.encode_samples([a])
    shared[:8] = 0  # changed in place after a was encoded
    enc.encode_samples([b])
    assert b.arrays["parts"]["orig.jpg"] == writer._encode_image(shared, "jpg", 95) != a.arrays["parts"]["orig.jpg"]


def test_encoder_keeps_at_most_its_byte_cap_of_the_last_sample(monkeypatch):
    """The kept pictures are bounded (a huge photo's variants are not held a sample longer):
    over the cap a part is encoded afresh, with the same bytes."""
    import numpy as np

    from counterfactory.pipeline import writer

    a, b = _questions_of_one_image(np.random.default_rng(6), 2)
    cap = a.arrays["image"].nbytes
    monkeypatch.setattr(writer, "_REUSE_MAX_BYTES", cap)  # the original alone fits
    enc = writer.PartEncoder()
    enc.encode_samples([a])
    assert list(enc._last) == ["orig.jpg"] and enc._kept == cap
    calls = []
    real = writer._encode_image
    monkeypatch.setattr(writer, "_encode_image", lambda arr, *args: calls.append(1) or real(arr, *args))
    enc.encode_samples([b])
    assert len(calls) == 2  # its edit and its flip (kept no longer); the original reused
    assert b.arrays["parts"]["flip.jpg"] == a.arrays["parts"]["flip.jpg"]
