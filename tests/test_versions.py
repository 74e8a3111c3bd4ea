"""Dataset versions: layout, identity, no-op reruns, regenerate, verify, diff, and the data card
(figures checked against manifest, index and rejects; data_cards/ kept equal to a fresh run)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from counterfactory import card as card_mod
from counterfactory import versions as V
from counterfactory.cli import main
from counterfactory.diff import diff
from counterfactory.pipeline.config import load_config
from counterfactory.pipeline.runner import run_pipeline
from counterfactory.regenerate import regenerate
from counterfactory.spec import build_spec, spec_id
from tests.conftest import DEMO, REPO, make_config, save, scenes_input, square_line, square_scene

DATA_CARDS = REPO / "data_cards"


def _cfg(tmp: Path, **over):
    # 12 samples in shards of 5; (a multiple of shard_size loses the last index row: writer bug)
    return make_config(tmp, [scenes_input(6)], output={"shard_size": 5}, **over)


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    """v1 of a small procedural dataset, then v2 with one changed parameter."""
    tmp = tmp_path_factory.mktemp("versions")
    first = run_pipeline(_cfg(tmp), local=True, command="counterfactory run test.yaml")
    cfg2 = _cfg(tmp)
    cfg2.stage("edit").set_params(inpaint_radius=7)
    second = run_pipeline(cfg2, local=True)
    return tmp / "out", first, second


def test_layout_labels_latest_and_ids(ds):
    root, first, second = ds
    d = root / "demo"
    assert first.out_dir == d / "v1" and second.out_dir == d / "v2"
    assert (first.label, second.label) == ("v1", "v2")
    assert (d / "latest").read_text() == "v2\n" and V.read_latest(d) == "v2"
    info = json.loads((d / "v1" / "version.json").read_text())
    assert info["content_id"] == hashlib.sha256((d / "v1" / "manifest.json").read_bytes()).hexdigest()
    assert info["spec_id"] == first.spec_id == spec_id(info["spec"])
    assert info["spec"]["package_version"] and info["spec"]["input_set_hash"]
    assert info["parent"] is None and json.loads((d / "v2" / "version.json").read_text())["parent"] == "v1"
    assert first.spec_id != second.spec_id
    assert not list((d / "v1").glob(".*")), "temporary files left in a version"
    assert [v.status() for v in V.list_versions(d)] == ["complete", "complete"]


def test_same_spec_again_is_a_noop(ds, tmp_path):
    root, first, _ = ds
    before = sorted(p.name for p in (root / "demo").iterdir())
    again = run_pipeline(_cfg(root.parent), local=True)
    assert again.reused and again.label == "v1" and again.out_dir == first.out_dir
    assert sorted(p.name for p in (root / "demo").iterdir()) == before
    assert (root / "demo" / "latest").read_text() == "v2\n"  # a no-op moves nothing


def test_versions_table(ds, capsys):
    root, *_ = ds
    assert main(["versions", str(root / "demo")]) == 0
    out = capsys.readouterr().out
    assert "v1" in out and "v2 (latest)" in out and out.count("complete") == 2
    for col in ("label", "spec id", "content id", "date", "samples", "rejects", "status"):
        assert col in out


def test_regenerate_gives_the_same_content_id(ds, capsys):
    root, first, _ = ds
    assert main(["regenerate", "demo@v1", "--root", str(root), "--local", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "identical" in out and first.content_id[:12] in out


def test_regenerate_does_not_call_a_damaged_copy_identical(ds, tmp_path, capsys):
    """The spec still regenerates the recorded content id, but the stored shard no longer holds
    it: regenerate says the copy is damaged and exits 1."""
    root, first, _ = ds
    copy = _copy_dataset(root / "demo", tmp_path)
    shard = copy / "demo" / "v1" / first.manifest["shards"][0]["name"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    assert main(["regenerate", "demo@v1", "--root", str(copy), "--local"]) == 1
    out = capsys.readouterr().out
    assert "the stored copy is damaged" in out and shard.name in out and "identical:" not in out


def test_regenerate_reports_differing_shards_and_samples(ds, tmp_path):
    root, first, _ = ds
    copy = tmp_path / "copy" / "demo"
    shutil.copytree(root / "demo" / "v1", copy / "v1")
    (copy / "latest").write_text("v1\n")
    # pretend the stored version was made with another inpaint radius: bytes must differ
    cfg = (copy / "v1" / "config.yaml").read_text().replace("inpaint_radius: 5", "inpaint_radius: 9")
    (copy / "v1" / "config.yaml").write_text(cfg)
    rep = regenerate(V.locate("demo@v1", tmp_path / "copy"), tmp_path / "scratch", local=True)
    assert not rep["identical"]
    assert rep["shards"] and set(rep["shards"]) <= {s["name"] for s in first.manifest["shards"]}
    keys = {r["key"] for d in (first.out_dir, Path(rep["scratch"]))
            for r in pq.read_table(d / "index.parquet").to_pylist()}
    assert rep["samples"] and set(rep["samples"]) <= keys


def _copy_dataset(src: Path, dst_root: Path) -> Path:
    shutil.copytree(src, dst_root / "demo")
    return dst_root


def test_verify_ok_then_flipped_byte_names_the_shard(ds, tmp_path, capsys):
    root, first, _ = ds
    assert main(["verify", "demo@v1", "--root", str(root)]) == 0
    assert "ok" in capsys.readouterr().out
    copy = _copy_dataset(root / "demo", tmp_path)
    shard = first.manifest["shards"][1]["name"]
    p = copy / "demo" / "v1" / shard
    data = bytearray(p.read_bytes())
    data[len(data) // 3] ^= 0x01
    p.write_bytes(bytes(data))
    assert main(["verify", "demo@v1", "--root", str(copy)]) == 1
    out = capsys.readouterr().out
    assert f"FAIL {shard}: sha256" in out
    assert [ln for ln in out.splitlines() if ln.startswith("FAIL")] == [ln for ln in out.splitlines()
                                                                       if ln.startswith(f"FAIL {shard}")]


def test_verify_fails_on_a_missing_shard(ds, tmp_path, capsys):
    root, first, _ = ds
    copy = _copy_dataset(root / "demo", tmp_path)
    shard = first.manifest["shards"][0]["name"]
    (copy / "demo" / "v1" / shard).unlink()
    assert main(["verify", str(copy / "demo") + "@v1"]) == 1
    assert f"FAIL {shard}: missing" in capsys.readouterr().out
    assert V.read_version(copy / "demo" / "v1").status().startswith("damaged")


def test_verify_names_damaged_metadata_and_stray_shards_in_one_line_each(ds, tmp_path, capsys):
    """A cut index or manifest, a shard the manifest does not list and a missing commit marker
    are each a FAIL line naming the file, never a traceback."""
    root, first, _ = ds
    cases = {
        "index": (lambda v: (v / "index.parquet").write_bytes((v / "index.parquet").read_bytes()[:200]),
                  "FAIL index.parquet: unreadable"),
        "manifest": (lambda v: (v / "manifest.json").write_bytes((v / "manifest.json").read_bytes()[:100]),
                     "FAIL manifest.json: not a manifest"),
        "stray": (lambda v: shutil.copy(v / first.manifest["shards"][0]["name"], v / "demo-000099.tar"),
                  "FAIL demo-000099.tar: a shard the manifest does not list"),
        "marker": (lambda v: (v / "version.json").unlink(), "FAIL version.json: missing"),
    }
    for name, (damage, line) in cases.items():
        copy = _copy_dataset(root / "demo", tmp_path / name)
        damage(copy / "demo" / "v1")
        assert main(["verify", "demo@v1", "--root", str(copy)]) == 1, name
        out = capsys.readouterr().out
        assert line in out and "Traceback" not in out, (name, out)
        fails = [ln for ln in out.splitlines() if ln.startswith("FAIL")]
        assert fails and all(ln.count("\n") == 0 for ln in fails)


def test_changed_config_makes_a_new_version_whose_diff_names_the_change(ds, capsys):
    root, first, second = ds
    assert main(["diff", "demo@v1", "demo@v2", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "stages.edit.params.inpaint_radius: 5 -> 7" in out
    assert re.search(r"samples: 0 added, 0 removed, \d+ changed", out)
    d = diff(V.locate("demo@v1", root), V.locate("demo@v2", root))
    assert [c["key"] for c in d["config"] if not c["placement_only"]] == ["stages.edit.params.inpaint_radius"]
    assert d["samples"]["changed"] and not d["samples"]["added"]
    card = json.loads((second.out_dir / "card.json").read_text())
    assert card["parent"] == "v1" and card["changes"]["config"][0]["key"] == "stages.edit.params.inpaint_radius"
    readme = (second.out_dir / "README.md").read_text()
    assert "Parent: v1." in readme and "`stages.edit.params.inpaint_radius`: 5 → 7" in readme


def test_diff_reports_added_and_removed_samples(ds, tmp_path):
    root, *_ = ds
    cfg = make_config(tmp_path, [scenes_input(4)], output={"shard_size": 5})
    small = run_pipeline(cfg, local=True)
    d = diff(V.locate("demo@v1", root), V.read_version(small.out_dir))
    assert d["counts"]["inputs"]["delta"] == -4 and len(d["samples"]["removed"]) == d["counts"]["samples"]["a"] - d["counts"]["samples"]["b"]
    assert not d["samples"]["added"]


def test_card_figures_match_manifest_index_and_rejects(ds):
    _, first, _ = ds
    out = first.out_dir
    card = json.loads((out / "card.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    index = pq.read_table(out / "index.parquet").to_pylist()
    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    c = card["counts"]
    m = manifest["counts"]
    assert c["samples"] == m["samples"] == len(index)
    assert c["inputs"] == m["inputs"] and c["shards"] == len(manifest["shards"])
    assert c["rejected_inputs"] == m["rejected_inputs"] == sum(r["variant"] is None for r in rejects)
    assert c["rejected_variants"] == m["rejected_variants"]
    assert c["variants"] == m["variants"] and c["question_kinds"] == m["question_kinds"]
    assert c["questions"] == sum(len(r["questions"]) for r in index)
    for kind, per in c["by_kind_and_variant"].items():
        assert per["orig"] == m["question_kinds"][kind]
    # the yield of every filter: what enters a stage is what passed the previous one
    f = card["filters"]
    assert f[0]["entered"] == m["inputs"] and f[-1]["passed"] == m["samples"]
    assert all(a["passed"] == b["entered"] for a, b in zip(f, f[1:], strict=False))
    assert sum(x["rejected"] for x in f) == m["rejected_inputs"]
    by_reason = {(r["stage"], r["reason"]): r["count"] for r in manifest["rejects"] if r["scope"] == "input"}
    assert {(x["stage"], k): n for x in f for k, n in x["reasons"].items()} == by_reason
    assert sum(r["count"] for r in card["variant_rejects"]) == m["rejected_variants"]
    assert card["histograms"]["mask_area_frac"]["n"] == len(index)
    assert sum(card["histograms"]["mask_area_frac"]["counts"]) == len(index)
    assert card["seed"] == 0 and card["spec_id"] == first.spec_id and card["content_id"] == first.content_id
    assert card["regenerate"][0].startswith("counterfactory run test.yaml")
    assert any("counterfactory regenerate demo@v1" in x for x in card["regenerate"])
    readme = (out / "README.md").read_text()
    assert readme.startswith("---\npretty_name: demo v1\n")
    assert f"| {m['inputs']} | {m['samples']} | {c['questions']} | {m['rejected_inputs']} |" in readme
    for png in card["plots"]:
        data = (out / png).read_bytes()
        assert data.startswith(b"\x89PNG") and b"matplotlib" not in data.lower()


def test_plots_are_deterministic(ds):
    _, first, _ = ds
    card = json.loads((first.out_dir / "card.json").read_text())
    assert card_mod.render_plots(card) == card_mod.render_plots(card)


def test_card_command_prints_the_card(ds, capsys):
    root, *_ = ds
    assert main(["card", "demo", "--root", str(root)]) == 0  # latest
    assert "# demo v2" in capsys.readouterr().out
    assert main(["card", str(root / "demo") + "@v1"]) == 0
    assert "# demo v1" in capsys.readouterr().out
    assert main(["card", "demo@v9", "--root", str(root)]) == 2
    assert "no version v9" in capsys.readouterr().err


def test_input_set_hash_follows_source_bytes(tmp_path):
    img = save(square_scene(), tmp_path / "a.png")
    (tmp_path / "m.jsonl").write_text(json.dumps(square_line(str(img))) + "\n")
    cfg = make_config(tmp_path, [{"kind": "manifest", "path": str(tmp_path / "m.jsonl")}])
    from counterfactory.pipeline.inputs import plan_inputs

    cache = tmp_path / "cache.json"
    s1, h1 = build_spec(cfg, plan_inputs(cfg), None, cache)
    assert h1[str(img)] == hashlib.sha256(img.read_bytes()).hexdigest()
    s1b, _ = build_spec(cfg, plan_inputs(cfg), None, cache)  # from the stat-keyed cache
    assert spec_id(s1) == spec_id(s1b)
    save(square_scene(seed=1), img)
    os.utime(img, ns=(1, 1))  # a new mtime as well as new bytes
    s2, _ = build_spec(cfg, plan_inputs(cfg), None, cache)
    assert s2["input_set_hash"] != s1["input_set_hash"] and spec_id(s2) != spec_id(s1)
    s3, _ = build_spec(cfg, plan_inputs(cfg), 0, cache)
    assert spec_id(s3) != spec_id(s2)  # --limit is part of the spec


def test_flat_layout_is_migrated_to_v1(ds, tmp_path):
    root, first, _ = ds
    flat = tmp_path / "out" / "demo"
    shutil.copytree(first.out_dir, flat)
    (flat / "version.json").unlink()
    res = run_pipeline(_cfg(tmp_path), local=True)
    assert (flat / "v1" / "manifest.json").exists() and res.label == "v2" and not res.reused
    assert V.read_version(flat / "v1").info["content_id"] == first.content_id


def _normalize_card(text: str, root: Path) -> str:
    text = text.replace(str(root), "outputs")
    # wall time and seconds per stage differ per run: mask the numbers of that one section
    head, sep, rest = text.partition("## Time per stage")
    body, sep2, tail = rest.partition("\n## ")
    body = re.sub(r"\| ([a-z_]+) \| [0-9.]+ \|", r"| \1 | … |", body)
    return head + sep + body + sep2 + tail


def test_data_cards_demo_is_up_to_date(tmp_path):
    """data_cards/demo is the card of `make demo`'s dataset; regenerate it with
    UPDATE_DATA_CARDS=1 pytest tests/test_versions.py -k data_cards"""
    cfg = load_config(DEMO, [f"output.root={tmp_path / 'out'}"])
    res = run_pipeline(cfg, local=True, command="counterfactory run configs/demo.yaml")
    root = tmp_path / "out"
    readme = _normalize_card((res.out_dir / "README.md").read_text(), root)
    card = json.loads(_normalize_card((res.out_dir / "card.json").read_text(), root))
    card.pop("timing")
    card_text = json.dumps(card, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    want = {DATA_CARDS / "TEMPLATE.md": card_mod.CARD_TEMPLATE, DATA_CARDS / "demo" / "README.md": readme,
            DATA_CARDS / "demo" / "card.json": card_text}
    if os.environ.get("UPDATE_DATA_CARDS"):
        (DATA_CARDS / "demo" / "plots").mkdir(parents=True, exist_ok=True)
        for p, text in want.items():
            p.write_text(text)
        for png in ("mask_area.png", "metrics.png"):
            shutil.copy(res.out_dir / "plots" / png, DATA_CARDS / "demo" / "plots" / png)
    for p, text in want.items():
        assert p.exists(), f"{p} missing: run UPDATE_DATA_CARDS=1 pytest tests/test_versions.py -k data_cards"
        assert p.read_text() == text, f"{p} is stale: run UPDATE_DATA_CARDS=1 pytest tests/test_versions.py -k data_cards"


def test_one_rule_for_what_changes_no_byte():
    """The config hash, the spec id and diff share ``spec.OUTPUT_NEUTRAL``: a change of Ray
    placement, stage resources, output root or failure budget is neutral in all three."""
    import copy

    from counterfactory.diff import config_changes
    from counterfactory.spec import config_hash, spec_config

    a = {"seed": 0, "ray": {"address": None}, "failure_budget": {"max_reject_share": None},
         "output": {"root": "a", "shard_size": 16},
         "stages": [{"name": "edit", "resources": {"num_cpus": 1}, "params": {"radius": 3}}]}
    b = copy.deepcopy(a)
    b["ray"]["address"] = "auto"
    b["failure_budget"]["max_reject_share"] = 0.5
    b["output"]["root"] = "b"
    b["stages"][0]["resources"]["num_cpus"] = 2
    changes = config_changes(a, b)
    assert len(changes) == 4 and all(c["placement_only"] for c in changes), changes
    assert spec_config(a) == spec_config(b) and config_hash(a) == config_hash(b)
    b["stages"][0]["params"]["radius"] = 4
    real = [c for c in config_changes(a, b) if not c["placement_only"]]
    assert [c["key"] for c in real] == ["stages.edit.params.radius"] and config_hash(a) != config_hash(b)
