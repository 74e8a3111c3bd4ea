"""``counterfactory eval EXPORT --predictions FILE``: each paper's headline metric, from a
predictions file in that paper's answer format, on an export in that paper's layout (issue 29).

Each metric reads answers as the paper's own script does (so the numbers are the paper's):

- POPE (RUCAIBox/POPE ``evaluate.py``): the question file and an answer file, one JSON object per
  line with ``answer``, in the same order. An answer is "no" when its first sentence, commas
  dropped, has the word ``No``, ``no`` or ``not``; else "yes". Accuracy, precision, recall, F1,
  yes-ratio (and TP/FP/TN/FN).
- BEAF (postech-ami/BEAF ``beaf_metric.py``): ``[{"id", "answer"}]`` in ``beaf_qna.json``'s order;
  "yes" if the answer contains ``yes``, else "no" if it contains ``no``. Accuracy, precision,
  recall, F1; over removed-object questions on edited images TU, IG, SB+, SB- (and SB = their sum);
  over the other questions on edited images ID (the answer changed from the original's);
  F1(TU, ID). Percentages as the script prints them; the denominators are this export's counts,
  not BEAF's hard-coded 1,727.
- POPEv2 (no released scorer; POPE's answer reading): ``{"example_id", "image": "normal" |
  "counterfactual", "answer"}`` per line. Accuracy on each image, pair accuracy (right on both),
  and POPE's metrics over all answers.
- DeFacto (its reward, ``grpo_defacto.py`` ``accuracy_reward_text``): ``{"folder", "image":
  "original" | "smask" | "rmask", "response"}`` per line. On the masked-evidence image a response
  is right when it says ``unknown``/``no``/``none`` (DeFacto's pattern); on the others when it
  has none of them and its ``<answer>`` (or the whole response) equals ``answer.txt``. Rates per
  image: right (reward 1), abstained; and the mean reward.
- CounterCurate (its ``CLIP_test_position.py``): ``{"row", "scores": [[s(image, caption),
  s(image, neg_caption)], [s(neg_image, caption), s(neg_image, neg_caption)]]}`` per CSV row.
  Accuracy = right image-caption choices / (2 x rows), as the script; pair accuracy = both right.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from counterfactory.export_recipes import DEFACTO_NEGATIVE

MARKER = "counterfactory-export.json"  # export.MARKER (export imports pyarrow and more; not needed here)


class PaperEvalError(ValueError):
    """Predictions that cannot be scored against this export (one-line message)."""


def export_of(ref: str | Path) -> tuple[str, Path, Path] | None:
    """(format, export folder, the file or folder named) when ``ref`` is a paper-layout export or
    one of its files, else None."""
    p = Path(ref)
    folder = p if p.is_dir() else p.parent
    marker = folder / MARKER
    if not p.exists() or not marker.is_file():
        return None
    try:
        fmt = json.loads(marker.read_text()).get("format")
    except ValueError:
        return None
    from counterfactory.export_recipes import FORMATS

    return (fmt, folder, p) if fmt in FORMATS else None


def _jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as exc:
                raise PaperEvalError(f"{path}: line {i} is not JSON ({exc})") from None
    return rows


def _json_or_jsonl(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8").lstrip()
    if text.startswith("["):
        try:
            return json.loads(text)
        except ValueError as exc:
            raise PaperEvalError(f"{path}: not JSON ({exc})") from None
    return _jsonl(path)


def _field(row: dict[str, Any], name: str, path: Path) -> Any:
    if not isinstance(row, dict) or name not in row:
        raise PaperEvalError(f"{path}: a line without {name!r}: {str(row)[:80]}")
    return row[name]


def _pct(num: float, den: float) -> float | None:
    return round(100 * num / den, 4) if den else None


# -- POPE ----------------------------------------------------------------------------------------
def pope_answer(text: str) -> str:
    """POPE's reading of an answer: its first sentence, commas dropped, split on spaces."""
    text = str(text)
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_metrics(labels: list[str], answers: list[str]) -> dict[str, Any]:
    """POPE's counts and ratios (a label that is not "no" is "yes", as its script reads them)."""
    pred = [pope_answer(a) for a in answers]
    gold = ["no" if label == "no" else "yes" for label in labels]
    tp = sum(p == "yes" and g == "yes" for p, g in zip(pred, gold, strict=True))
    fp = sum(p == "yes" and g == "no" for p, g in zip(pred, gold, strict=True))
    tn = sum(p == "no" and g == "no" for p, g in zip(pred, gold, strict=True))
    fn = sum(p == "no" and g == "yes" for p, g in zip(pred, gold, strict=True))
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    f1 = (2 * precision * recall / (precision + recall)
          if precision is not None and recall is not None and precision + recall else None)
    n = len(pred)
    return {"questions": n, "TP": tp, "FP": fp, "TN": tn, "FN": fn,
            "accuracy": (tp + tn) / n if n else None, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": pred.count("yes") / n if n else None}


def score_pope(question_file: Path, predictions: Path) -> dict[str, Any]:
    labels = [_field(r, "label", question_file) for r in _jsonl(question_file)]
    answers = [_field(r, "answer", predictions) for r in _jsonl(predictions)]
    if len(answers) != len(labels):
        raise PaperEvalError(f"{predictions}: {len(answers)} answers for {len(labels)} questions in "
                             f"{question_file.name} (POPE pairs them by line)")
    return {"paper": "pope", "questions_file": str(question_file), **pope_metrics(labels, answers)}


# -- BEAF ----------------------------------------------------------------------------------------
def beaf_answer(text: str) -> str | None:
    a = str(text).lower()
    return "yes" if "yes" in a else "no" if "no" in a else None


def beaf_metrics(qna: list[dict[str, Any]], answers: list[dict[str, Any]]) -> dict[str, Any]:
    if len(answers) != len(qna):
        raise PaperEvalError(f"{len(answers)} answers for {len(qna)} BEAF questions (paired by order and id)")
    outcome: list[str | None] = []
    unreadable = 0
    for q, a in zip(qna, answers, strict=True):
        if a.get("id") != q["id"]:
            raise PaperEvalError(f"answer {a.get('id')!r} where BEAF question {q['id']} is (same order, same ids)")
        ans = beaf_answer(a.get("answer", ""))
        if ans is None:
            unreadable += 1
            outcome.append(None)
            continue
        outcome.append(("T" if ans == q["gt"] else "F") + ("P" if ans == "yes" else "N"))
    before = {(q["image"], q["question"]): o for q, o in zip(qna, outcome, strict=True) if q["orig_img"]}
    cnt = dict.fromkeys(("TP", "FP", "TN", "FN", "TU", "IG", "SBp", "SBn", "ID"), 0)
    conv = {"TPTN": "TU", "FNFP": "IG", "TPFP": "SBp", "FNTN": "SBn"}
    removed = other = 0
    for q, o in zip(qna, outcome, strict=True):
        if o is not None:
            cnt[o] += 1
        if q["orig_img"]:
            continue
        b = before.get((q["image"][:-7] + ".jpg", q["question"]))
        if q["removed_q"]:
            removed += 1
            if b is not None and o is not None and (b + o) in conv:
                cnt[conv[b + o]] += 1
        else:
            other += 1
            cnt["ID"] += b is not None and o is not None and b[0] != o[0]
    n = cnt["TP"] + cnt["FP"] + cnt["TN"] + cnt["FN"]
    precision, recall = _pct(cnt["TP"], cnt["TP"] + cnt["FP"]), _pct(cnt["TP"], cnt["TP"] + cnt["FN"])
    tu, id_ = _pct(cnt["TU"], removed), _pct(cnt["ID"], other)
    return {"paper": "beaf", "questions": len(qna), "unreadable_answers": unreadable, "counts": cnt,
            "removed_questions": removed, "other_questions_on_edited": other,
            "accuracy": _pct(cnt["TP"] + cnt["TN"], n), "precision": precision, "recall": recall,
            "f1": (round(2 * precision * recall / (precision + recall), 4)
                   if precision is not None and recall is not None and precision + recall else None),
            "TU": tu, "IG": _pct(cnt["IG"], removed), "SBp": _pct(cnt["SBp"], removed),
            "SBn": _pct(cnt["SBn"], removed), "SB": _pct(cnt["SBp"] + cnt["SBn"], removed), "ID": id_,
            "f1_tu_id": (round(2 * tu * (100 - id_) / (tu + 100 - id_), 4)
                         if tu is not None and id_ is not None and tu + 100 - id_ else None)}


def score_beaf(folder: Path, predictions: Path) -> dict[str, Any]:
    qna = json.loads((folder / "beaf_qna.json").read_text())
    return beaf_metrics(qna, _json_or_jsonl(predictions))


# -- POPEv2 --------------------------------------------------------------------------------------
def score_popev2(folder: Path, predictions: Path) -> dict[str, Any]:
    import pyarrow.parquet as pq

    rows = pq.read_table(folder / "test.parquet", columns=["example_id", "normal_label", "counterfactual_label"]
                         ).to_pylist()
    gold = {(r["example_id"], "normal"): r["normal_label"] for r in rows}
    gold |= {(r["example_id"], "counterfactual"): r["counterfactual_label"] for r in rows}
    pred: dict[tuple[str, str], str] = {}
    for r in _jsonl(predictions):
        k = (_field(r, "example_id", predictions), _field(r, "image", predictions))
        if k not in gold:
            raise PaperEvalError(f"{predictions}: no such example/image {k} (image is normal or counterfactual)")
        pred[k] = str(_field(r, "answer", predictions))
    right = {k: pope_answer(a) == gold[k] for k, a in pred.items()}
    per = {img: [v for (_, i), v in right.items() if i == img] for img in ("normal", "counterfactual")}
    pairs = [right[(e, "normal")] and right[(e, "counterfactual")] for e in {e for e, _ in gold}
             if (e, "normal") in right and (e, "counterfactual") in right]
    keys = sorted(pred)
    return {"paper": "popev2", "examples": len(rows), "answered": len(pred),
            "accuracy_normal": sum(per["normal"]) / len(per["normal"]) if per["normal"] else None,
            "accuracy_counterfactual": (sum(per["counterfactual"]) / len(per["counterfactual"])
                                        if per["counterfactual"] else None),
            "pair_accuracy": sum(pairs) / len(pairs) if pairs else None, "pairs": len(pairs),
            "pope": pope_metrics([gold[k] for k in keys], [pred[k] for k in keys])}


# -- DeFacto -------------------------------------------------------------------------------------
DEFACTO_IMAGES = {"original": "pos", "rmask": "random", "smask": "neg"}


def defacto_reward(response: str, solution: str, kind: str) -> float:
    """DeFacto's text reward for one response: ``kind`` pos (original), random (rmask), neg (smask)."""
    import re

    negative = bool(DEFACTO_NEGATIVE.search(response))
    if kind == "neg":
        return 1.0 if negative else -1.0
    if negative:
        return -1.0
    m = re.search(r"<answer>(.*?)</answer>", response, re.DOTALL)
    student = (m.group(1) if m else response).strip().lower()
    return 1.0 if student == solution.strip().lower() else 0.0


def score_defacto(folder: Path, predictions: Path) -> dict[str, Any]:
    solutions = {r["folder"]: r["answer_original"] for r in _jsonl(folder / "defacto.jsonl")}
    rewards: dict[str, list[float]] = {k: [] for k in DEFACTO_IMAGES}
    abstained: dict[str, int] = dict.fromkeys(DEFACTO_IMAGES, 0)
    for r in _jsonl(predictions):
        f, img = str(_field(r, "folder", predictions)), _field(r, "image", predictions)
        if f not in solutions or img not in DEFACTO_IMAGES:
            raise PaperEvalError(f"{predictions}: no folder {f!r} / image {img!r} (original, smask or rmask)")
        resp = str(_field(r, "response", predictions))
        rewards[img].append(defacto_reward(resp, solutions[f], DEFACTO_IMAGES[img]))
        abstained[img] += bool(DEFACTO_NEGATIVE.search(resp))
    out: dict[str, Any] = {"paper": "defacto", "folders": len(solutions)}
    for img, rs in rewards.items():
        out[img] = {"answered": len(rs), "right_rate": sum(x == 1.0 for x in rs) / len(rs) if rs else None,
                    "abstention_rate": abstained[img] / len(rs) if rs else None,
                    "mean_reward": sum(rs) / len(rs) if rs else None}
    return out


# -- CounterCurate -------------------------------------------------------------------------------
def score_countercurate(folder: Path, predictions: Path) -> dict[str, Any]:
    with open(folder / "train_countercurate.csv", newline="") as f:
        n_rows = sum(1 for _ in csv.DictReader(f, delimiter="\t"))
    correct = both = 0
    seen: set[int] = set()
    for r in _jsonl(predictions):
        i, s = _field(r, "row", predictions), _field(r, "scores", predictions)
        if not isinstance(i, int) or not 0 <= i < n_rows or i in seen:
            raise PaperEvalError(f"{predictions}: row {i!r} is not a new row of the CSV (0..{n_rows - 1})")
        try:
            pos_ok, neg_ok = s[0][0] > s[0][1], s[1][0] < s[1][1]
        except (TypeError, IndexError):
            raise PaperEvalError(f"{predictions}: row {i}: scores must be [[s(img,cap), s(img,neg)], "
                                 "[s(neg_img,cap), s(neg_img,neg)]]") from None
        seen.add(i)
        correct += pos_ok + neg_ok
        both += pos_ok and neg_ok
    return {"paper": "countercurate", "rows": n_rows, "answered": len(seen),
            "accuracy": correct / len(seen) / 2 if seen else None,
            "pair_accuracy": both / len(seen) if seen else None}


def score(ref: str | Path, predictions: Path) -> dict[str, Any]:
    found = export_of(ref)
    if found is None:
        raise PaperEvalError(f"{ref} is not a paper-layout export (no {MARKER} of format "
                             "pope/popev2/beaf/defacto/countercurate)")
    fmt, folder, named = found
    if fmt == "pope":
        if named.is_dir():
            files = sorted(p.name for p in folder.glob("*_pope_*.json"))
            raise PaperEvalError(f"a POPE export has one question file per setting: name one ({', '.join(files)})")
        return score_pope(named, predictions)
    return {"popev2": score_popev2, "beaf": score_beaf, "defacto": score_defacto,
            "countercurate": score_countercurate}[fmt](folder, predictions)


def report_lines(rep: dict[str, Any]) -> list[str]:
    """The headline numbers, one line each."""
    def f(x: Any) -> str:
        return "-" if x is None else f"{x:.4f}" if isinstance(x, float) else str(x)

    paper = rep["paper"]
    if paper in ("pope",):
        keys = ["questions", "accuracy", "precision", "recall", "f1", "yes_ratio"]
    elif paper == "beaf":
        keys = ["questions", "accuracy", "precision", "recall", "f1", "TU", "IG", "SBp", "SBn", "ID", "f1_tu_id"]
    elif paper == "popev2":
        keys = ["examples", "accuracy_normal", "accuracy_counterfactual", "pair_accuracy"]
    elif paper == "countercurate":
        keys = ["rows", "accuracy", "pair_accuracy"]
    else:
        return [f"{paper}: {img} right {f(rep[img]['right_rate'])} abstained {f(rep[img]['abstention_rate'])} "
                f"mean reward {f(rep[img]['mean_reward'])} ({rep[img]['answered']} answers)" for img in DEFACTO_IMAGES]
    return [f"{paper}: " + "  ".join(f"{k} {f(rep[k])}" for k in keys)]


def cmd(args: Any) -> int:
    """``counterfactory eval EXPORT[/FILE] --predictions FILE [--json] [--report PATH]``."""
    import sys

    if not args.predictions or not Path(args.predictions).is_file():
        print(f"error: give --predictions FILE (an existing file) to score the export {args.dataset}", file=sys.stderr)
        return 2
    try:
        rep = score(args.dataset, Path(args.predictions))
    except PaperEvalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.report) if args.report else Path(args.predictions).with_suffix(".report.json")
    out.write_text(json.dumps(rep, indent=2) + "\n")
    if args.json:
        print(json.dumps(rep, indent=2))
        return 0
    print("\n".join(report_lines(rep)))
    print(f"report: {out}")
    return 0
