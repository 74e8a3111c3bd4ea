"""``counterfactory eval EXPORT --predictions FILE``: each paper's headline metric on fixed answers,
equal to what that paper's own script prints for the same answers (issue 29).

The expected numbers were obtained by running, on exactly these questions and answers:
- POPE: RUCAIBox/POPE@3df3ba1 ``evaluate.py`` (``ans_file``/``label_file`` set by sed) ->
  TP 4 FP 2 TN 3 FN 1, Accuracy 0.7, Precision 0.6666666666666666, Recall 0.8,
  F1 0.7272727272727272, Yes ratio 0.6.
- BEAF: postech-ami/BEAF@41b71d5 ``beaf_metric.py`` with ``sed -e 's/26118/12/' -e 's/1727/2/g'``
  -> 66.67 | 62.50 | 83.33 | 71.43; TU 50.00 IG 0.00 SB+ 50.00 SB- 0.00 ID 75.00 F1(TU,ID) 33.33.
- DeFacto: tinnel123666888/defacto@822187d ``grpo_defacto.py`` ``accuracy_reward_text`` (the
  function taken out with ``ast`` and called on each response) -> 1, -1, -1, 1, 0, 1, -1, 1.
- CounterCurate: HanSolo9682/CounterCurate@fccfc4e ``benchmark/CLIP_test_position.py`` (CSV path
  set by sed; an ``open_clip`` stand-in whose model returns these scores) -> tensor(0.6667).
- POPEv2 publishes no scorer: pair accuracy is counted by hand below.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from counterfactory import paper_eval as P
from counterfactory.cli import main

POPE_LABELS = ["yes", "no", "yes", "no", "yes", "no", "yes", "no", "yes", "no"]
# POPE reads the first sentence's words: "Not really." is a yes ("Not" is not in its list)
POPE_ANSWERS = ["Yes, there is a cat.", "No.", "There is not a dog.", "Yes", "yes it is", "No, there is no car.",
                "Yes. No doubt.", "Not really.", "Yes", "Not sure, no."]


def export_dir(path: Path, fmt: str) -> Path:
    path.mkdir()
    (path / P.MARKER).write_text(json.dumps({"format": fmt}))
    return path


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_pope_matches_popes_evaluate(tmp_path: Path) -> None:
    ex = export_dir(tmp_path / "pope", "pope")
    q = jsonl(ex / "demo_pope_random.json", [{"question_id": i + 1, "image": "a.jpg", "text": "Is there a cat?",
                                              "label": lab} for i, lab in enumerate(POPE_LABELS)])
    a = jsonl(tmp_path / "answers.jsonl", [{"question": "q", "answer": x} for x in POPE_ANSWERS])
    rep = P.score(q, a)
    assert (rep["TP"], rep["FP"], rep["TN"], rep["FN"]) == (4, 2, 3, 1)
    assert rep["accuracy"] == pytest.approx(0.7) and rep["precision"] == pytest.approx(0.6666666666666666)
    assert rep["recall"] == pytest.approx(0.8) and rep["f1"] == pytest.approx(0.7272727272727272)
    assert rep["yes_ratio"] == pytest.approx(0.6)
    with pytest.raises(P.PaperEvalError, match="name one"):  # the folder: which setting?
        P.score(ex, a)
    with pytest.raises(P.PaperEvalError, match="9 answers for 10"):
        P.score(q, jsonl(tmp_path / "short.jsonl", [{"answer": x} for x in POPE_ANSWERS[:9]]))


def beaf_questions() -> list[dict]:
    qs = []
    for stem in ("s1", "s2"):
        for img, orig in ((f"{stem}.jpg", True), (f"{stem}_00.png", False)):
            for q, removed, before, after in (("Is there a cat in the image?", True, "yes", "no"),
                                              ("Is there a dog in the image?", False, "yes", "yes"),
                                              ("Is there a car in the image?", False, "no", "no")):
                qs.append({"id": len(qs), "image": img, "question": q, "orig_img": orig, "removed_q": removed,
                           "gt": before if orig else after})
    return qs


def test_beaf_matches_beaf_metric(tmp_path: Path) -> None:
    ex = export_dir(tmp_path / "beaf", "beaf")
    (ex / "beaf_qna.json").write_text(json.dumps(beaf_questions()))
    answers = ["Yes.", "Yes.", "No.", "No.", "No.", "Yes.",          # s1: cat TP->TN (TU), dog and car change (ID)
               "Yes.", "Yes.", "No.", "Yes.", "Yes.", "Yes, a car."]  # s2: cat TP->FP (SB+), dog same, car changes
    pred = tmp_path / "answers.json"
    pred.write_text(json.dumps([{"id": i, "answer": a} for i, a in enumerate(answers)]))
    rep = P.score(ex, pred)
    got = {k: round(rep[k], 2) for k in ("accuracy", "precision", "recall", "f1", "TU", "IG", "SBp", "SBn", "ID",
                                         "f1_tu_id")}
    assert got == {"accuracy": 66.67, "precision": 62.5, "recall": 83.33, "f1": 71.43, "TU": 50.0, "IG": 0.0,
                   "SBp": 50.0, "SBn": 0.0, "ID": 75.0, "f1_tu_id": 33.33}
    assert rep["removed_questions"] == 2 and rep["other_questions_on_edited"] == 4


def test_defacto_rewards_match_its_reward_function(tmp_path: Path) -> None:
    ex = export_dir(tmp_path / "defacto", "defacto")
    jsonl(ex / "defacto.jsonl", [{"folder": "1", "answer_original": "red"}, {"folder": "2", "answer_original": "2"}])
    cases = [("1", "original", "<think>red one</think><answer>Red</answer>", 1.0),
             ("1", "original", "<answer>unknown</answer>", -1.0),
             ("1", "rmask", "<think>I cannot see it</think><answer>blue</answer>", -1.0),  # "not" holds "no"
             ("2", "rmask", "<answer>2</answer>", 1.0),
             ("2", "original", "<answer>3</answer>", 0.0),
             ("2", "smask", "<answer>unknown</answer>", 1.0),
             ("2", "smask", "<answer>2</answer>", -1.0),
             ("1", "smask", "None visible", 1.0)]
    for folder, image, resp, reward in cases:
        sol = "red" if folder == "1" else "2"
        assert P.defacto_reward(resp, sol, P.DEFACTO_IMAGES[image]) == reward, resp
    rep = P.score(ex, jsonl(tmp_path / "r.jsonl", [{"folder": f, "image": i, "response": r} for f, i, r, _ in cases]))
    assert rep["original"] == {"answered": 3, "right_rate": pytest.approx(1 / 3), "abstention_rate": pytest.approx(1 / 3),
                               "mean_reward": pytest.approx(0.0)}
    assert rep["smask"]["right_rate"] == pytest.approx(2 / 3) and rep["smask"]["mean_reward"] == pytest.approx(1 / 3)
    assert rep["rmask"]["mean_reward"] == pytest.approx(0.0)


def test_countercurate_matches_clip_test_position(tmp_path: Path) -> None:
    ex = export_dir(tmp_path / "cc", "countercurate")
    (ex / "train_countercurate.csv").write_text(
        "captions\timages\tneg_captions\tneg_images\n" + "".join(f"c{i}\t/x/{i}.jpg\tn{i}\t/x/{i}n.jpg\n" for i in range(3)))
    scores = [[[0.9, 0.2], [0.3, 0.8]], [[0.4, 0.6], [0.3, 0.8]], [[0.7, 0.1], [0.6, 0.5]]]
    rep = P.score(ex, jsonl(tmp_path / "s.jsonl", [{"row": i, "scores": s} for i, s in enumerate(scores)]))
    assert round(rep["accuracy"], 4) == 0.6667 and rep["pair_accuracy"] == pytest.approx(1 / 3)


def test_popev2_pair_accuracy_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    ex = export_dir(tmp_path / "popev2", "popev2")
    pq.write_table(pa.Table.from_pylist([{"example_id": f"e{i}", "normal_label": "yes", "counterfactual_label": "no"}
                                         for i in range(4)]), ex / "test.parquet")
    ans = {("e0", "normal"): "Yes", ("e0", "counterfactual"): "No, there is not.",  # pair right
           ("e1", "normal"): "Yes", ("e1", "counterfactual"): "Yes",  # stubborn
           ("e2", "normal"): "No", ("e2", "counterfactual"): "No",
           ("e3", "normal"): "Yes, one."}  # half a pair: not counted as a pair
    pred = jsonl(tmp_path / "p.jsonl", [{"example_id": e, "image": i, "answer": a} for (e, i), a in ans.items()])
    rep = P.score(ex, pred)
    assert rep["pair_accuracy"] == pytest.approx(1 / 3) and rep["pairs"] == 3
    assert rep["accuracy_normal"] == pytest.approx(3 / 4) and rep["accuracy_counterfactual"] == pytest.approx(2 / 3)
    assert main(["eval", str(ex), "--predictions", str(pred)]) == 0
    assert "pair_accuracy 0.3333" in capsys.readouterr().out
    assert json.loads(pred.with_suffix(".report.json").read_text())["paper"] == "popev2"
    bad = jsonl(tmp_path / "bad.jsonl", [{"example_id": "nope", "image": "normal", "answer": "yes"}])
    assert main(["eval", str(ex), "--predictions", str(bad)]) == 2
    assert "no such example" in capsys.readouterr().err
