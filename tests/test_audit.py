"""The shortcut audit (counterfactory.audit): computed at publish into the card, card.json and the
viewer; `counterfactory audit`; `run --strict` refuses a dataset over the thresholds."""

from __future__ import annotations

import json

import numpy as np
import pytest

from counterfactory import audit, scenes
from counterfactory.cli import main
from counterfactory.pipeline.config import ConfigError, load_config
from counterfactory.pipeline.runner import run_pipeline
from tests.conftest import DEMO, make_config, scenes_input

ALL = ["remove", "blackout", "random_mask", "attribute", "flip", "count", "insert", "swap"]


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("audit")
    cfg = make_config(tmp, [scenes_input(14, seed=3, questions=2)])
    cfg.stage("edit").set_params(variants=ALL)
    res = run_pipeline(cfg, local=True)
    return cfg, res


def test_the_card_carries_the_audit(published):
    cfg, res = published
    card = json.loads((res.out_dir / "card.json").read_text())
    a = card["audit"]
    assert a["format"] == audit.FORMAT and a["sample"]["audited"] == card["counts"]["samples"]
    assert "seconds" not in a["cost"] and card["timing"]["audit_seconds"] >= 0  # the rest is reproducible
    d = a["detectability"]
    # a flat black patch is what the probe must find, and its heat map must find where
    assert d["blackout"]["auc"] >= 0.9
    h = d["blackout"]["heatmap"]
    assert h["top_window_hit_rate"] > 2 * h["chance_hit_rate"]
    assert "heatmap" not in d["flip"]  # a mirror has no footprint to find
    # blind answerers: the original's answer is always right on the control, never on blackout's
    # hidden evidence
    assert a["blind"]["random_mask"]["original_answer"] == 1.0
    assert a["blind"]["orig"]["original_answer"] == 1.0
    assert 0 <= a["blind"]["remove"]["text_only"] <= 1
    # label balance from the index: rows per variant as the card counts them
    for v in card["counts"]["variants"]:
        assert a["balance"][v]["rows"] == sum(card["counts"]["by_kind_and_variant"][k].get(v, 0)
                                              for k in card["counts"]["by_kind_and_variant"])
    assert a["balance"]["blackout"]["abstain_share"] > 0.5
    p = a["presupposition"]
    assert (p["on_original"], p["answered_on_absent"], p["orig_abstain_on_present"]) == (0, 0, 0)
    assert p["abstained_on_absent"] > 0  # remove's color/position questions: the DeFacto rule
    readme = (res.out_dir / "README.md").read_text()
    assert "## Shortcut audit" in readme and f"| blackout | {d['blackout']['auc']:.2f} |" in readme
    assert "## Inputs and what their annotations assert" in readme
    assert card["inputs"] == [{"input": 0, "kind": "procedural", "source": "14 generated",
                               "exhaustive": "every category (all objects of a scene are annotated)"}]


def test_the_audit_is_deterministic(published):
    _, res = published
    a = audit.audit_version(res.out_dir)  # the card's was computed in the staging folder, at publish
    a["cost"].pop("seconds")
    a["cost"].pop("stream_seconds")
    assert a == json.loads((res.out_dir / "card.json").read_text())["audit"]


def test_sampling_caps_the_cost(published):
    _, res = published
    a = audit.audit_version(res.out_dir, {"sample_pairs": 8})
    # a hash sample (issue 27: decided per key, in the stream): 8 of the inputs in expectation
    from counterfactory.audit_features import AuditSample
    from counterfactory.storage import read_parquet

    keys = read_parquet(res.out_dir / "index.parquet", ["key"]).column("key").to_pylist()
    rule = AuditSample(0, 8, a["sample"]["inputs"], 8, "unknown")
    n = sum(rule.wants(k) for k in keys)
    assert a["sample"]["audited"] == n < len(keys) and a["cost"]["images_decoded"] <= n * (1 + len(ALL))
    assert a["balance"] == json.loads((res.out_dir / "card.json").read_text())["audit"]["balance"]  # all rows


def test_the_viewer_shows_the_audit_escaped(published):
    from counterfactory import versions, viewer

    _, res = published
    page = viewer.build_viewer(versions.read_version(res.out_dir), max_samples=4).read_text()
    assert '<section id="audit"><h2>Shortcut audit</h2>' in page and "<td>blackout</td>" in page
    html = viewer.audit_html({"warnings": ["<script>x</script>"], "detectability": {}, "blind": {}})
    assert "<script>x" not in html and "&lt;script&gt;x&lt;/script&gt;" in html


def test_the_probe_sees_a_flat_patch_and_not_an_untouched_copy():
    rng = np.random.default_rng(0)
    patched, copies = [], []
    for i in range(16):
        img = scenes.render_scene(scenes.scene_spec(7, i, (128, 128)))
        cf = img.copy()
        y, x = (int(v) for v in rng.integers(8, 80, 2))
        cf[y:y + 30, x:x + 30] = 0
        mask = np.zeros((128, 128), np.float32)
        mask[y:y + 30, x:x + 30] = 1
        ow, cw = audit.window_features(img, 8), audit.window_features(cf, 8)
        cover = audit._cells(mask, 8).reshape(-1)
        patched.append({"orig_img": audit.image_features(ow), "cf_img": audit.image_features(cw),
                        "orig_win": ow, "cf_win": cw, "cover": cover})
        copies.append({"orig_img": audit.image_features(ow), "cf_img": audit.image_features(ow),
                       "orig_win": ow, "cf_win": ow, "cover": cover})
    p = audit._probe(patched, 4, 8)
    assert p["auc"] >= 0.95 and p["heatmap"]["top_window_hit_rate"] >= 0.8
    assert audit._probe(copies, 4, 8)["auc"] <= 0.6
    assert audit._probe(patched[:3], 4, 8)["auc"] is None  # too few pairs: no figure, not a guess


def test_presupposing_questions_are_found():
    """The shape of the old data: a color question about the inserted star, "unknown" on the
    original; and a color question answered on the remove variant."""
    doc = {"targets": ["cup"], "variants": ["remove", "insert"],
           "edits": {"remove": {"affects": ["cup"], "region": "evidence"},
                     "insert": {"affects": ["star"], "inserted_category": "star", "region": "inserted"}},
           "qa": [{"question": "What color is the star?", "kind": "color", "targets": ["star"],
                   "answers": {"orig": "unknown", "remove": "unknown", "insert": "red"}},
                  {"question": "What color is the cup?", "kind": "color", "targets": ["cup"],
                   "answers": {"orig": "red", "remove": "red", "insert": "red"}},
                  {"question": "Is there a cup?", "kind": "existence", "targets": ["cup"],
                   "answers": {"orig": "unknown", "remove": "no", "insert": "yes"}}]}
    found = sorted((w, v, it["question"]) for w, v, it in audit.presupposing(doc, "unknown"))
    assert found == [("abstained_on_absent", "remove", "What color is the star?"),  # the rule: fine
                     ("answered_on_absent", "remove", "What color is the cup?"),
                     ("on_original", "orig", "What color is the star?"),
                     ("orig_abstain_on_present", "orig", "Is there a cup?")]


def test_thresholds_are_typed_config(tmp_path):
    with pytest.raises(ConfigError, match=r"audit\.max_probe_auc"):
        load_config(DEMO, ["audit.max_probe_auc=2"])
    with pytest.raises(ConfigError, match=r"audit\.bogus"):
        load_config(DEMO, ["audit.bogus=1"])
    cfg = load_config(DEMO, ["audit.sample_pairs=12"])
    assert cfg.audit.sample_pairs == 12 and not cfg.failure_budget.refuse_on_audit
    # refusing is a failure-budget setting: it changes no spec and no content id
    assert load_config(DEMO).config_hash() == load_config(DEMO, ["failure_budget.refuse_on_audit=true"]).config_hash()


def test_strict_refuses_a_dataset_over_the_thresholds(tmp_path, capsys):
    cfg_path = tmp_path / "c.yaml"
    import yaml

    data = yaml.safe_load(DEMO.read_text())
    data["inputs"] = [scenes_input(5, seed=1)]
    data["output"]["root"] = str(tmp_path / "out")
    data["audit"] = {"max_probe_auc": 0.5, "probe_exempt": []}  # blackout is always visible
    data["ray"] = {"address": None, "num_cpus": 1}
    cfg_path.write_text(yaml.safe_dump(data))
    rc = main(["run", str(cfg_path), "--strict", "--quiet"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]  # Ray logs aside
    assert rc == 3 and len(err) == 1 and "a probe on image statistics" in err[0], err
    assert err[0].endswith("nothing published (--strict)")
    ds = tmp_path / "out" / "demo"
    assert not (ds / "latest").exists() and not list(ds.glob("v[0-9]*"))
    # without --strict the same dataset is published, the warning in its card
    assert main(["run", str(cfg_path), "--quiet"]) == 0
    readme = (ds / "v1" / "README.md").read_text()
    assert "**Warnings**" in readme and "blackout: a probe on image statistics" in readme
    # the Ray path's writers computed the sample's statistics in the stream (issue 27)
    cost = json.loads((ds / "v1" / "card.json").read_text())["audit"]["cost"]
    assert cost["from_shards"] == 0 and cost["from_stream"] > 0
    capsys.readouterr()
    assert main(["audit", "demo", "--root", str(tmp_path / "out"), "--json"]) == 3  # over: scripts can gate
    got = json.loads(capsys.readouterr().out)
    assert got["warnings"] and got["format"] == audit.FORMAT
    assert main(["audit", "nope", "--root", str(tmp_path / "out")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
