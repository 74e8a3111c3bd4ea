"""The evaluator on hand-computed predictions files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from counterfactory.evaluate import (
    evaluate,
    export_questions,
    is_abstention,
    normalize,
    report_table,
)
from counterfactory.index import answers_of
from counterfactory.pipeline.runner import run_pipeline
from tests.conftest import make_config, scenes_input


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("eval")
    cfg = make_config(tmp, [scenes_input(4, seed=2, questions=1)])
    cfg.stage("edit").set_params(variants=["remove", "blackout", "random_mask"])
    return run_pipeline(cfg, local=True).out_dir


def _export(dataset: Path, tmp_path: Path) -> list[dict]:
    out = tmp_path / "ask.jsonl"
    n = export_questions(dataset, out)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert n == len(rows) > 0
    return rows


def _truth(dataset: Path) -> dict:
    import pyarrow.parquet as pq

    t = {}
    for r in pq.read_table(dataset / "index.parquet").to_pylist():
        for qid, ans in enumerate(answers_of(r["answers"])):
            for v, a in ans.items():
                t[(r["key"], v, qid)] = a
    return t


def _write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_normalization_and_abstention():
    assert normalize("Two.") == "2" and normalize("Yes!") == "yes" and normalize("The cat") == "cat"
    assert is_abstention("Unknown") and is_abstention("I don't know") and is_abstention("cannot be determined")
    # the substring trap: "no" is inside these, none of them abstains
    assert not is_abstention("no") and not is_abstention("I know") and not is_abstention("nothing") \
        and not is_abstention("north")


def test_export_covers_every_variant_question(dataset, tmp_path):
    rows = _export(dataset, tmp_path)
    truth = _truth(dataset)
    assert {(r["key"], r["variant"], r["qid"]) for r in rows} == set(truth)
    assert all(r["member"] == f"{r['key']}.{r['variant']}.jpg" for r in rows)


def test_oracle_scores_perfectly(dataset, tmp_path):
    truth = _truth(dataset)
    preds = _write(tmp_path / "p.jsonl", [{"key": k, "variant": v, "qid": q, "answer": a}
                                          for (k, v, q), a in truth.items()])
    rep = evaluate(dataset, preds)
    assert rep["answered"] == rep["questions"] == len(truth)
    assert set(rep["accuracy"].values()) == {1.0}
    assert set(rep["pair_consistency"].values()) == {1.0}
    assert rep["beaf"]["TU"] == 1.0 and rep["beaf"]["IG"] == 0.0 and rep["beaf"]["SB"] == 0.0
    assert rep["defacto"]["abstention_rate_on_counterfactuals"] == 1.0
    assert rep["defacto"]["wrong_abstention_on_controls"] == 0.0
    assert "BEAF" in report_table(rep)


def test_language_prior_model_is_stubborn(dataset, tmp_path):
    """A 'blind' model that answers every question as on the original: right on originals and
    controls, wrong wherever the answer changed (stubbornness 100%), never abstains."""
    truth = _truth(dataset)
    preds = _write(tmp_path / "p.jsonl", [{"key": k, "variant": v, "qid": q, "answer": truth[(k, "orig", q)]}
                                          for (k, v, q) in truth])
    rep = evaluate(dataset, preds)
    assert rep["accuracy"]["orig"] == 1.0 and rep["accuracy"]["random_mask"] == 1.0
    assert rep["accuracy"]["remove"] == 0.0 and rep["accuracy"]["blackout"] == 0.0
    assert rep["beaf"]["SB"] == 1.0 and rep["beaf"]["TU"] == 0.0
    assert rep["beaf"]["ID"] is None  # every counterfactual here changes its answer
    assert rep["defacto"]["abstention_rate_on_counterfactuals"] == 0.0


def test_hand_computed_mix(dataset, tmp_path):
    """Two samples' worth of hand-picked answers, every figure worked out by hand."""
    import pyarrow.parquet as pq

    truth = _truth(dataset)
    rows = pq.read_table(dataset / "index.parquet").to_pylist()
    # a sample whose first question is existence or count: "remove" answers it ("no"/"0")
    key = next(r["key"] for r in rows if r["question_kinds"][0] in ("existence", "count"))
    t = {v: truth[(key, v, 0)] for v in ("orig", "remove", "blackout", "random_mask") if (key, v, 0) in truth}
    assert t["blackout"] == "unknown" and t["random_mask"] == t["orig"] != t["remove"]
    preds = _write(tmp_path / "p.jsonl", [
        {"key": key, "variant": "orig", "qid": 0, "answer": t["orig"]},             # right
        {"key": key, "variant": "remove", "qid": 0, "answer": t["orig"]},           # stubborn
        {"key": key, "variant": "blackout", "qid": 0, "answer": "can't tell"},      # right abstention
        {"key": key, "variant": "random_mask", "qid": 0, "answer": "unknown"},      # wrong abstention
        {"key": "nope", "variant": "orig", "qid": 0, "answer": "x"},                # unknown question
        "not json",
    ])
    rep = evaluate(dataset, preds)
    assert rep["answered"] == 4 and len(rep["problems"]) == 2
    assert rep["accuracy"] == {"blackout": 1.0, "orig": 1.0, "random_mask": 0.0, "remove": 0.0}
    assert rep["pair_consistency"] == {"blackout": 1.0, "random_mask": 0.0, "remove": 0.0}
    # changed pairs: remove (stubborn: same answer, wrong after) and blackout (right on both)
    assert rep["beaf"] == {"TU": 0.5, "IG": 0.0, "SB": 0.5, "ID": None, "pairs_changed": 2, "pairs_unchanged": 0}
    assert rep["defacto"] == {"abstention_rate_on_counterfactuals": 1.0, "wrong_abstention_on_controls": 1.0}


def test_cli_export_then_eval(dataset, tmp_path, capsys):
    from counterfactory.cli import main

    ask = tmp_path / "ask.jsonl"
    assert main(["eval", str(dataset), "--export", str(ask)]) == 0
    rows = [json.loads(x) for x in ask.read_text().splitlines()]
    preds = _write(tmp_path / "pred.jsonl", [dict(r, answer="yes") for r in rows])
    assert main(["eval", str(dataset), "--predictions", str(preds)]) == 0
    out = capsys.readouterr().out
    assert "pair-consistency" in out and "BEAF" in out
    rep = json.loads((tmp_path / "pred.report.json").read_text())
    assert rep["answered"] == len(rows)
    assert main(["eval", str(dataset), "--predictions", str(tmp_path / "missing.jsonl")]) == 2


def test_bad_prediction_lines_are_counted_and_a_useless_file_is_one_line(dataset, tmp_path, capsys):
    """Not UTF-8, JSON null or a float qid, repeats and unknown questions are problem lines (all
    counted, 50 listed); a file with no usable line is an error, not an empty report."""
    from counterfactory.cli import main

    rows = _export(dataset, tmp_path)
    good = [dict(r, answer="yes") for r in rows]
    junk = [b"\xff\xfe not utf-8\n", json.dumps(dict(rows[0], answer=None)).encode() + b"\n",
            json.dumps(dict(rows[0], qid=0.5, answer="yes")).encode() + b"\n",
            json.dumps(good[0]).encode() + b"\n"]  # a repeat of the first
    junk += [json.dumps(dict(rows[0], key=f"nokey{i}", answer="no")).encode() + b"\n" for i in range(60)]
    p = tmp_path / "mixed.jsonl"
    p.write_bytes(b"".join(json.dumps(g).encode() + b"\n" for g in good) + b"".join(junk))
    rep = evaluate(dataset, p)
    assert rep["answered"] == len(rows) and rep["problem_count"] == 64 and len(rep["problems"]) == 50
    assert "not UTF-8" in rep["problems"][0] and "qid an integer" in rep["problems"][1]
    assert "the first is kept" in rep["problems"][3]
    assert "64 problem line(s)" in report_table(rep)
    csv = tmp_path / "preds.csv"
    csv.write_text("key,variant,qid,answer\nabc,orig,0,yes\n")
    assert main(["eval", str(dataset), "--predictions", str(csv)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {csv}: no usable prediction (2 problem line(s)") and "\n" not in err


def test_eval_abstains_with_the_dataset_own_answer(tmp_path, capsys):
    """A dataset made with abstain_answer 'n/a' is scored with 'n/a' unless --abstain says otherwise."""
    from counterfactory.cli import main

    cfg = make_config(tmp_path, [scenes_input(3, seed=4, questions=1)], abstain_answer="n/a")
    cfg.stage("edit").set_params(variants=["remove", "blackout"])
    ds = run_pipeline(cfg, local=True).out_dir
    truth = _truth(ds)
    assert "n/a" in truth.values()
    preds = _write(tmp_path / "p.jsonl", [{"key": k, "variant": v, "qid": q, "answer": a}
                                          for (k, v, q), a in truth.items()])
    assert main(["eval", str(ds), "--predictions", str(preds)]) == 0
    rep = json.loads((tmp_path / "p.report.json").read_text())
    assert rep["defacto"]["abstention_rate_on_counterfactuals"] == 1.0
    assert all(a == 1.0 for a in rep["accuracy"].values())
