"""Measure a model on a dataset's pairs: accuracy per variant, pair consistency, BEAF's
before/after metrics and DeFacto's abstention rates.

``export_questions`` writes every (sample, variant, question) to ask, one JSONL row each;
a model answers them (any runtime, any framework) into a predictions JSONL with the same
``key``/``variant``/``qid`` plus ``answer``; ``evaluate`` scores it against the dataset's
answers, computed by the rule table when the dataset was made.

Definitions (per question asked of an original and one counterfactual of it):
- accuracy: normalized exact match, per variant;
- pair consistency: right on the original and on the counterfactual;
- BEAF (Ye-Bin et al., 2024), over pairs whose true answer changes: true understanding (TU,
  right on both), ignorance (IG, wrong on both), stubbornness (SB, the same answer on both
  although it should change); over pairs whose true answer stays: indecision (ID, the answer
  changed although it should not);
- DeFacto: abstention rate where the true answer is the abstention (counterfactuals), and
  wrong abstention on controls (``random_mask``), where the evidence is intact.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from counterfactory.index import answers_of  # typed index columns (or older JSON text)
from counterfactory.layout import INDEX, MANIFEST
from counterfactory.stages.verify import CONTROLS as CONTROL_VARIANTS
from counterfactory.storage import read_parquet
from counterfactory.versions import locate

_NUMBERS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve".split())}
# Whole answers that mean "cannot tell". Matched as whole normalized phrases, never as
# substrings: "no" inside "know" or "not" is not an abstention (a known failure elsewhere).
ABSTENTIONS = {
    "unknown", "unanswerable", "not sure", "unsure", "cannot tell", "can not tell", "cant tell",
    "cannot be determined", "can not be determined", "cannot determine", "i dont know", "i do not know",
    "not visible", "not answerable", "no answer", "cannot answer", "it is unclear", "unclear",
    "impossible to tell", "not possible to tell", "the answer cannot be determined from the image",
}


def normalize(answer: Any) -> str:
    """Lowercase, drop punctuation and articles, number words to digits, yes/no variants."""
    a = str(answer).strip().lower()
    a = re.sub(r"[^\w\s]", "", a)
    words = [_NUMBERS.get(w, w) for w in a.split() if w not in ("a", "an", "the")]
    a = " ".join(words)
    if a in ("yes", "yeah", "yep", "true", "correct"):
        return "yes"
    if a in ("no", "nope", "false", "incorrect"):
        return "no"
    return a


def is_abstention(answer: Any, abstain: str = "unknown") -> bool:
    a = normalize(answer)
    return a == normalize(abstain) or a in ABSTENTIONS


def dataset_dir(ref: str | Path, root: str | Path = "outputs") -> Path:
    """A version folder from ``DATASET[@VERSION]``, a ``ROOT/DATASET/vN`` path, or a folder
    holding ``index.parquet``."""
    p = Path(ref)
    if p.is_dir() and (p / INDEX).exists():
        return p
    return locate(str(ref), root).path


def _rows(ds: Path) -> list[dict[str, Any]]:
    cols = ["key", "shard", "questions", "question_kinds", "answers", "variants"]
    return read_parquet(ds / INDEX, cols).to_pylist()


def export_questions(ds: Path, out: Path, image_ext: str | None = None) -> int:
    """One row per (sample, variant, question): what to ask and of which tar member."""
    if image_ext is None:
        manifest = json.loads((ds / MANIFEST).read_text())
        image_ext = "mp4" if manifest.get("counts", {}).get("videos") else "jpg"
    n = 0
    with open(out, "w", encoding="utf-8") as f:
        for r in _rows(ds):
            answers = answers_of(r["answers"])
            for qid, (q, kind) in enumerate(zip(r["questions"], r["question_kinds"], strict=True)):
                for v in ["orig", *r["variants"]]:
                    if v not in answers[qid]:
                        continue
                    f.write(json.dumps({"key": r["key"], "variant": v, "qid": qid, "question": q, "kind": kind,
                                        "shard": r["shard"], "member": f"{r['key']}.{v}.{image_ext}"}) + "\n")
                    n += 1
    return n


def _ratio(num: int, den: int) -> float | None:
    return round(num / den, 4) if den else None


class PredictionsError(ValueError):
    """A predictions file nothing can be scored from (one-line message)."""


def read_predictions(path: Path, truth: dict[tuple[str, str, int], str]
                     ) -> tuple[dict[tuple[str, str, int], str], list[str]]:
    """``{(key, variant, qid): answer}`` and one problem line per line that could not be used
    (not UTF-8, not JSON, a field missing or of the wrong type, no such question, a repeat)."""
    pred: dict[tuple[str, str, int], str] = {}
    problems: list[str] = []
    with open(path, "rb") as f:
        # a line is read at most 1 MiB at a time: a file of zeros without a newline stays bounded
        for lineno, raw in enumerate(iter(lambda: f.readline(1 << 20), b""), 1):
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                row = json.loads(line)
                key, variant, qid, answer = row["key"], row["variant"], row["qid"], row["answer"]
            except UnicodeDecodeError:
                problems.append(f"line {lineno}: not UTF-8")
                continue
            except (ValueError, KeyError, TypeError) as exc:
                problems.append(f"line {lineno}: {type(exc).__name__}: {exc}")
                continue
            if not (isinstance(key, str) and isinstance(variant, str) and isinstance(answer, str | int | float)
                    and isinstance(qid, int) and not isinstance(qid, bool) and not isinstance(answer, bool)):
                problems.append(f"line {lineno}: key and variant must be strings, qid an integer, "
                                "answer a string or number")
                continue
            k = (key, variant, qid)
            if k not in truth:
                problems.append(f"line {lineno}: no such question {k}")
            elif k in pred:
                problems.append(f"line {lineno}: a second answer to {k} (the first is kept)")
            else:
                pred[k] = str(answer)
    if not pred:
        first = f"; first problem: {problems[0]}" if problems else ""
        raise PredictionsError(f"{path}: no usable prediction ({len(problems)} problem line(s){first}); "
                               "each line is {\"key\", \"variant\", \"qid\", \"answer\"} as --export writes them")
    return pred, problems


def evaluate(ds: Path, predictions: Path, abstain: str = "unknown") -> dict[str, Any]:
    truth: dict[tuple[str, str, int], str] = {}
    kinds: dict[tuple[str, int], str] = {}
    for r in _rows(ds):
        for qid, per_variant in enumerate(answers_of(r["answers"])):
            kinds[(r["key"], qid)] = r["question_kinds"][qid]
            for v, a in per_variant.items():
                truth[(r["key"], v, qid)] = a
    pred, problems = read_predictions(predictions, truth)

    def right(k: tuple[str, str, int]) -> bool:
        t = truth[k]
        p = pred[k]
        return is_abstention(p, abstain) if is_abstention(t, abstain) else normalize(p) == normalize(t)

    per_variant: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    per_kind: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for k in truth:
        if k in pred:
            ok = right(k)
            per_variant[k[1]][0] += ok
            per_variant[k[1]][1] += 1
            per_kind[kinds[(k[0], k[2])]][0] += ok
            per_kind[kinds[(k[0], k[2])]][1] += 1
    pair = defaultdict(lambda: [0, 0])
    beaf = {"changed": 0, "TU": 0, "IG": 0, "SB": 0, "unchanged": 0, "ID": 0}
    abst = {"cf_abstain_truth": 0, "cf_abstained": 0, "control": 0, "control_abstained": 0}
    for (key, v, qid), t in truth.items():
        if v == "orig":
            continue
        o = (key, "orig", qid)
        c = (key, v, qid)
        if o not in pred or c not in pred:
            continue
        both = right(o) and right(c)
        pair[v][0] += both
        pair[v][1] += 1
        if v in CONTROL_VARIANTS:
            if not is_abstention(t, abstain):
                abst["control"] += 1
                abst["control_abstained"] += is_abstention(pred[c], abstain)
            continue
        if is_abstention(t, abstain):
            abst["cf_abstain_truth"] += 1
            abst["cf_abstained"] += is_abstention(pred[c], abstain)
        if normalize(truth[o]) != normalize(t):
            beaf["changed"] += 1
            beaf["TU"] += both
            beaf["IG"] += (not right(o)) and (not right(c))
            beaf["SB"] += normalize(pred[o]) == normalize(pred[c]) and not both
        else:
            beaf["unchanged"] += 1
            beaf["ID"] += normalize(pred[o]) != normalize(pred[c])
    return {
        "dataset": str(ds),
        "predictions": str(predictions),
        "questions": len(truth),
        "answered": sum(1 for k in truth if k in pred),
        "problem_count": len(problems),
        "problems": problems[:50],
        "accuracy": {v: _ratio(*c) for v, c in sorted(per_variant.items())},
        "accuracy_by_kind": {k: _ratio(*c) for k, c in sorted(per_kind.items())},
        "pair_consistency": {v: _ratio(*c) for v, c in sorted(pair.items())},
        "beaf": {"TU": _ratio(beaf["TU"], beaf["changed"]), "IG": _ratio(beaf["IG"], beaf["changed"]),
                 "SB": _ratio(beaf["SB"], beaf["changed"]), "ID": _ratio(beaf["ID"], beaf["unchanged"]),
                 "pairs_changed": beaf["changed"], "pairs_unchanged": beaf["unchanged"]},
        "defacto": {"abstention_rate_on_counterfactuals": _ratio(abst["cf_abstained"], abst["cf_abstain_truth"]),
                    "wrong_abstention_on_controls": _ratio(abst["control_abstained"], abst["control"])},
    }


def report_table(rep: dict[str, Any]) -> str:
    def f(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}%"

    lines = [f"answered {rep['answered']}/{rep['questions']} questions"
             + (f", {rep.get('problem_count', len(rep['problems']))} problem line(s)" if rep["problems"] else "")]
    lines.append("variant        accuracy  pair-consistency")
    for v, acc in rep["accuracy"].items():
        lines.append(f"{v:<14} {f(acc):>8}  {f(rep['pair_consistency'].get(v)):>16}")
    b, d = rep["beaf"], rep["defacto"]
    lines.append(f"BEAF  TU {f(b['TU'])}  IG {f(b['IG'])}  SB {f(b['SB'])}  ID {f(b['ID'])}")
    lines.append(f"DeFacto  abstention on counterfactuals {f(d['abstention_rate_on_counterfactuals'])}"
                 f"  wrong abstention on controls {f(d['wrong_abstention_on_controls'])}")
    return "\n".join(lines)
