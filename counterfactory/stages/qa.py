"""qa: question/answer pairs for every variant, by template, with the answer-rule table.

The input question is kept and its answer on each variant follows ``rules.ANSWER_RULES``;
template questions about the same evidence (existence, count, and color/position where the
annotations determine them) are added, so one sample teaches several kinds of looking. No
question mentions the edit: the same question is asked of the original and every variant.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from counterfactory.pipeline.sample import Reject, Sample, Stage
from counterfactory.rules import answer_for, plural, side_of
from counterfactory.stages import register
from counterfactory.stages.verify import CONTROLS


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
            seen.add((t["kind"], t["question"].lower()))
            items.append(t)
        abstain = self.run.get("abstain_answer", "unknown")
        items += self._inserted_items(m, abstain)
        m["qa"] = [{k: it[k] for k in ("question", "kind", "targets", "source")}
                   | {"answers": self._answers(it, m, abstain)} for it in items]
        for v in list(m["variants"]):
            # a counterfactual whose every answer equals the original's teaches nothing
            if v not in CONTROLS and all(q["answers"][v] == q["answers"]["orig"] for q in m["qa"]):
                sample.reject_variant(self.name, v, "answers_unchanged",
                                      "no question of this sample has a different answer on this variant")

    @staticmethod
    def _inserted_items(m: dict[str, Any], abstain: str) -> list[dict[str, Any]]:
        """Questions about an inserted object: absent from the original, present after insert."""
        out, seen = [], set()
        for v in m["variants"]:
            cat = m["edits"][v].get("inserted_category")
            if not cat or cat in seen:  # two edits bringing in the same kind: one set of questions
                continue
            seen.add(cat)
            out.append({"question": f"Is there a {cat} in the image?", "kind": "existence", "answer": "no",
                        "targets": [cat], "source": "template"})
            out.append({"question": f"How many {plural(cat)} are there?", "kind": "count", "answer": "0",
                        "targets": [cat], "source": "template"})
            if m["edits"][v].get("new_value"):
                out.append({"question": f"What color is the {cat}?", "kind": "color", "answer": abstain,
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
            try:
                answers[v] = answer_for(
                    rule_edit, it["kind"], it["answer"], removed=e.get("removed_instances", 0),
                    inserted=e.get("inserted_instances", 0), new_value=e.get("new_value"),
                    remaining=e.get("remaining_instances"), abstain=abstain)
            except ValueError as exc:
                raise Reject("answer_rule_failed", f"{v}: {exc}") from None
        return answers
