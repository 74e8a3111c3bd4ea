"""qa: question/answer pairs for every variant, by template, with the answer-rule table.

The input question is kept and its answer on each variant follows ``rules.ANSWER_RULES``;
template questions about the same evidence (existence, count, and color/position where the
annotations determine them) are added, so one sample teaches several kinds of looking. No
question mentions the edit: the same question is asked of the original and every variant.

No question presupposes: color, position and other attribute questions are asked only about
objects the original shows (the evidence); an object an edit brings in (``insert``) gets
existence and count questions, never "What color is the star?" over an image without a star.
Absence ("no", "0") is asserted only for categories the input annotates exhaustively
(``exhaustive`` on the record, see ``config.Exhaustive``); otherwise the answer abstains. The
audit and a reader can tell on which images a question's subject is present, so they can
check that no question about an absent object gets anything but the abstention
(``subject_present``: from the item's targets and the edit records, which the shards keep).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from counterfactory.rules import ANSWER_RULES, answer_for, plural, side_of, singular
from counterfactory.sample import Reject, Sample, Stage
from counterfactory.scenes import polygon_mask
from counterfactory.stages import register
from counterfactory.stages.verify import CONTROLS

# kinds that ask about a property of an object rather than whether (or how often) it is there:
# asked of an image without the object they presuppose it
PRESUPPOSING_KINDS = frozenset({"color", "position", "direction", "order", "temporal", "other"})
# edits after which the evidence is not visible (gone or covered)
_HIDES = frozenset({"remove", "replace", "blackout"})


def exhaustive_for(m: dict[str, Any], cats: list[str]) -> bool:
    """Whether the input annotates every instance of each of ``cats`` (so "no"/"0" is known).
    A record that declares nothing: the categories it annotates."""
    ex = m.get("exhaustive")
    if ex is None:
        ex = sorted({a["category"] for a in m.get("annotated", [])} | set(m.get("targets", [])))
    if ex == "*":
        return True
    known = {singular(str(c)).lower() for c in ex}
    return all(singular(c).lower() in known for c in cats)


def subject_present(item: dict[str, Any], m: dict[str, Any], v: str) -> bool:
    """Whether the object a question is about can be seen in image ``v`` ("orig" or a variant)."""
    t = set(item.get("targets") or [])
    on_orig = bool(t & set(m.get("targets") or []))  # items are about the evidence or an inserted kind
    if v == "orig":
        return on_orig
    e = m.get("edits", {}).get(v, {})
    if e.get("inserted_category") in t:
        return True
    affects = e.get("affects", [] if e.get("region") == "control" else m.get("targets") or [])
    if "*" not in affects and not set(affects) & t:
        return on_orig
    if v in _HIDES:
        return False
    if v == "count":
        return int(e.get("remaining_instances", 1)) > 0
    return on_orig


def original_answer(kind: str, given: str | None, instances: list[dict[str, Any]], core: np.ndarray) -> str | None:
    n = len(instances)
    if kind == "existence":
        derived = "yes"
    elif kind == "count":
        derived = str(n)
    elif kind == "color":
        colors = {str(i.get("attributes", {}).get("color", "")).lower() for i in instances} - {""}
        derived = colors.pop() if len(colors) == 1 else None
    elif kind == "position":
        derived = side_of(core) if n == 1 else None
    else:
        derived = None
    return given if given is not None else derived


@register
class TemplateQA(Stage):
    name = "qa"
    backend = "default"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        extra_questions: list[str] = Field(
            ["existence", "count", "color", "position"],
            description="template question kinds added about the same evidence",
        )

    def _templates(self, sample: Sample, core: np.ndarray) -> list[dict[str, Any]]:
        instances = sample.meta["instances"]
        if len(sample.meta["targets"]) != 1:
            return []
        narrowed = "target_phrase" in sample.meta  # e.g. "red circle": only those were removed
        cat = sample.meta.get("target_phrase", sample.meta["targets"][0])
        out = []
        for kind in self.params.extra_questions:
            if kind == "color" and narrowed:
                continue
            text = {
                "existence": f"Is there a {cat} in the image?",
                "count": f"How many {plural(cat)} are there?",
                "color": f"What color is the {cat}?",
                "position": f"Is the {cat} on the left or the right?",
            }.get(kind)
            if text is None:
                continue
            if kind == "count" and not exhaustive_for(sample.meta, sample.meta["targets"]):
                continue  # the annotated instances may not be all of them
            ans = original_answer(kind, None, instances, core)
            if ans is not None:
                out.append({"question": text, "kind": kind, "answer": ans, "targets": sample.meta["targets"], "source": "template"})
        return out

    def process(self, sample: Sample) -> None:
        m = sample.meta
        q = m["question"]
        core = sample.arrays["mask_core"]
        instances = m["instances"]
        kind = q.get("kind", "other")
        given = q.get("answer")
        answer = original_answer(kind, given, instances, core)
        if answer is None:
            raise Reject("no_answer", f"no answer given and none derivable for a {kind} question")
        norm = answer.strip().lower()
        if kind == "existence" and norm in ("no", "false"):
            raise Reject("answer_contradicts_annotations", f"answer {answer!r} but {len(instances)} instance(s) found")
        if kind == "count":
            if not norm.isdigit():
                raise Reject("bad_count_answer", f"count answer {answer!r} is not a whole number")
            if int(norm) < len(instances):
                raise Reject("count_mismatch", f"answer {answer} < {len(instances)} annotated instances")
        primary = {"question": q["question"], "kind": kind, "answer": answer,
                   "targets": m["targets"], "source": "input"}
        items = [primary]
        seen = {(kind, primary["question"].strip().lower())}
        for t in self._templates(sample, core):
            if t["kind"] == kind or (t["kind"], t["question"].lower()) in seen:
                continue  # the input question already covers this kind
            if t["kind"] == "count" and not exhaustive_for(m, t["targets"]):
                continue  # a count from the annotations (template or LLM) needs all instances annotated
            seen.add((t["kind"], t["question"].lower()))
            items.append(t)
        abstain = self.run.abstain_answer
        items += self._inserted_items(m, abstain)
        qa = []
        for it in items:
            if it["kind"] in PRESUPPOSING_KINDS and not subject_present(it, m, "orig"):
                continue  # would presuppose an object the original does not show
            qa.append({k: it[k] for k in ("question", "kind", "targets", "source")}
                      | {"answers": self._answers(it, m, abstain)})
        m["qa"] = qa
        for v in list(m["variants"]):
            # a counterfactual whose every answer equals the original's teaches nothing
            if v not in CONTROLS and all(q["answers"][v] == q["answers"]["orig"] for q in m["qa"]):
                sample.reject_variant(self.name, v, "answers_unchanged",
                                      "no question of this sample has a different answer on this variant")

    @staticmethod
    def _inserted_items(m: dict[str, Any], abstain: str) -> list[dict[str, Any]]:
        """Questions about an inserted object: absent from the original, present after insert.
        Only existence and count: its color or side asked of the original would presuppose it.
        "no"/"0" on the original only where the input annotates that category exhaustively (a
        photo annotated "rocket" says nothing about triangles in its trusses): otherwise the
        existence answer abstains there and no count question is asked."""
        out, seen = [], set()
        for v in m["variants"]:
            cat = m["edits"][v].get("inserted_category")
            if not cat or cat in seen:  # two edits bringing in the same kind: one set of questions
                continue
            seen.add(cat)
            known = exhaustive_for(m, [cat])
            out.append({"question": f"Is there a {cat} in the image?", "kind": "existence",
                        "answer": "no" if known else abstain, "targets": [cat], "source": "template"})
            if known:
                out.append({"question": f"How many {plural(cat)} are there?", "kind": "count", "answer": "0",
                            "targets": [cat], "source": "template"})
        return out

    @staticmethod
    def _answers(it: dict[str, Any], m: dict[str, Any], abstain: str) -> dict[str, str]:
        """The item's answer on every variant: the edit's rule when the edit touches what the
        question is about (its ``affects``), the original answer otherwise."""
        answers = {"orig": it["answer"]}
        for v in m["variants"]:
            e = m["edits"][v]
            # an edit record without "affects" (an older or third-party backend) touches the
            # evidence unless it is a control
            affects = e.get("affects", [] if e.get("region") == "control" else m["targets"])
            if "*" not in affects and not set(affects) & set(it["targets"]):
                answers[v] = it["answer"]
                continue
            # questions about the object an edit brought in follow the insert rule
            rule_edit = "insert" if e.get("inserted_category") in it["targets"] else v
            if it["answer"] == abstain and it["kind"] != "existence":  # nothing to compute from
                answers[v] = abstain
                continue
            # the placed object's side only where the rule asks for it (issue 27: a whole-image
            # rasterization and moments per question and variant otherwise)
            needs_side = ANSWER_RULES[rule_edit].get(it["kind"]) == "new_side"
            side = _placed_side(e, m) if needs_side else None
            if needs_side and side is None:  # too central
                answers[v] = abstain
                continue
            try:
                answers[v] = answer_for(
                    rule_edit, it["kind"], it["answer"], removed=e.get("removed_instances", 0),
                    inserted=e.get("inserted_instances", 0), new_value=e.get("new_value"),
                    remaining=e.get("remaining_instances"), abstain=abstain, new_side=side)
            except ValueError as exc:
                raise Reject("answer_rule_failed", f"{v}: {exc}") from None
            if (it["kind"] == "existence" and answers[v] == "no" and rule_edit != "insert"
                    and not exhaustive_for(m, it["targets"])):
                # every annotated instance is gone, but the input does not say it annotated all
                answers[v] = abstain
        return answers


def _placed_side(e: dict[str, Any], m: dict[str, Any]) -> str | None:
    """The side an inserted object lies on, from its polygon rasterized as the edit painted it;
    None when the edit placed nothing (or too centrally to say)."""
    poly = e.get("polygon")
    if not poly:
        return None
    return side_of(polygon_mask(poly, int(m["source"]["width"]), int(m["source"]["height"])))
