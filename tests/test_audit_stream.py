"""Issue 27: the shortcut audit's image statistics are computed in the stream, by the shard
writers, for a hash sample of the keys; at publish the audit only fits. Pinned here: the
features from the stream equal the ones recomputed from the shards, the audit at publish reads
no shard, a version without features is audited from its shards with the same numbers, resume
keeps a kept shard's features and redoes a redone shard's, and the card states the sample and
the cost."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import make_config, scenes_input

from counterfactory import audit, audit_features, shards
from counterfactory.audit_features import AuditSample, key_hash, read_features, sample_cut
from counterfactory.layout import AUDIT_DIR
from counterfactory.pipeline import writer as writer_mod
from counterfactory.pipeline.runner import run_pipeline
from counterfactory.versions import read_version


def _cfg(tmp_path, name: str, count: int = 10, **audit_settings):
    cfg = make_config(tmp_path / name, [scenes_input(count, seed=3, questions=2)])
    cfg.stage("edit").set_params(variants=["remove", "blackout", "random_mask", "insert"])
    cfg.output.shard_size = 3
    for k, v in audit_settings.items():
        setattr(cfg.audit, k, v)
    return cfg


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    return run_pipeline(_cfg(tmp_path_factory.mktemp("stream"), "a"), local=True, progress=False)


def _sample_of(vdir) -> AuditSample:
    a = json.loads((vdir / "card.json").read_text())["audit"]
    return AuditSample(seed=0, sample_pairs=a["thresholds"]["sample_pairs"], n_inputs=a["sample"]["inputs"],
                       grid=a["thresholds"]["grid"], abstain="unknown")


def _same_records(a: list[dict], b: list[dict]) -> None:
    assert [r["key"] for r in a] == [r["key"] for r in b] and a
    for x, y in zip(a, b, strict=True):
        assert {k: x[k] for k in ("exhaustive", "presupposition", "examples", "images")} == \
               {k: y[k] for k in ("exhaustive", "presupposition", "examples", "images")}
        assert x["orig_win"].dtype == np.float32 and np.array_equal(x["orig_win"], y["orig_win"])
        assert [p["v"] for p in x["pairs"]] == [p["v"] for p in y["pairs"]]
        for p, q in zip(x["pairs"], y["pairs"], strict=True):
            assert np.array_equal(p["cf_win"], q["cf_win"])
            assert (p["cover"] is None) == (q["cover"] is None)
            assert p["cover"] is None or np.array_equal(p["cover"], q["cover"])


def _without_cost(a: dict) -> dict:
    return {k: v for k, v in a.items() if k != "cost"}


def test_features_from_the_stream_equal_the_ones_from_the_shards(published):
    vdir = published.out_dir
    sample = _sample_of(vdir)
    names = [s["name"] for s in published.manifest["shards"]]
    with_samples = [s["name"] for s in published.manifest["shards"] if s["samples"]]
    assert sorted(p.name for p in (vdir / AUDIT_DIR).glob("*.npz")) == sorted(
        n.replace(".tar", ".npz") for n in with_samples)  # every sample is audited here (10 < 256)
    for name in names:
        got = read_features(vdir, name, sample)
        if got is None:
            continue
        keys = {r["key"] for r in got[0]}
        _same_records(got[0], audit._records_from_shards(vdir, {name: keys}, sample))
    # float32 storage loses nothing: the statistics are float32 arithmetic
    img = np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    w = audit_features.window_features(img, 8)
    assert np.array_equal(w.astype(np.float32).astype(np.float64), w)
    streamed = audit.audit_version(vdir)
    recomputed = audit.audit_version(vdir, from_shards=True)
    assert _without_cost(streamed) == _without_cost(recomputed)
    n = streamed["sample"]["audited"]
    assert n == published.manifest["counts"]["samples"]
    assert (streamed["cost"]["from_stream"], streamed["cost"]["from_shards"]) == (n, 0)
    assert (recomputed["cost"]["from_stream"], recomputed["cost"]["from_shards"]) == (0, n)
    assert streamed["cost"]["images_decoded"] == recomputed["cost"]["images_decoded"] > n
    # the card's audit is the streamed one; features sit outside the manifest (no content id moves)
    card = json.loads((vdir / "card.json").read_text())
    assert _without_cost(card["audit"]) == _without_cost(streamed)
    assert not [f for f in published.manifest["files"] if f.startswith(AUDIT_DIR)]
    from counterfactory.verify import verify

    assert all(c.ok for c in verify(read_version(vdir)))


def test_the_audit_at_publish_reads_no_shard(published, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a shard was read")

    monkeypatch.setattr(shards, "read_shard", refuse)
    a = audit.audit_version(published.out_dir)
    assert a["sample"]["audited"] == published.manifest["counts"]["samples"]
    with pytest.raises(AssertionError, match="a shard was read"):
        audit.audit_version(published.out_dir, from_shards=True)


def test_a_version_without_features_is_audited_from_its_shards(published, tmp_path):
    old = tmp_path / "v1"
    shutil.copytree(published.out_dir, old)
    shutil.rmtree(old / AUDIT_DIR)  # a version written before the features were computed in the stream
    a, b = audit.audit_version(published.out_dir), audit.audit_version(old)
    assert _without_cost(a) == _without_cost(b) and b["cost"]["from_shards"] == b["sample"]["audited"]
    # a damaged features file is never trusted: that shard alone is read back
    first = sorted((published.out_dir / AUDIT_DIR).glob("*.npz"))[0]
    shutil.copytree(published.out_dir / AUDIT_DIR, old / AUDIT_DIR)
    (old / AUDIT_DIR / first.name).write_bytes(b"not an npz")
    c = audit.audit_version(old)
    assert _without_cost(c) == _without_cost(a) and 0 < c["cost"]["from_shards"] < c["sample"]["audited"]


def test_the_sample_is_a_hash_cut_on_the_key():
    keys = [f"k{i:05d}" for i in range(20000)]
    s = AuditSample(seed=0, sample_pairs=256, n_inputs=1000, grid=8, abstain="unknown")
    got = [k for k in keys if s.wants(k)]
    expect = 20000 * 256 / 1000
    assert abs(len(got) - expect) < 4 * np.sqrt(expect)  # a binomial draw around the expected size
    assert got == [k for k in keys if key_hash(0, k) < sample_cut(256, 1000)]  # per key, no other key needed
    assert [k for k in keys if AuditSample(1, 256, 1000, 8, "unknown").wants(k)] != got  # the seed moves it
    assert sample_cut(256, 200) == 1 << 64 and all(AuditSample(0, 256, 200, 8, "unknown").wants(k) for k in keys[:50])
    assert sample_cut(0, 200) == 0 and not AuditSample(0, 0, 200, 8, "unknown").wants("k1")


def test_other_settings_than_the_run_s_read_the_shards(published):
    """``audit DATASET --sample_pairs 4``: the run's features were made under another cut, so the
    keys under the new cut are computed from the shards."""
    vdir = published.out_dir
    a = audit.audit_version(vdir, {"sample_pairs": 4})
    s = AuditSample(0, 4, published.manifest["counts"]["inputs"], 8, "unknown")
    keys = [r["key"] for r in read_features_all(vdir, _sample_of(vdir))]
    assert a["sample"]["audited"] == sum(s.wants(k) for k in keys) < len(keys)
    assert a["cost"]["from_shards"] == a["sample"]["audited"] and a["sample"]["expected"] == 4


def read_features_all(vdir, sample):
    out = []
    for p in sorted((vdir / AUDIT_DIR).glob("*.npz")):
        out += read_features(vdir, p.stem + ".tar", sample)[0]
    return out


class Killed(BaseException):
    pass


def test_resume_keeps_a_kept_shard_s_features_and_redoes_a_redone_one(tmp_path, monkeypatch):
    ref = run_pipeline(_cfg(tmp_path, "ref"), local=True, progress=False)
    cfg = _cfg(tmp_path, "run")
    real = writer_mod.DatasetCommit.on_write_result
    calls = {"n": 0}

    def on_write_result(self, entry):
        real(self, entry)
        calls["n"] += 1
        if calls["n"] == 3:
            raise Killed()

    with monkeypatch.context() as m:
        m.setattr(writer_mod.DatasetCommit, "on_write_result", on_write_result)
        with pytest.raises(Killed):
            run_pipeline(cfg, local=True, progress=False)
    ds = cfg.path(cfg.output.root) / cfg.dataset
    (staging,) = [p for p in ds.iterdir() if p.name.startswith(".staging-")]
    feats = {p.name: p.read_bytes() for p in (staging / AUDIT_DIR).glob("demo-*.npz")}
    assert sorted(feats) == ["demo-000000.npz", "demo-000001.npz", "demo-000002.npz"]
    shard = staging / "demo-000001.tar"
    shard.write_bytes(shard.read_bytes()[:-10] + b"x" * 10)  # same size, other bytes: shard 1 is redone
    (staging / AUDIT_DIR / "demo-000001.npz").write_bytes(b"stale")
    res = run_pipeline(cfg, local=True, progress=False)
    out = res.out_dir / AUDIT_DIR
    assert (out / "demo-000000.npz").read_bytes() == feats["demo-000000.npz"]  # kept with its shard
    assert (out / "demo-000002.npz").read_bytes() == feats["demo-000002.npz"]
    assert (out / "demo-000001.npz").read_bytes() != b"stale"  # written again with its shard
    sample = _sample_of(res.out_dir)
    for sh in ref.manifest["shards"]:
        mine, theirs = read_features(res.out_dir, sh["name"], sample), read_features(ref.out_dir, sh["name"], sample)
        assert (mine is None) == (theirs is None) == (sh["samples"] == 0)
        if mine is not None:
            _same_records(mine[0], theirs[0])
    a = json.loads((res.out_dir / "card.json").read_text())["audit"]
    assert a["cost"]["from_stream"] == a["sample"]["audited"] and a["cost"]["from_shards"] == 0
    assert _without_cost(a) == _without_cost(json.loads((ref.out_dir / "card.json").read_text())["audit"])


def test_the_card_states_the_sample_and_the_cost(published):
    vdir = published.out_dir
    card = json.loads((vdir / "card.json").read_text())
    a = card["audit"]
    n = published.manifest["counts"]["inputs"]  # every input sampled: fewer than sample_pairs
    assert a["sample"]["expected"] == a["sample"]["inputs"] == n
    assert card["timing"]["audit_stream_seconds"] > 0 and card["timing"]["audit_seconds"] > 0
    readme = (vdir / "README.md").read_text()
    assert (f"Audited {a['sample']['audited']} of {a['sample']['samples']} samples: a hash sample (seed 0) of "
            f"expected size {n} of {n} inputs") in readme
    assert f"({a['sample']['audited']} samples' statistics computed in the stream, 0 read back from the shards)" in readme
    assert "| audit_in_stream | " in readme and "| audit | " in readme


def test_audit_off_computes_no_features(tmp_path):
    res = run_pipeline(_cfg(tmp_path, "off", count=4, sample_pairs=0), local=True, progress=False)
    assert not (res.out_dir / AUDIT_DIR).exists()
    assert json.loads((res.out_dir / "card.json").read_text())["audit"] is None
