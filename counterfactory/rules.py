"""Question kinds, word matching and the answer-rule table: the one place that says what the
answer to a question becomes after each kind of edit.

The table is printed in data cards so a reader can check every counterfactual answer.
"""

from __future__ import annotations

import re
from typing import Literal

QuestionKind = Literal["existence", "count", "color", "position", "other"]
QUESTION_KINDS: tuple[str, ...] = ("existence", "count", "color", "position", "other")

# edit type -> question kind -> rule. Rules:
#   keep         the original answer (controls: the evidence is untouched)
#   no           the evidence is gone, so existence is denied
#   minus_removed  count minus the instances removed
#   abstain      the evidence is hidden or gone, so the question cannot be answered from the image
ANSWER_RULES: dict[str, dict[str, str]] = {
    "orig": {k: "keep" for k in QUESTION_KINDS},
    "remove": {
        "existence": "no",
        "count": "minus_removed",
        "color": "abstain",
        "position": "abstain",
        "other": "abstain",
    },
    # DeFacto: masked evidence means the model should abstain, not guess "no".
    "blackout": {k: "abstain" for k in QUESTION_KINDS},
    # DeFacto's control: an equal-area region elsewhere is masked; the answer must not change.
    "random_mask": {k: "keep" for k in QUESTION_KINDS},
}

RULE_TEXT = {
    "keep": "original answer",
    "no": '"no"',
    "minus_removed": "original count minus instances removed",
    "abstain": "abstention answer",
}

_KIND_PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    ("count", re.compile(r"^\s*how many\b|\bnumber of\b|\bcount\b", re.I)),
    ("color", re.compile(r"\bwhat colou?r\b|\bwhich colou?r\b|\bcolou?r of\b", re.I)),
    ("position", re.compile(r"\bleft or (the )?right\b|\bright or (the )?left\b|^\s*where\b|\bwhich side\b", re.I)),
    ("existence", re.compile(r"^\s*(is|are|does|do|can you see)\b.*\b(there|any|a|an|visible|present|contain|have)\b", re.I)),
]


def classify_question(question: str) -> str:
    for kind, pat in _KIND_PATTERNS:
        if pat.search(question):
            return kind
    return "other"


def answer_for(
    edit: str, kind: str, original: str, *, removed: int, abstain: str
) -> str:
    """The answer to a question about the edited evidence after ``edit``."""
    rule = ANSWER_RULES[edit].get(kind, "abstain")
    if rule == "keep":
        return original
    if rule == "no":
        return "no"
    if rule == "abstain":
        return abstain
    if rule == "minus_removed":
        n = int(original)
        if removed > n:
            raise ValueError(f"count answer {n} is smaller than the {removed} instances removed")
        return str(n - removed)
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
