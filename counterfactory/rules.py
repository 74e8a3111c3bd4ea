"""Question kinds, word matching and the answer-rule table: the one place that says what the
answer to a question becomes after each kind of edit.

The table is printed in data cards so a reader can check every counterfactual answer.
"""

from __future__ import annotations

import re
from typing import Any, Literal

QuestionKind = Literal["existence", "count", "color", "position", "direction", "order", "temporal", "other"]
QUESTION_KINDS: tuple[str, ...] = (
    "existence", "count", "color", "position",  # about the evidence in one image or frame
    "direction", "order", "temporal",  # about motion and time (video)
    "other",
)

_ALL = QUESTION_KINDS

# edit type -> question kind -> rule. Rules:
#   keep              the original answer (the evidence is untouched)
#   no / yes          existence is denied / affirmed
#   yes_if_remaining  "yes" while instances remain after the edit, else "no"
#   minus_removed     count minus the instances removed
#   plus_inserted     count plus the instances inserted
#   new_value         the value the edit set for this kind (attribute: the new color; swap: the
#                     evidence's new side; insert: the inserted object's color)
#   new_side          the side the inserted object was placed on (insert sets a color *and* a
#                     place: one ``new_value`` cannot answer both, and position questions used to
#                     get the new color)
#   swap_lr           left <-> right (mirror; also motion direction)
#   flip_order        before <-> after, and yes <-> no for "does A happen before B?"
#   abstain           the evidence is hidden, gone or scrambled: not answerable from the data
ANSWER_RULES: dict[str, dict[str, str]] = {
    "orig": {k: "keep" for k in _ALL},
    "remove": {k: "abstain" for k in _ALL} | {"existence": "no", "count": "minus_removed"},
    # DeFacto: masked evidence means the model should abstain, not guess "no".
    "blackout": {k: "abstain" for k in _ALL},
    # DeFacto's control: an equal-area region elsewhere is masked; the answer must not change.
    "random_mask": {k: "keep" for k in _ALL},
    # HalluciDoctor: an object pasted where no evidence is; questions are about the inserted one.
    "insert": {k: "abstain" for k in _ALL} | {"existence": "yes", "count": "plus_inserted",
                                               "color": "new_value", "position": "new_side"},
    "attribute": {k: "keep" for k in _ALL} | {"color": "new_value", "other": "abstain"},
    # the evidence repainted as another kind of object: about the old kind, as after removal;
    # questions about the new kind follow the "insert" row
    "replace": {k: "abstain" for k in _ALL} | {"existence": "no", "count": "minus_removed"},
    # CounterCurate: mirror image, left and right swap.
    "flip": {k: "keep" for k in _ALL} | {"position": "swap_lr", "direction": "swap_lr"},
    # the evidence and another object trade places: where the evidence is changes
    "swap": {k: "keep" for k in _ALL} | {"position": "new_value", "direction": "abstain"},
    # remove k of n instances
    "count": {k: "keep" for k in _ALL} | {"existence": "yes_if_remaining", "count": "minus_removed",
                                           "position": "abstain", "other": "abstain"},
    # temporal counterfactuals (video)
    "reverse": {k: "keep" for k in _ALL} | {"direction": "swap_lr", "order": "flip_order", "temporal": "abstain"},
    "shuffle": {k: "keep" for k in _ALL} | {"direction": "abstain", "order": "abstain", "temporal": "abstain"},
    # a held middle segment: events inside it happen at once when the clip resumes, so two
    # events both inside it lose their order (tests/test_rules_oracle.py; the video stage must
    # not hold a segment that holds both events of an order question)
    "freeze": {k: "keep" for k in _ALL} | {"direction": "abstain", "temporal": "abstain"},
}

RULE_TEXT = {
    "keep": "original answer",
    "no": '"no"',
    "yes": '"yes"',
    "yes_if_remaining": '"yes" if instances remain, else "no"',
    "minus_removed": "original count minus instances removed",
    "plus_inserted": "original count plus instances inserted",
    "new_value": "the value the edit set",
    "new_side": "the side the edit placed it on",
    "swap_lr": "left and right swapped",
    "flip_order": "before/after (and yes/no) swapped",
    "abstain": "abstention answer",
}

_LR = {"left": "right", "right": "left", "forward": "backward", "backward": "forward",
       "clockwise": "counterclockwise", "counterclockwise": "clockwise"}
_ORDER = {"before": "after", "after": "before", "yes": "no", "no": "yes", "first": "last", "last": "first"}


_KIND_PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    # motion and time first: "is the ball moving left or right?" is about direction, not position
    ("direction", re.compile(r"\b(move|moving|go|going|travel|head|heading|roll|slide)s?\b.*\b(left|right)\b"
                             r"|\bwhich direction\b", re.I)),
    ("order", re.compile(r"\bbefore or after\b|\bafter or before\b|\bwhich .* first\b|\b(earlier|later) than\b",
                         re.I)),
    ("temporal", re.compile(r"^\s*what happens\b|\bkeep(s)? moving\b|\bstop(s|ped)?\b"
                            r"|\bat the (end|start|beginning)\b|\bafter it\b", re.I)),
    ("count", re.compile(r"^\s*how many\b|\bnumber of\b|\bcount\b", re.I)),
    ("color", re.compile(r"\bwhat colou?r\b|\bwhich colou?r\b|\bcolou?r of\b", re.I)),
    ("position", re.compile(r"\bleft or (the )?right\b|\bright or (the )?left\b|^\s*where\b|\bwhich side\b", re.I)),
    ("existence", re.compile(r"^\s*(is|are|does|do|can you see)\b.*\b(there|any|a|an|visible|present|contain|have)\b", re.I)),
]


def side_of_x(x: float, width: int, lo: float = 0.4, hi: float = 0.6) -> str | None:
    """"left"/"right" for a horizontal position in pixel coordinates (pixel i spans i..i+1, so
    its centre is i + 0.5 and a mirror image lands at exactly 1 - the fraction), None when it
    is too central to say."""
    f = (x + 0.5) / width
    return "left" if f < lo else "right" if f > hi else None


def side_of(mask, lo: float = 0.4, hi: float = 0.6) -> str | None:
    """"left"/"right" from a mask's centroid, None when it is too central to say."""
    import cv2
    import numpy as np

    # the centroid from OpenCV's moments (issue 27): sums of integer columns, exact in float64, so
    # m10 / m00 is the same float as the mean of np.nonzero's columns, without listing them
    mask = np.asarray(mask)
    m8 = mask if mask.dtype == np.uint8 else (mask != 0).view(np.uint8)
    # on the mask's bounding box (issue 27: ~900 whole-image moments per 200 inputs): the box's
    # column sum plus its offset times the count is the whole image's, the same integer
    x, y, w, h = cv2.boundingRect(m8)
    if not w or not h:
        return None
    m = cv2.moments(m8[y:y + h, x:x + w], binaryImage=True)
    return side_of_x((m["m10"] + x * m["m00"]) / m["m00"], mask.shape[1], lo, hi) if m["m00"] else None


def classify_question(question: str) -> str:
    for kind, pat in _KIND_PATTERNS:
        if pat.search(question):
            return kind
    return "other"


def answer_for(
    edit: str, kind: str, original: str, *, removed: int = 0, inserted: int = 0,
    new_value: str | None = None, remaining: int | None = None, abstain: str = "unknown",
    new_side: str | None = None,
) -> str:
    """The answer to a question about the edited evidence after ``edit`` (see ANSWER_RULES)."""
    rule = ANSWER_RULES[edit].get(kind, "abstain")
    if rule == "keep":
        return original
    if rule in ("no", "yes"):
        return rule
    if rule == "abstain":
        return abstain
    if rule == "yes_if_remaining":
        if remaining is None:
            raise ValueError(f"edit {edit!r} needs the number of remaining instances")
        return "yes" if remaining > 0 else "no"
    if rule == "minus_removed":
        n = int(original)
        if removed > n:
            raise ValueError(f"count answer {n} is smaller than the {removed} instances removed")
        return str(n - removed)
    if rule == "plus_inserted":
        return str(int(original) + inserted)
    if rule == "new_value":
        if new_value is None:
            raise ValueError(f"edit {edit!r} sets a new value for {kind} questions but none was given")
        return new_value
    if rule == "new_side":
        if new_side is None:
            raise ValueError(f"edit {edit!r} places an object but no side was given")
        return new_side
    if rule == "swap_lr":
        return _LR.get(original.strip().lower(), original)
    if rule == "flip_order":
        return _ORDER.get(original.strip().lower(), abstain)
    raise ValueError(f"unknown rule {rule!r}")


# --- word matching: question words to annotation categories ---------------------------------

SYNONYMS: dict[str, tuple[str, ...]] = {
    "person": ("people", "man", "men", "woman", "women", "human", "boy", "girl", "astronaut", "child"),
    "cup": ("mug", "coffee"),
    "cat": ("kitten", "kitty"),
    "dog": ("puppy",),
    "motorcycle": ("motorbike", "bike"),
    "car": ("automobile",),
    "coin": ("money",),
    "square": ("rectangle", "box"),
}

_WORD = re.compile(r"[a-z]+")


IRREGULAR_PLURALS = {"person": "people", "man": "men", "woman": "women", "child": "children",
                     "mouse": "mice", "foot": "feet", "tooth": "teeth", "goose": "geese",
                     "sheep": "sheep", "fish": "fish", "knife": "knives", "leaf": "leaves"}
_IRREGULAR_SINGULAR = {v: k for k, v in IRREGULAR_PLURALS.items()}


def singular(word: str) -> str:
    w = word.lower()
    if w in _IRREGULAR_SINGULAR:
        return _IRREGULAR_SINGULAR[w]
    if len(w) > 4 and w.endswith("ies"):
        return w[:-3] + "y"
    if len(w) > 4 and w.endswith(("ches", "shes", "xes", "sses")):
        return w[:-2]
    if len(w) > 3 and w.endswith("s") and not w.endswith(("ss", "us", "is")):
        return w[:-1]
    return w


def plural(word: str) -> str:
    head, _, last = word.rpartition(" ")
    if last in IRREGULAR_PLURALS:
        return f"{head} {IRREGULAR_PLURALS[last]}".strip()
    if word.endswith(("ch", "sh", "x", "ss")):
        return word + "es"
    if word.endswith("y") and len(word) > 2 and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def words(text: str) -> list[str]:
    return [singular(w) for w in _WORD.findall(text.lower())]


def match_categories(text: str, categories: set[str]) -> list[str]:
    """Categories named in ``text``: exact (singularized) word or phrase match, then synonyms."""
    toks = words(text)
    joined = " " + " ".join(toks) + " "
    found: list[str] = []
    for cat in sorted(categories):
        cat_words = " ".join(singular(w) for w in cat.lower().split())
        names = {cat_words, *(singular(s) for s in SYNONYMS.get(cat_words, ()))}
        if any(f" {n} " in joined for n in names):
            found.append(cat)
    return found


# --- color names: for attribute edits (the new value) and checking them -------------------

HUES: dict[str, float] = {"red": 0, "orange": 28, "yellow": 52, "green": 125, "cyan": 185,
                          "blue": 225, "purple": 280, "pink": 325}
# the colors an attribute edit may turn evidence into: far apart, unambiguous names
EDIT_COLORS: tuple[str, ...] = ("red", "yellow", "green", "cyan", "blue", "purple")
# colors with no hue to replace: a recolored silver spoon keeps looking silver under a tint
ACHROMATIC: frozenset[str] = frozenset({"white", "silver", "gray", "grey", "black", "clear", "transparent"})


def _hue_dist(a: float, b: float) -> float:
    d = abs(a - b) % 360
    return min(d, 360 - d)


def color_name(rgb: tuple[float, float, float] | list[float]) -> str:
    """Nearest named hue, or an achromatic name when saturation is low."""
    import colorsys

    r, g, b = (float(c) / 255.0 for c in rgb)
    h, s, v = colorsys.rgb_to_hsv(r, g, b)
    if v < 0.15:
        return "black"
    if s < 0.25:
        return "white" if v > 0.85 else "gray"
    hue = h * 360
    return min(HUES, key=lambda n: _hue_dist(hue, HUES[n]))


def exhaustive_categories(value: Any, objects: list[Any]) -> str | list[str]:
    """A declaration of exhaustive annotation (see ``config.Exhaustive``) as the record carries
    it: ``"*"`` (every category) or the sorted category names whose every instance is annotated.
    A malformed value is a ``ValueError`` (a bad manifest line, rejected with the reason)."""
    if value is True:
        return "*"
    if value is False:
        return []
    if value == "annotated":
        return sorted({str(o["category"]) for o in objects if isinstance(o, dict) and o.get("category")})
    if isinstance(value, list) and all(isinstance(c, str) and c.strip() for c in value):
        return sorted({c.strip() for c in value})
    raise ValueError("'exhaustive' must be true, false, \"annotated\" or a list of category names")
