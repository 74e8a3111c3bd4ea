"""Output root on an object store: a real S3 endpoint on loopback (moto's server, the S3 wire
protocol) read and written by pyarrow's S3 filesystem, the one a user's ``s3://`` root opens.

Checked: a run publishes a version whose content id equals a local run's; the same spec again
is a no-op; an upload cut off before its commit marker is never taken for a version, and the
rerun resumes from the local staging with every shard kept; versions/verify/card/diff work on
the URI; the trainer loader streams the shards from the bucket; a damaged remote shard fails
``verify``; a bad URI is one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from counterfactory import publish
from counterfactory import versions as V
from counterfactory.cli import main
from counterfactory.layout import CLAIM
from counterfactory.pipeline.config import ConfigError
from counterfactory.pipeline.runner import run_pipeline
from counterfactory.storage import RemoteDir
from tests.conftest import S3_BUCKET as BUCKET
from tests.conftest import make_config, scenes_input


@pytest.fixture(scope="module")
def s3(s3_server, tmp_path_factory):
    """The loopback S3 endpoint, with this process's AWS environment pointed at it."""
    env = {**s3_server["env"], "COUNTERFACTORY_CACHE": str(tmp_path_factory.mktemp("cache"))}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        yield s3_server["fs"]


def _cfg(tmp: Path, root: str | None = None, **over):
    cfg = make_config(tmp, [scenes_input(6)], output={"shard_size": 5}, **over)
    if root:
        cfg.output.root = root
    return cfg


@pytest.fixture(scope="module")
def published(s3, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("remote")
    root = f"s3://{BUCKET}/datasets"
    remote = run_pipeline(_cfg(tmp, root), local=True)
    local = run_pipeline(_cfg(tmp), local=True)
    return root, remote, local, tmp


def test_remote_version_equals_local_run(published, s3):
    root, remote, local, _ = published
    assert remote.location == f"{root}/demo/v1" and remote.label == "v1"
    assert remote.content_id == local.content_id, "the bytes must not depend on where they are stored"
    names = {i.path.rsplit("/", 1)[-1] for i in s3.get_file_info(pafs.FileSelector(f"{BUCKET}/datasets/demo/v1"))}
    manifest = json.loads(s3.open_input_stream(f"{BUCKET}/datasets/demo/v1/manifest.json").read())
    assert {s["name"] for s in manifest["shards"]} <= names
    assert {"version.json", "index.parquet", "rejects.parquet", "shards.json", "README.md"} <= names
    assert not any(n.startswith(".") for n in names), f"journal/lock uploaded: {names}"
    assert s3.open_input_stream(f"{BUCKET}/datasets/demo/latest").read() == b"v1\n"
    # the mirror keeps the small files, not the shards
    assert (remote.out_dir / "README.md").exists() and not list(remote.out_dir.glob("*.tar"))


def test_same_spec_on_the_store_is_a_noop(published):
    root, remote, _, tmp = published
    again = run_pipeline(_cfg(tmp, root), local=True)
    assert again.reused and again.label == "v1" and again.location == remote.location


def test_commands_on_the_uri(published, s3, capsys):
    root, remote, _, tmp = published
    assert main(["versions", "demo", "--root", root]) == 0
    out = capsys.readouterr().out
    assert "v1 (latest)" in out and "complete" in out
    assert main(["verify", "demo@v1", "--root", root]) == 0
    assert "demo@v1: ok" in capsys.readouterr().out
    assert main(["verify", f"{root}/demo/v1"]) == 0
    capsys.readouterr()
    assert main(["card", f"{root}/demo"]) == 0
    assert "counterfactory" in capsys.readouterr().out.lower()
    # the viewer reads thumbnails out of the remote shards into the local mirror
    assert main(["card", "demo@v1", "--root", root, "--html"]) == 0
    page = Path(capsys.readouterr().out.strip())
    assert page.is_file() and len(list((page.parent / "img").glob("*.jpg"))) >= remote.manifest["counts"]["samples"]
    assert main(["regenerate", "demo@v1", "--root", root, "--local", "--quiet"]) == 0
    assert "identical" in capsys.readouterr().out
    assert main(["eval", "demo@v1", "--root", root, "--export", str(tmp / "q.jsonl")]) == 0
    assert (tmp / "q.jsonl").read_text().count("\n") > 0
    capsys.readouterr()
    # a second version with one changed parameter, then diff across the store
    cfg2 = _cfg(tmp, root)
    cfg2.stage("edit").set_params(inpaint_radius=7)
    second = run_pipeline(cfg2, local=True)
    assert second.label == "v2"
    assert main(["diff", "demo@v1", "demo@v2", "--root", root]) == 0
    assert "stages.edit.params.inpaint_radius: 5 -> 7" in capsys.readouterr().out


def test_loader_streams_shards_from_the_bucket(published):
    from counterfactory import loader

    root, remote, _, _ = published
    ds = loader.load(f"{root}/demo@v1", verify=True)
    records = list(ds)
    assert len(records) == remote.manifest["counts"]["samples"]
    assert all(r["orig"].shape[0] == 3 and r["variants"] for r in records)
    # the same records as the local copy of the same bytes
    local = loader.load(str(published[2].out_dir))
    assert [r["key"] for r in records] == [r["key"] for r in local]


def test_unfinished_upload_is_never_a_version_and_rerun_resumes(s3, tmp_path, monkeypatch):
    root = f"s3://{BUCKET}/cut"
    cfg = _cfg(tmp_path, root)
    real_upload = RemoteDir.upload

    def cut_before_commit(self, local_dir, rel, *, last=(), skip=(), threads=8):
        real_upload(self, local_dir, rel, last=(), skip={*skip, *last}, threads=threads)
        raise ConnectionError("network gone before version.json")

    monkeypatch.setattr(RemoteDir, "upload", cut_before_commit)
    with pytest.raises(ConnectionError):
        run_pipeline(cfg, local=True)
    monkeypatch.undo()
    ds = RemoteDir(f"{root}/demo")
    (v,) = V.list_versions(ds)
    assert v.status().startswith("incomplete") and V.read_latest(ds) is None
    with pytest.raises(V.VersionError):
        V.locate("demo", root)
    staging = V.staging_dirs(ds)
    assert len(staging) == 1 and (staging[0] / ".journal").is_dir(), "the finished shards must be kept"
    res = run_pipeline(_cfg(tmp_path, root), local=True)
    summary = json.loads((res.out_dir / "summary.json").read_text())
    assert summary["resumed"]["inputs"] == res.manifest["counts"]["inputs"], "every shard of the cut run is kept"
    # the rerun finishes the label the cut upload claimed; nothing else is left in the bucket
    assert res.label == "v1" and V.read_latest(ds) == "v1" and V.locate("demo", root).status() == "complete"
    assert [v.label for v in V.list_versions(ds)] == ["v1"]
    assert not any(n.startswith(".") for n, _, _ in ds.child("v1").list())


def test_damaged_remote_shard_fails_verify(published, s3, capsys):
    root, remote, _, tmp = published
    cfg = _cfg(tmp, f"s3://{BUCKET}/damaged")
    res = run_pipeline(cfg, local=True)
    shard = res.manifest["shards"][0]["name"]
    path = f"{BUCKET}/damaged/demo/v1/{shard}"
    data = bytearray(s3.open_input_stream(path).read())
    data[700] ^= 0xFF
    with s3.open_output_stream(path) as f:
        f.write(bytes(data))
    assert main(["verify", "demo@v1", "--root", f"s3://{BUCKET}/damaged"]) == 1
    assert "sha256" in capsys.readouterr().out


def test_bad_uris_are_one_line(s3, tmp_path, capsys):
    with pytest.raises(ConfigError, match="output.root"):
        run_pipeline(_cfg(tmp_path, "nosuchscheme://x/y"), local=True)
    for argv, words in ((["versions", "demo", "--root", f"s3://{BUCKET}/nothing-here"], "no dataset"),
                        (["versions", "demo", "--root", "nosuchscheme://x/y"], "nosuchscheme"),
                        (["verify", "nosuchscheme://x/demo/v1"], "nosuchscheme"),
                        (["versions", "s3://"], "s3://")):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], (argv, err)


def test_publish_cut_after_commit_marker_is_finished_by_the_rerun(s3, tmp_path, monkeypatch):
    """version.json arrived but `latest` did not: the rerun of the spec is a no-op that moves
    `latest`, and drops the claim and its local staging folder."""
    root = f"s3://{BUCKET}/after-commit"

    def lost(ds, label):
        raise ConnectionError("network gone before latest")

    monkeypatch.setattr(publish, "finish_remote", lost)
    with pytest.raises(ConnectionError):
        run_pipeline(_cfg(tmp_path, root), local=True)
    monkeypatch.undo()
    ds = RemoteDir(f"{root}/demo")
    assert not ds.exists("latest") and V.list_versions(ds)[0].status() == "complete"
    res = run_pipeline(_cfg(tmp_path, root), local=True)
    assert res.reused and res.label == "v1"
    assert ds.read_text("latest").strip() == "v1" and not ds.child("v1").exists(CLAIM)
    assert not V.staging_dirs(ds)


def test_unfinished_upload_is_not_a_version_by_uri_either(s3, tmp_path, capsys):
    root = f"s3://{BUCKET}/no-marker"
    res = run_pipeline(_cfg(tmp_path, root), local=True)
    s3.delete_file(f"{BUCKET}/no-marker/demo/v1/version.json")
    assert res.label == "v1" and main(["verify", f"{root}/demo/v1"]) == 2
    assert "unfinished upload" in capsys.readouterr().err


def test_inputs_named_by_s3_uris_are_read_from_the_bucket(s3, tmp_path):
    """Images and clips listed as s3:// URIs: the same samples (keys, pixels) as the same files
    on disk; a missing object is a file_not_found reject; the spec follows an object's change."""
    import numpy as np

    from counterfactory.pipeline.inputs import plan_inputs
    from counterfactory.pipeline.runner import local_batches
    from counterfactory.sample import decode_batch
    from counterfactory.spec import build_spec
    from counterfactory.video_io import encode_mp4
    from tests.conftest import load_records, save, square_line, square_scene
    from tests.test_video import noise_clip, run_stages, video_config

    save(square_scene(), tmp_path / "a.png")
    s3.create_dir(f"{BUCKET}/inputs")
    with s3.open_output_stream(f"{BUCKET}/inputs/a.png") as f:
        f.write((tmp_path / "a.png").read_bytes())
    uri = f"s3://{BUCKET}/inputs/a.png"
    lines = [square_line(uri), square_line(f"s3://{BUCKET}/inputs/missing.png"), square_line("a.png")]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    cfg = make_config(tmp_path, [{"kind": "manifest", "path": str(tmp_path / "m.jsonl")}])
    records = load_records(cfg)
    remote, missing, local = [s for b in local_batches(cfg, records, stop_after="ingest") for s in decode_batch(b)]
    assert remote.ok and local.ok and remote.key == local.key
    assert np.array_equal(remote.arrays["image"], local.arrays["image"])
    assert remote.meta["source"]["sha256"] == local.meta["source"]["sha256"]
    assert not missing.ok and missing.meta["reject"]["reason"] == "file_not_found"
    spec1 = build_spec(cfg, plan_inputs(cfg), None)[0]
    with s3.open_output_stream(f"{BUCKET}/inputs/a.png") as f:
        f.write((tmp_path / "a.png").read_bytes() + b"\0")  # another object at the same name
    assert build_spec(cfg, plan_inputs(cfg), None)[0]["input_set_hash"] != spec1["input_set_hash"]

    clip = encode_mp4(noise_clip(12), 10)
    with s3.open_output_stream(f"{BUCKET}/inputs/c.mp4") as f:
        f.write(clip)
    (tmp_path / "c.mp4").write_bytes(clip)
    q = [{"question": "Does the scene change?", "answer": "yes", "kind": "temporal"}]
    (tmp_path / "v.jsonl").write_text("".join(json.dumps({"video": v, "questions": q}) + "\n"
                                              for v in (f"s3://{BUCKET}/inputs/c.mp4", "c.mp4")))
    vcfg = video_config(tmp_path, [{"kind": "video_manifest", "path": str(tmp_path / "v.jsonl")}],
                        ingest={"fps": 10, "max_frames": 16})
    vremote, vlocal = run_stages(vcfg, load_records(vcfg), stop_after="ingest")
    assert vremote.ok and vlocal.ok, (vremote.meta.get("reject"), vlocal.meta.get("reject"))
    assert vremote.key == vlocal.key


class _Killed(BaseException):
    """Stands in for SIGKILL (not an Exception: nothing swallows it)."""


def _record_uploads(monkeypatch) -> list[str]:
    """The names ``RemoteDir.upload`` puts from here on (what the driver uploads at publish)."""
    uploaded: list[str] = []
    real_upload = RemoteDir.upload

    def recording_upload(self, local_dir, rel, *, last=(), skip=(), threads=8):
        names = real_upload(self, local_dir, rel, last=last, skip=skip, threads=threads)
        uploaded.extend(names)
        return names

    monkeypatch.setattr(RemoteDir, "upload", recording_upload)
    return uploaded


def test_writers_put_shards_on_the_store_and_another_machine_resumes(s3, tmp_path, monkeypatch):
    """Issue 26: each shard's writer puts it (pair shard, journal entry last) in the spec's
    staging prefix on the store; a run killed after two shards resumes from the store on a machine
    without its local working folder; the driver's publish uploads no shard (server-side copies),
    the staging prefix is gone after, and the content id is a local root's."""
    import shutil

    from counterfactory.pipeline import writer as writer_mod

    root = f"s3://{BUCKET}/direct"
    real = writer_mod.DatasetCommit.on_write_result
    seen = {"n": 0}

    def killed_after_two(self, entry):
        real(self, entry)
        seen["n"] += 1
        if seen["n"] == 2:
            raise _Killed()

    with monkeypatch.context() as m:
        m.setattr(writer_mod.DatasetCommit, "on_write_result", killed_after_two)
        with pytest.raises(_Killed):
            run_pipeline(_cfg(tmp_path / "a", root), local=True)
    ds = RemoteDir(f"{root}/demo")
    (prefix,) = [n for n, is_dir, _ in ds.list() if n.startswith(".staging-")]
    stored = {n for n, is_dir, _ in ds.list(prefix, recursive=True) if not is_dir}
    assert {f"{prefix}/demo-00000{k}.tar" for k in (0, 1)} <= stored
    assert {f"{prefix}/.journal/00000{k}.json" for k in (0, 1)} <= stored
    # each shard's audit features go with it (before its marker), so another machine's audit
    # reads them instead of decoding the shards
    assert {f"{prefix}/audit/demo-00000{k}.npz" for k in (0, 1)} <= stored
    for staging in V.staging_dirs(ds):  # another machine: no local working folder
        shutil.rmtree(staging)
    uploaded = _record_uploads(monkeypatch)
    res = run_pipeline(_cfg(tmp_path / "b", root), local=True)
    monkeypatch.undo()
    summary = json.loads((res.out_dir / "summary.json").read_text())
    assert summary["resumed"]["shards"] == 2
    cost = json.loads((res.out_dir / "card.json").read_text())["audit"]["cost"]
    assert cost["from_shards"] == 0 and cost["from_stream"] > 0, cost
    assert uploaded and not [n for n in uploaded if n.endswith(".tar")], uploaded  # metadata only
    assert uploaded[-1] == "version.json"
    local = run_pipeline(_cfg(tmp_path / "c"), local=True)
    assert res.content_id == local.content_id
    assert not [n for n, _, _ in ds.list() if n.startswith(".staging-")]
    assert main(["verify", f"{root}/demo/{res.label}"]) == 0


def test_cross_shard_duplicate_on_the_store(s3, tmp_path, monkeypatch):
    """The duplicate pass rewrites a shard the writer already put on the store: the new one goes
    there too (the driver still uploads no shard), and the version equals a local root's."""
    uploaded = _record_uploads(monkeypatch)
    res = run_pipeline(_dup_cfg(tmp_path / "r", f"s3://{BUCKET}/dups"), local=True)
    monkeypatch.undo()
    local = run_pipeline(_dup_cfg(tmp_path / "l"), local=True)
    assert res.content_id == local.content_id and res.manifest["counts"]["rejected_inputs"] >= 4
    assert uploaded and not [n for n in uploaded if n.endswith(".tar")], uploaded
    assert main(["verify", f"s3://{BUCKET}/dups/demo/{res.label}"]) == 0


def _dup_cfg(tmp: Path, root: str | None = None):
    # the same 2 scenes x 2 questions twice: inputs 4..7 repeat 0..3, in other shards of 3
    cfg = make_config(tmp, [scenes_input(2), scenes_input(2)], output={"shard_size": 3})
    if root:
        cfg.output.root = root
    return cfg
