"""The shortcut audit of a version: can a model get the answers right without doing the task?

Computed at publish (the card's ``## Shortcut audit``, ``card.json["audit"]``, the viewer) and by
``counterfactory audit DATASET[@vN]``; ``audit_version(version_dir)`` is the entry point. Per
variant type:

(a) **edit detectability**: the cross-validated ROC AUC of a probe (scikit-learn logistic
    regression on standardized features) telling the counterfactual from its original using image
    statistics only: per window of a grid, local texture and high-frequency energy, color
    statistics, flat-pixel share and JPEG blockiness, summarized over the windows. The mask is
    never a feature. A window-level probe gives a heat map per image; the stored edit mask only
    *scores* it: how often the hottest window touches the edit, against the share of windows
    that do (chance), and the IoU of the hottest windows with the edited ones.
(b) **answer priors**: accuracy of blind answerers that never see the image: always the
    original's answer; the majority answer per question kind; a question-text classifier (TF-IDF
    + logistic regression) trained on every image's rows, and one trained per variant (what a
    model that could spot the edit would get from the text). Cross-validated, folds grouped by
    sample so no sample's questions are in both the training and the test fold.
(c) **label balance**: answer distribution per variant and question kind, share of abstentions.
(d) **presupposition**: questions about an object absent from the image they are asked of: on
    an original (never right), answered with anything but the abstention on a variant, and
    "unknown" on an original for an object it shows.

Deterministic: the sample is the ``sample_pairs`` keys with the smallest sha256(seed, key), read
in key order; folds are unshuffled; the solvers are deterministic. Card files are outside the
manifest, so the audit never changes a content id. Cost: one pass over the shards that hold the
sampled keys, two JPEG decodes and a few OpenCV filters per pair, and small linear models
(~0.1 s per pair on one core; ``cost`` in the result says what this one took).

One module (~470 lines) because the four measures share one sampled read of the shards and one
result; the markdown and command-line renderings of that result sit at its end.
"""

from __future__ import annotations

import hashlib
import io
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml
from PIL import Image

from counterfactory.audit_config import AuditConfig
from counterfactory.index import answers_of
from counterfactory.layout import CONFIG, INDEX
from counterfactory.publish import FailureBudgetExceeded
from counterfactory.rules import ANSWER_RULES
from counterfactory.stages.qa import PRESUPPOSING_KINDS, subject_present
from counterfactory.stages.verify import CONTROLS
from counterfactory.storage import read_parquet

FORMAT = "counterfactory-audit/1"
# window features, in this order (see window_features)
WINDOW_FEATURES = ("L_mean", "a_mean", "b_mean", "L_std", "a_std", "b_std", "saturation", "log_laplacian",
                   "log_gradient", "log_highpass_energy", "flat_share", "blockiness_h", "blockiness_v")
_STATS = ("min", "p10", "p50", "p90", "max", "std")
_MIN_PAIRS = 6  # fewer pairs of a variant: no probe (a 2-fold AUC of 4 pairs says nothing)


class AuditFailed(FailureBudgetExceeded):
    """A dataset over the audit's thresholds with ``refuse_on_audit`` (``run --strict``): exit 3,
    nothing published."""


# -- image statistics (never the mask) -----------------------------------------------------------
def _cells(x: np.ndarray, grid: int) -> np.ndarray:
    """Mean of ``x`` over each cell of a grid x grid split (area resampling, deterministic)."""
    return cv2.resize(x.astype(np.float32), (grid, grid), interpolation=cv2.INTER_AREA)


def _cells_of(maps: list[np.ndarray], grid: int) -> list[np.ndarray]:
    """``_cells`` of each map, four maps to one resize (OpenCV's area resampling takes at most
    four channels at a non-integer scale; per channel it is the same arithmetic, so the same
    numbers as one call per map at a quarter of the calls)."""
    out: list[np.ndarray] = []
    for i in range(0, len(maps), 4):
        group = maps[i : i + 4]
        stack = cv2.merge([m.astype(np.float32, copy=False) for m in group]) if len(group) > 1 else group[0]
        cells = cv2.resize(stack, (grid, grid), interpolation=cv2.INTER_AREA).reshape(grid, grid, -1)
        out.extend(cells[..., c] for c in range(len(group)))
    return out


def window_features(img: np.ndarray, grid: int) -> np.ndarray:
    """(grid*grid, len(WINDOW_FEATURES)) statistics of an RGB uint8 image, one row per window."""
    gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).astype(np.float32)
    lab = cv2.cvtColor(img, cv2.COLOR_RGB2LAB).astype(np.float32)
    sat = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)[..., 1].astype(np.float32) / 255.0
    lap = np.abs(cv2.Laplacian(gray, cv2.CV_32F, ksize=3))
    grad = cv2.magnitude(cv2.Sobel(gray, cv2.CV_32F, 1, 0), cv2.Sobel(gray, cv2.CV_32F, 0, 1))
    hp = gray - cv2.GaussianBlur(gray, (0, 0), 1.0)
    maps = [lab[..., c] for c in range(3)] + [lab[..., c] ** 2 for c in range(3)]
    maps += [sat, lap, grad, hp * hp, (lap < 2).astype(np.float32)]
    # JPEG blockiness: neighbour differences across the 8-pixel block grid over those inside it
    for axis in (1, 0):
        d = np.abs(np.diff(gray, axis=axis))
        d = np.concatenate([d, np.zeros_like(d[:, :1] if axis else d[:1])], axis=axis)
        idx = np.arange(gray.shape[axis])
        edge = ((idx % 8) == 7).astype(np.float32)
        edge = edge[None, :] if axis else edge[:, None]
        edge = np.broadcast_to(edge, gray.shape)
        maps += [d * edge, edge, d * (1 - edge), 1 - edge]
    c = _cells_of(maps, grid)
    cols = [(c[i], np.sqrt(np.maximum(c[3 + i] - c[i] * c[i], 0))) for i in range(3)]
    feats = [cols[0][0], cols[1][0], cols[2][0], cols[0][1], cols[1][1], cols[2][1], c[6],
             np.log1p(c[7]), np.log1p(c[8]), np.log1p(c[9]), c[10]]
    for j in (11, 15):
        at = c[j] / np.maximum(c[j + 1], 1e-6)
        inside = c[j + 2] / np.maximum(c[j + 3], 1e-6)
        feats.append(np.log1p(at) - np.log1p(inside))
    return np.stack([f.reshape(-1) for f in feats], axis=1).astype(np.float64)


def image_features(win: np.ndarray) -> np.ndarray:
    """One vector per image: each window feature's spread over the windows (an edit shows as an
    outlying window: a flat fill is a minimum of texture, a pasted shape a maximum of saturation)."""
    q = np.percentile(win, [0, 10, 50, 90, 100], axis=0)
    return np.concatenate([q.reshape(-1), win.std(axis=0)])


def _decode(data: bytes, gray: bool = False) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("L" if gray else "RGB"))


def _part(sample: dict[str, Any], name: str) -> bytes | None:
    for ext in ("jpg", "png", "jpeg", "webp"):
        if f"{name}.{ext}" in sample:
            return sample[f"{name}.{ext}"]
    return None


# -- sampling and reading -------------------------------------------------------------------------
def _read_config(vdir: Path) -> dict[str, Any]:
    p = vdir / CONFIG
    return yaml.safe_load(p.read_text()) if p.exists() else {}


def _chosen(keys: list[str], n: int, seed: int) -> list[str]:
    rank = sorted(keys, key=lambda k: (hashlib.sha256(f"{seed}:{k}".encode()).hexdigest(), k))
    return sorted(rank[:n])


def _read_samples(vdir: Path, wanted: set[str], shard_names: set[str]) -> dict[str, dict[str, Any]]:
    """The wanted samples, read with the safe shard reader (shards.json, member checks); from
    ``shards``, not ``loader``, which imports torch (seconds at publish)."""
    from counterfactory.shards import read_shard, resolve_shards

    shards, _ = resolve_shards(str(vdir))
    out: dict[str, dict[str, Any]] = {}
    for sh in shards:
        if sh.url.rsplit("/", 1)[-1] not in shard_names:
            continue
        for s in read_shard(sh):
            if s["__key__"] in wanted:
                out[s["__key__"]] = s
    return out


# -- (a) detectability -------------------------------------------------------------------------------
def _probe(pairs: list[dict[str, Any]], folds: int, grid: int) -> dict[str, Any]:
    """Cross-validated AUC of orig-vs-variant from image features, and how well the window
    probe's heat map finds the edit."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GroupKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    n = len(pairs)
    if n < _MIN_PAIRS:
        return {"pairs": n, "auc": None, "note": f"fewer than {_MIN_PAIRS} pairs"}
    k = min(folds, n)
    x = np.stack([f for p in pairs for f in (p["orig_img"], p["cf_img"])])
    y = np.tile([0, 1], n)
    groups = np.repeat(np.arange(n), 2)

    def model() -> Any:
        return make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=5000))

    prob = cross_val_predict(model(), x, y, groups=groups, cv=GroupKFold(k), method="predict_proba")[:, 1]
    out: dict[str, Any] = {"pairs": n, "auc": round(float(roc_auc_score(y, prob)), 4)}
    # window heat map: every window labelled with its image's label; windows the edit left
    # alone look the same in both images, so only edited windows can score high
    w = grid * grid
    xw = np.concatenate([f for p in pairs for f in (p["orig_win"], p["cf_win"])])
    yw = np.tile(np.repeat([0, 1], w), n)
    gw = np.repeat(np.arange(n), 2 * w)
    pw = cross_val_predict(model(), xw, yw, groups=gw, cv=GroupKFold(k), method="predict_proba")[:, 1]
    hits, chance, ious = [], [], []
    for i, p in enumerate(pairs):
        cover = p.get("cover")
        if cover is None or not cover.any():
            continue
        heat = pw[(2 * i + 1) * w:(2 * i + 2) * w]
        hits.append(bool(cover[int(np.argmax(heat))] > 0))
        chance.append(float((cover > 0).mean()))
        edited = cover >= 0.5 if (cover >= 0.5).any() else cover > 0
        top = np.zeros(w, bool)
        top[np.argsort(-heat, kind="stable")[:int(edited.sum())]] = True
        ious.append(float((top & edited).sum() / (top | edited).sum()))
    if hits:
        out["heatmap"] = {"scored": len(hits), "top_window_hit_rate": round(float(np.mean(hits)), 4),
                          "chance_hit_rate": round(float(np.mean(chance)), 4),
                          "top_k_iou": round(float(np.mean(ious)), 4)}
    return out


# -- (b) blind answerers -----------------------------------------------------------------------------
def _blind(rows: list[dict[str, Any]], variants: list[str], folds: int) -> dict[str, dict[str, Any]]:
    """rows: {"g": sample number, "v": image, "q": question, "k": kind, "a": answer, "orig": answer}."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold

    groups = np.array([r["g"] for r in rows])
    k = min(folds, len(set(groups.tolist())))
    pooled_text = [None] * len(rows)
    pooled_major = [None] * len(rows)

    texts = [r["q"] + " kind_" + r["k"] for r in rows]

    def fit_predict(train: list[int], test: list[int], out: list[Any]) -> None:
        ys = [rows[i]["a"] for i in train]
        if len(set(ys)) == 1:
            for i in test:
                out[i] = ys[0]
            return
        vec, xt, (ty, tw) = _tfidf_weighted([texts[i] for i in train], ys)
        clf = LogisticRegression(C=10.0, max_iter=5000).fit(xt, ty, sample_weight=tw)
        uniq = list(dict.fromkeys(texts[j] for j in test))
        pred = dict(zip(uniq, clf.predict(vec(uniq)), strict=True))
        for i in test:
            out[i] = pred[texts[i]]

    if k >= 2:
        for tr, te in GroupKFold(k).split(np.zeros(len(rows)), groups=groups):
            tr, te = tr.tolist(), te.tolist()
            fit_predict(tr, te, pooled_text)
            by_kind: dict[str, Counter[str]] = defaultdict(Counter)
            for i in tr:
                by_kind[rows[i]["k"]][rows[i]["a"]] += 1
            overall = Counter(rows[i]["a"] for i in tr)
            for i in te:
                c = by_kind.get(rows[i]["k"]) or overall
                pooled_major[i] = sorted(c.items(), key=lambda t: (-t[1], t[0]))[0][0]
    out: dict[str, dict[str, Any]] = {}
    for v in ["orig", *variants]:
        idx = [i for i, r in enumerate(rows) if r["v"] == v]
        if not idx:
            continue

        def acc(pred: list[Any], idx: list[int] = idx) -> float | None:
            got = [pred[i] == rows[i]["a"] for i in idx if pred[i] is not None]
            return round(float(np.mean(got)), 4) if got else None

        res: dict[str, Any] = {"rows": len(idx),
                               "original_answer": round(float(np.mean([rows[i]["a"] == rows[i]["orig"] for i in idx])), 4),
                               "majority_per_kind": acc(pooled_major), "text_only": acc(pooled_text)}
        # the same text classifier trained on this variant's rows alone: what spotting the edit buys
        gv = groups[idx]
        kv = min(folds, len(set(gv.tolist())))
        if kv >= 2:
            per_v: list[Any] = [None] * len(rows)
            for tr, te in GroupKFold(kv).split(np.zeros(len(idx)), groups=gv):
                fit_predict([idx[i] for i in tr], [idx[i] for i in te], per_v)
            res["text_given_variant"] = acc(per_v)
        out[v] = res
    return out


def _tfidf_weighted(texts: list[str], ys: list[Any]) -> tuple[Any, Any, tuple[list[Any], np.ndarray]]:
    """``TfidfVectorizer(ngram_range=(1, 2))`` fitted on ``texts``, with the rows of identical
    (text, answer) merged into one row weighted by its count: the questions are templated, so
    ~1,300 rows per variant are a few dozen distinct ones. The idf counts every row, so the
    matrix rows are the vectorizer's; and logistic regression's objective (per-sample losses
    summed with their weights, over the weight total) is the one of the repeated rows, at a
    fraction of the cost (issue 27: the blind answerers were 40 % of the audit).
    Returns (transform of a list of texts, the merged rows' matrix, (their answers, weights))."""
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.preprocessing import normalize

    mult = Counter(texts)
    uniq = list(mult)
    cv = CountVectorizer(ngram_range=(1, 2), lowercase=True)
    counts = cv.fit_transform(uniq)
    # TfidfTransformer's smooth idf: ln((1 + n) / (1 + df)) + 1, df over every (repeated) row
    df = (counts > 0).T.astype(np.float64) @ np.array([mult[t] for t in uniq], np.float64)
    idf = np.log(float(len(texts) + 1) / (np.asarray(df).ravel() + 1)) + 1.0

    def vec(batch: list[str]) -> Any:
        x = cv.transform(batch).astype(np.float64).tocsr()
        x.data *= idf[x.indices]
        return normalize(x, norm="l2", copy=False)

    pairs = Counter(zip(texts, ys, strict=True))
    keys = list(pairs)
    row = {t: i for i, t in enumerate(uniq)}
    x = vec(uniq)[[row[t] for t, _ in keys]]
    return vec, x, ([a for _, a in keys], np.array([pairs[k] for k in keys], np.float64))


# -- (d) presupposition -------------------------------------------------------------------------------
def presupposing(doc: dict[str, Any], abstain: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(finding, image, item) for one sample's JSON: ``on_original`` (an attribute question
    about an object the original does not show), ``answered_on_absent`` (answered with anything
    but the abstention on a variant without its object), ``abstained_on_absent`` (the rule:
    DeFacto's abstention), ``orig_abstain_on_present`` ("unknown" on an original that shows it).
    Presence comes from the item's targets and the edit records (``qa.subject_present``)."""
    out = []
    for it in doc.get("qa", []):
        for v, a in sorted(it["answers"].items()):
            if v != "orig" and v not in doc.get("edits", {}):
                continue
            present = subject_present(it, doc, v)
            if v == "orig" and present and a == abstain:
                out.append(("orig_abstain_on_present", v, it))
            if it["kind"] not in PRESUPPOSING_KINDS or present:
                continue
            what = "on_original" if v == "orig" else "answered_on_absent" if a != abstain else "abstained_on_absent"
            out.append((what, v, it))
    return out


# -- the audit ----------------------------------------------------------------------------------------
def audit_version(version_dir: str | Path, settings: AuditConfig | dict[str, Any] | None = None) -> dict[str, Any]:
    """The shortcut audit of one version folder (or a staging folder about to be published).

    ``settings``: an ``AuditConfig`` (or its dict); default: the ``audit:`` section of the
    version's ``config.yaml``. Returns a JSON-able dict: ``detectability``, ``blind``,
    ``balance``, ``presupposition`` (all per variant where it applies), ``thresholds``,
    ``warnings`` (one line each; empty when the dataset is under every threshold), ``cost``."""
    t0 = time.perf_counter()
    vdir = Path(version_dir)
    cfg = _read_config(vdir)
    if settings is None:
        settings = cfg.get("audit") or {}
    s = settings if isinstance(settings, AuditConfig) else AuditConfig.model_validate(settings)
    abstain = cfg.get("abstain_answer", "unknown")
    index = read_parquet(vdir / INDEX, columns=["key", "shard", "variants", "questions",
                                                          "question_kinds", "answers"]).to_pylist()
    variants_all = sorted({v for r in index for v in r["variants"]})

    # (c) label balance: every row of the index (no image is read for it)
    balance: dict[str, Any] = {}
    per_v: dict[str, Counter[str]] = defaultdict(Counter)
    per_vk: dict[str, dict[str, Counter[str]]] = defaultdict(lambda: defaultdict(Counter))
    for r in index:
        for kind, ans in zip(r["question_kinds"], answers_of(r["answers"]), strict=True):
            for v, a in ans.items():
                per_v[v][a] += 1
                per_vk[v][kind][a] += 1
    for v in ["orig", *variants_all]:
        n = sum(per_v[v].values())
        if n:
            balance[v] = {"rows": n, "abstain_share": round(per_v[v][abstain] / n, 4),
                          "answers": {k: dict(sorted(c.most_common(6), key=lambda t: (-t[1], t[0])))
                                      for k, c in sorted(per_vk[v].items())}}

    chosen = _chosen([r["key"] for r in index], s.sample_pairs, s.seed)
    by_key = {r["key"]: r for r in index}
    samples = _read_samples(vdir, set(chosen), {by_key[k]["shard"] for k in chosen}) if chosen else {}

    pairs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    rows: list[dict[str, Any]] = []
    pres = Counter()
    examples: list[str] = []
    exhaustive = Counter()
    images = 0
    for g, key in enumerate(chosen):
        smp = samples.get(key)
        if smp is None:
            continue
        doc = smp["json"]  # read_shard parses it
        ex = doc.get("source", {}).get("exhaustive")
        exhaustive["all categories" if ex == "*" else "listed categories" if ex else
                   "none" if ex == [] else "not recorded"] += 1
        for it in doc["qa"]:
            for v, a in sorted(it["answers"].items()):
                rows.append({"g": g, "v": v, "q": it["question"], "k": it["kind"], "a": a,
                             "orig": it["answers"]["orig"]})
        for what, v, it in presupposing(doc, abstain):
            pres[what] += 1
            if what in ("on_original", "answered_on_absent") and len(examples) < 5:
                examples.append(f"{key} {v}: {it['question']!r} -> {it['answers'][v]!r}")
        orig_data = _part(smp, "orig")
        if orig_data is None:  # a clip: the image probe does not apply
            continue
        orig = _decode(orig_data)
        images += 1
        ow = window_features(orig, s.grid)
        of = image_features(ow)
        for v in doc["variants"]:
            data = _part(smp, v)
            if data is None:
                continue
            cf = _decode(data)
            images += 1
            if cf.shape != orig.shape:
                continue
            cw = window_features(cf, s.grid)
            # the region the edit changed: its own mask, the control's, else the evidence's
            region = doc["edits"].get(v, {}).get("region")
            mask_data = None if region == "global" else (
                _part(smp, f"{v}_mask") or (_part(smp, "control_mask") if region == "control" else None)
                or _part(smp, "mask"))
            cover = None
            if mask_data is not None:
                cover = _cells((_decode(mask_data, gray=True) > 0).astype(np.float32), s.grid).reshape(-1)
            pairs[v].append({"orig_img": of, "cf_img": image_features(cw), "orig_win": ow, "cf_win": cw,
                             "cover": cover})

    detect = {v: _probe(pairs[v], s.folds, s.grid) for v in sorted(pairs)}
    blind = _blind(rows, variants_all, s.folds) if rows else {}
    presupposition = {"questions_checked": sum(1 for r in rows if r["v"] == "orig"),
                      "on_original": pres["on_original"], "answered_on_absent": pres["answered_on_absent"],
                      "abstained_on_absent": pres["abstained_on_absent"],
                      "orig_abstain_on_present": pres["orig_abstain_on_present"], "examples": examples}
    thresholds = s.model_dump(mode="json")
    warnings = _warnings(s, detect, blind, balance, presupposition)
    return {
        "format": FORMAT,
        "sample": {"samples": len(index), "audited": len(samples), "seed": s.seed,
                   "exhaustive_annotations": dict(sorted(exhaustive.items()))},
        "detectability": detect,
        "blind": blind,
        "balance": balance,
        "presupposition": presupposition,
        "thresholds": thresholds,
        "warnings": warnings,
        "cost": {"images_decoded": images, "seconds": round(time.perf_counter() - t0, 1)},
    }


def _all_abstain(v: str) -> bool:
    rules = ANSWER_RULES.get(v)
    return bool(rules) and all(r == "abstain" for k, r in rules.items())


def _warnings(s: AuditConfig, detect: dict[str, Any], blind: dict[str, Any], balance: dict[str, Any],
              pres: dict[str, Any]) -> list[str]:
    out = []
    for v, d in sorted(detect.items()):
        if v not in s.probe_exempt and d.get("auc") is not None and d["auc"] > s.max_probe_auc:
            out.append(f"{v}: a probe on image statistics tells it from the original (AUC {d['auc']:.2f} > "
                       f"{s.max_probe_auc})")
    for v, b in sorted(blind.items()):
        if v == "orig" or v in CONTROLS:  # their answers are the original's by design
            continue
        for name in ("original_answer", "majority_per_kind", "text_only"):
            val = b.get(name)
            if val is not None and val > s.max_blind_accuracy:
                out.append(f"{v}: blind answerer '{name}' is right {100 * val:.0f}% of the time "
                           f"(> {100 * s.max_blind_accuracy:.0f}%)")
    for v, b in sorted(balance.items()):
        if v != "orig" and not _all_abstain(v) and b["abstain_share"] > s.max_abstain_share:
            out.append(f"{v}: {100 * b['abstain_share']:.0f}% of answers are abstentions "
                       f"(> {100 * s.max_abstain_share:.0f}%)")
    bad = pres["on_original"] + pres["answered_on_absent"]
    if bad > s.max_presupposing:
        out.append(f"{bad} question(s) about an object absent from the image they are asked of "
                   f"(> {s.max_presupposing})")
    if pres["orig_abstain_on_present"]:
        out.append(f"{pres['orig_abstain_on_present']} question(s) abstain on an original that shows their object")
    return out


# -- rendering -------------------------------------------------------------------------------------------
def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def render_markdown(a: dict[str, Any]) -> str:
    """The card's audit section (markdown tables; values are numbers and variant names)."""
    if not a:
        return "_not computed (audit.sample_pairs: 0)_"
    lines = [f"Audited {a['sample']['audited']} of {a['sample']['samples']} samples "
             f"(seed {a['sample']['seed']}; {a['cost']['images_decoded']} images decoded; its time is under "
             "Time per stage). Exhaustive annotations (absence asserted only for these): "
             + (", ".join(f"{k} {n}" for k, n in a["sample"]["exhaustive_annotations"].items()) or "-") + ".", ""]
    if a["warnings"]:
        lines += ["**Warnings** (over the config's `audit:` thresholds):", ""]
        lines += [f"- {w}" for w in a["warnings"]] + [""]
    else:
        lines += ["Under every threshold of the config's `audit:` section.", ""]
    variants = sorted(set(a["detectability"]) | set(a["blind"]) - {"orig"})
    head = ["variant", "probe AUC", "heat map hit (chance)", "top-k IoU", "blind: orig answer",
            "blind: majority/kind", "blind: text only", "text given variant", "abstain share"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in ["orig", *variants]:
        d, b, bal = a["detectability"].get(v, {}), a["blind"].get(v, {}), a["balance"].get(v, {})
        h = d.get("heatmap", {})
        auc = "-" if d.get("auc") is None else f"{d['auc']:.2f}"
        hit = f"{_pct(h['top_window_hit_rate'])} ({_pct(h['chance_hit_rate'])})" if h else "-"
        iou = f"{h['top_k_iou']:.2f}" if h else "-"
        lines.append("| " + " | ".join([v, auc, hit, iou, _pct(b.get("original_answer")),
                                        _pct(b.get("majority_per_kind")), _pct(b.get("text_only")),
                                        _pct(b.get("text_given_variant")), _pct(bal.get("abstain_share"))]) + " |")
    p = a["presupposition"]
    lines += ["", f"Presupposition ({p['questions_checked']} questions): {p['on_original']} about an object the "
              f"original does not show, {p['answered_on_absent']} answered on a variant without their object, "
              f"{p['abstained_on_absent']} abstain there (the rule), {p['orig_abstain_on_present']} abstain on an "
              "original that shows their object."]
    return "\n".join(lines)


def summary_lines(a: dict[str, Any]) -> list[str]:
    """Short lines for the command line."""
    secs = a["cost"].get("seconds")
    out = [f"audited {a['sample']['audited']} of {a['sample']['samples']} samples"
           + (f" in {secs} s" if secs is not None else "")]
    for v in sorted(set(a["detectability"]) | set(a["blind"])):
        d, b = a["detectability"].get(v, {}), a["blind"].get(v, {})
        auc = "-" if d.get("auc") is None else f"{d['auc']:.2f}"
        out.append(f"  {v}: probe AUC {auc}, blind orig/majority/text {_pct(b.get('original_answer'))}/"
                   f"{_pct(b.get('majority_per_kind'))}/{_pct(b.get('text_only'))}, abstain "
                   f"{_pct(a['balance'].get(v, {}).get('abstain_share'))}")
    p = a["presupposition"]
    out.append(f"  presupposing: {p['on_original']} on originals, {p['answered_on_absent']} answered on variants")
    out += [f"warning: {w}" for w in a["warnings"]]
    return out
