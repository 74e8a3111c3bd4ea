"""qa for clips (``backend: video``): existence/count/direction/order/temporal questions,
answered per variant by ``rules.answer_for`` from the structured edit context; a variant on
which no answer changes is dropped (it would teach nothing)."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from counterfactory.rules import answer_for, plural
from counterfactory.sample import Reject, Sample, Stage
from counterfactory.stages import register


def _phrase(inst: dict[str, Any]) -> str:
    color = str(inst.get("attributes", {}).get("color", "")).strip()
    return f"{color} {inst['category']}".strip()


def track_direction(inst: dict[str, Any], width: int, min_frac: float) -> str | None:
    path = inst["path"]
    if len(path) < 2:
        return None
    dx = path[-1][1] - path[0][1]
    if abs(dx) < min_frac * width:
        return None
    steps = np.diff([pt[1] for pt in path])
    if np.mean(np.sign(steps) == np.sign(dx)) < 0.7:  # not a steady motion one way
        return None
    return "right" if dx > 0 else "left"


def middle_crossing(inst: dict[str, Any], width: int) -> float | None:
    path = inst["path"]
    mid = width / 2
    for (t0, x0, _), (t1, x1, _) in zip(path, path[1:], strict=False):
        if (x0 - mid) * (x1 - mid) <= 0 and x0 != x1 and t1 == t0 + 1:
            return t0 + (mid - x0) / (x1 - x0)
    return None


@register
class VideoQA(Stage):
    name = "qa"
    backend = "video"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        extra_questions: list[Literal["existence", "count", "direction", "order"]] = Field(
            ["existence", "direction", "order"], description="template question kinds added from the tracks")
        min_motion_frac: float = Field(0.15, ge=0, le=1, description="direction needs this share of the width travelled")
        min_order_gap: float = Field(2.0, ge=0, description="frames between two events for an order question")
        require_answer_change: bool = Field(True, description="drop a variant on which no answer differs from the original")

    def _derived(self, kind: str, insts: list[dict[str, Any]], width: int) -> str | None:
        if kind == "existence":
            return "yes" if insts else None
        if kind == "count":
            return str(len(insts))
        if kind == "direction" and len(insts) == 1:
            return track_direction(insts[0], width, self.params.min_motion_frac)
        return None

    def _templates(self, m: dict[str, Any], width: int) -> list[dict[str, Any]]:
        out = []
        insts = m["instances"]
        phrases: dict[str, list[dict[str, Any]]] = {}
        for i in insts:
            phrases.setdefault(_phrase(i), []).append(i)
        single = [(ph, v[0]) for ph, v in phrases.items() if len(v) == 1]
        for kind in self.params.extra_questions:
            if kind == "existence":
                out += [{"question": f"Is there a {ph} in the video?", "kind": kind, "answer": "yes",
                         "targets": [i["category"]]} for ph, i in single]
            elif kind == "count":
                cats = sorted({i["category"] for i in insts})
                for c in cats:
                    k = sum(i["category"] == c for i in insts)
                    out.append({"question": f"How many {plural(c)} appear in the video?", "kind": kind,
                                "answer": str(k), "targets": [c]})
            elif kind == "direction":
                for ph, i in single:
                    d = track_direction(i, width, self.params.min_motion_frac)
                    if d:
                        out.append({"question": f"Does the {ph} move to the left or to the right?", "kind": kind,
                                    "answer": d, "targets": [i["category"]]})
            elif kind == "order" and len(single) >= 2:
                (pa, a), (pb, b) = single[0], single[1]
                ta, tb = middle_crossing(a, width), middle_crossing(b, width)
                if ta is not None and tb is not None and abs(ta - tb) >= self.params.min_order_gap:
                    out.append({"question": f"Does the {pa} reach the middle of the frame before or after the {pb}?",
                                "kind": kind, "answer": "before" if ta < tb else "after",
                                "targets": [a["category"], b["category"]]})
        return out

    def process(self, sample: Sample) -> None:
        m = sample.meta
        width = m["source"]["width"]
        abstain = self.run.abstain_answer
        items, notes = [], []
        for q in m["questions"]:
            kind = q.get("kind", "other")
            insts = [i for i in m["instances"] if i["category"] in q.get("targets", [])]
            given = q.get("answer")
            derived = self._derived(kind, insts, width)
            if kind == "existence" and given is not None and given.strip().lower() in ("no", "false"):
                notes.append(f"qa: {q['question']!r} dropped: answer {given!r} but the target is annotated")
                continue
            if given is not None and derived is not None and kind == "direction" and given.strip().lower() != derived:
                notes.append(f"qa: {q['question']!r}: given {given!r}, tracks say {derived!r}; the given answer is kept")
            answer = given if given is not None else derived
            if answer is None:
                notes.append(f"qa: {q['question']!r} dropped: no answer given and none derivable")
                continue
            items.append({"question": q["question"], "kind": kind, "answer": answer, "targets": q.get("targets", []),
                          "source": "input"})
        seen = {(it["kind"], tuple(sorted(it["targets"]))) for it in items} | {it["question"].lower() for it in items}
        for t in self._templates(m, width):
            if (t["kind"], tuple(sorted(t["targets"]))) in seen or t["question"].lower() in seen:
                continue
            seen.add((t["kind"], tuple(sorted(t["targets"]))))
            items.append(t | {"source": "template"})
        if not items:
            raise Reject("no_answer", "; ".join(notes)[:400] or "no question with an answer")
        for v in m["variants"]:  # a kind a model edit brought in: absent from the original clip
            cat = m["edits"][v].get("inserted_category")
            if cat and f"is there a {cat} in the video?" not in seen:
                seen.add(f"is there a {cat} in the video?")
                items.append({"question": f"Is there a {cat} in the video?", "kind": "existence", "answer": "no",
                              "targets": [cat], "source": "template"})
        if notes:
            m.setdefault("notes", []).extend(notes)
        qa = []
        for it in items:
            answers = {"orig": it["answer"]}
            for v in m["variants"]:
                e = m["edits"].get(v, {})
                # a model edit that brings in a new kind (replace): questions about it follow insert
                rule_edit = "insert" if e.get("inserted_category") in it["targets"] else v
                removed = (sum(1 for i in m["instances"] if i["category"] in it["targets"])
                           if v in ("remove", "blackout", "replace") else 0)
                try:
                    answers[v] = answer_for(rule_edit, it["kind"], it["answer"], removed=removed,
                                            inserted=e.get("inserted_instances", 0), abstain=abstain)
                except ValueError as exc:
                    raise Reject("answer_rule_failed", str(exc)) from None
            qa.append({k: it[k] for k in ("question", "kind", "targets", "source")} | {"answers": answers})
        m["qa"] = qa
        if self.params.require_answer_change:
            for v in list(m["variants"]):
                if v != "random_mask" and all(q["answers"][v] == q["answers"]["orig"] for q in qa):
                    sample.reject_variant(self.name, v, "answers_unchanged",
                                          f"no question's answer differs from the original under {v}")
