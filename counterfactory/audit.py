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

Deterministic: the sample is the keys whose sha256(seed:key) falls under a cut that gives
``sample_pairs`` of the planned inputs in expectation (``audit_features.AuditSample``: decided
per sample, so the writers compute its image statistics in the stream), taken in key order;
folds are unshuffled; the solvers are deterministic. Card files and the features (``audit/``)
are outside the manifest, so the audit never changes a content id. Cost at publish: the index
once, one small features file per shard that holds sampled keys, and small linear models; the
decodes and OpenCV filters (two per pair) ran on the workers (``cost``: seconds here and summed
in the stream). A version without features (older, or ``from_shards``) is read from its shards.

One module (~610 lines) because the four measures share one sample and one result; the image
statistics live in ``audit_features``; the markdown and command-line renderings sit at its end.
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from counterfactory.audit_config import AuditConfig
from counterfactory.audit_features import (  # noqa: F401 - window_features & co: the audit's API
    WINDOW_FEATURES,
    AuditSample,
    _cells,
    image_features,
    image_features_many,
    presupposing,
    read_features,
    sample_record,
    window_features,
)
from counterfactory.index import answers_of
from counterfactory.layout import CONFIG, INDEX, MANIFEST
from counterfactory.publish import FailureBudgetExceeded
from counterfactory.rules import ANSWER_RULES
from counterfactory.stages.verify import CONTROLS
from counterfactory.storage import read_parquet

FORMAT = "counterfactory-audit/2"
_STATS = ("min", "p10", "p50", "p90", "max", "std")
_MAX_EXAMPLES = 5  # presupposing questions quoted in the result
_MIN_PAIRS = 6  # fewer pairs of a variant: no probe (a 2-fold AUC of 4 pairs says nothing)
# the probes' solver: Newton steps with a Cholesky solve (13 or 78 standardized features, a few
# hundred to ~30,000 rows): ~6 iterations where lbfgs took 15-50, at half the CPU; the same
# strictly convex objective, so the figures move only within lbfgs's tolerance (issue 27: AUCs by
# <= 3e-4 on the bench's 252 sampled samples)
_PROBE_SOLVER = "newton-cholesky"
_DENSE_CELLS = 1 << 21  # a TF-IDF matrix up to this many cells (16 MiB) is fitted dense


class AuditFailed(FailureBudgetExceeded):
    """A dataset over the audit's thresholds with ``refuse_on_audit`` (``run --strict``): exit 3,
    nothing published."""


# -- the sample and its statistics (counterfactory.audit_features) ------------------------------------
def _read_config(vdir: Path) -> dict[str, Any]:
    p = vdir / CONFIG
    return yaml.safe_load(p.read_text()) if p.exists() else {}


def _records_from_shards(vdir: Path, by_shard: dict[str, set[str]], sample: AuditSample) -> list[dict[str, Any]]:
    """The old path, for shards without a features file (a version written before features were
    computed in the stream, or a file lost): their wanted samples read with the safe shard reader
    (shards.json, member checks; ``shards``, not ``loader``, which imports torch) and computed by
    the same ``sample_record`` the writers run."""
    from counterfactory.shards import read_shard, resolve_shards

    shards, _ = resolve_shards(str(vdir))
    out = []
    for sh in shards:
        wanted = by_shard.get(sh.url.rsplit("/", 1)[-1])
        if not wanted:
            continue
        for smp in read_shard(sh):
            if smp["__key__"] in wanted:
                out.append(sample_record(smp["__key__"], smp["json"], smp, sample.grid, sample.abstain))
    return out


def sample_records(vdir: Path, by_shard: dict[str, set[str]], sample: AuditSample,
                   from_shards: bool = False) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """The records of the sampled keys (``{shard: keys}``): from each shard's features file
    (computed in the stream), else from the shard itself (``from_shards`` forces that: the
    equality test). Returns (records by key, where they came from and their in-stream seconds)."""
    out: dict[str, dict[str, Any]] = {}
    how = {"stream_samples": 0, "shard_samples": 0, "stream_seconds": 0.0}
    missing: dict[str, set[str]] = {}
    for shard, keys in sorted(by_shard.items()):
        got = None if from_shards else read_features(vdir, shard, sample)
        if got is None or not keys <= {r["key"] for r in got[0]}:
            missing[shard] = keys
            continue
        out.update((r["key"], r) for r in got[0] if r["key"] in keys)
        how["stream_samples"] += len(keys)
        how["stream_seconds"] += got[1]
    if missing:
        recs = _records_from_shards(vdir, missing, sample)
        out.update((r["key"], r) for r in recs)
        how["shard_samples"] = len(recs)
    return out, how


# -- (a) detectability -------------------------------------------------------------------------------
def _probe(pairs: list[dict[str, Any]], folds: int, grid: int) -> dict[str, Any]:
    """Cross-validated AUC of orig-vs-variant from image features, and how well the window
    probe's heat map finds the edit."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    n = len(pairs)
    if n < _MIN_PAIRS:
        return {"pairs": n, "auc": None, "note": f"fewer than {_MIN_PAIRS} pairs"}
    k = min(folds, n)
    x = np.stack([f for p in pairs for f in (p["orig_img"], p["cf_img"])])
    y = np.tile([0, 1], n)
    groups = np.repeat(np.arange(n), 2)

    def cv_proba(x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> np.ndarray:
        # cross_val_predict's folds and fits, without its per-call machinery (clone, joblib
        # dispatch, label encoding, the permutation check). One model through the folds, each fit
        # starting at the previous fold's coefficients (warm_start; the folds share most rows):
        # the same strictly convex optimum, ~2 Newton steps fewer (issue 27, session 6: AUCs
        # move by ~1e-4, within the solver's tolerance)
        model = make_pipeline(StandardScaler(),
                              LogisticRegression(C=1.0, max_iter=5000, solver=_PROBE_SOLVER, warm_start=True))
        out = np.empty(len(y))
        for tr, te in GroupKFold(k).split(x, y, groups):
            out[te] = model.fit(x[tr], y[tr]).predict_proba(x[te])[:, 1]
        return out

    prob = cv_proba(x, y, groups)
    out: dict[str, Any] = {"pairs": n, "auc": round(float(roc_auc_score(y, prob)), 4)}
    # window heat map: every window labelled with its image's label; windows the edit left
    # alone look the same in both images, so only edited windows can score high
    w = grid * grid
    xw = np.concatenate([f for p in pairs for f in (p["orig_win"], p["cf_win"])])
    yw = np.tile(np.repeat([0, 1], w), n)
    gw = np.repeat(np.arange(n), 2 * w)
    pw = cv_proba(xw, yw, gw)
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
    from sklearn.model_selection import GroupKFold

    groups = np.array([r["g"] for r in rows])
    k = min(folds, len(set(groups.tolist())))
    pooled_text = [None] * len(rows)
    pooled_major = [None] * len(rows)

    texts = [r["q"] + " kind_" + r["k"] for r in rows]
    terms = _TermCounts(texts)  # tokenized once: every fold's vectorizer is a column subset of it

    fitted: dict[tuple[tuple[str, Any], ...], tuple[Any, Any]] = {}
    last: list[Any] = [None]  # the cross-validation loop's previous fit: where the next one starts

    def fit_predict(train: list[int], test: list[int], out: list[Any]) -> None:
        ys = [rows[i]["a"] for i in train]
        if len(set(ys)) == 1:
            for i in test:
                out[i] = ys[0]
            return
        # the same training rows, the same classifier: a variant whose answers are the original's
        # (random_mask) on the same folds is fitted once
        seen = tuple(zip((texts[i] for i in train), ys, strict=True))
        if seen not in fitted:
            vec, xt, (ty, tw) = _tfidf_weighted([texts[i] for i in train], ys, terms)
            fitted[seen] = (vec, _fit_answerer(_small_dense(xt), ty, tw, last[0], vec.cols))
        vec, clf = fitted[seen]
        last[0] = (clf.classes_.tolist(), vec.cols, clf.coef_, clf.intercept_)
        uniq = list(dict.fromkeys(texts[j] for j in test))
        pred = dict(zip(uniq, clf.predict(_small_dense(vec(uniq))), strict=True))
        for i in test:
            out[i] = pred[texts[i]]

    if k >= 2:
        last[0] = None
        for tr, te in GroupKFold(k).split(np.zeros(len(rows)), groups=groups):
            tr, te = tr.tolist(), te.tolist()
            fit_predict(tr, te, pooled_text)
            by_kind: dict[str, Counter[str]] = defaultdict(Counter)
            for i in tr:
                by_kind[rows[i]["k"]][rows[i]["a"]] += 1
            overall = Counter(rows[i]["a"] for i in tr)
            # each kind's majority once per fold (the most frequent answer, ties by name)
            major = {kind: min(c.items(), key=lambda t: (-t[1], t[0]))[0] for kind, c in by_kind.items()}
            fallback = min(overall.items(), key=lambda t: (-t[1], t[0]))[0] if overall else None
            for i in te:
                pooled_major[i] = major.get(rows[i]["k"], fallback)
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
            last[0] = None
            for tr, te in GroupKFold(kv).split(np.zeros(len(idx)), groups=gv):
                fit_predict([idx[i] for i in tr], [idx[i] for i in te], per_v)
            res["text_given_variant"] = acc(per_v)
        out[v] = res
    return out


def _fit_answerer(x: Any, ty: list[Any], tw: np.ndarray, prev: Any, cols: np.ndarray) -> Any:
    """A blind answerer fitted on (x, ty) with weights tw, started at the previous fold's fit
    (``_warm_coef``) where it maps onto this one. The start only saves iterations: whatever goes
    wrong with it (an answer set or a start scikit-learn refuses) is a cold fit, never a lost audit."""
    from sklearn.linear_model import LogisticRegression

    try:
        init = _warm_coef(prev, sorted(set(ty)), cols)
        if init is not None:
            clf = LogisticRegression(C=10.0, max_iter=5000, warm_start=True)
            clf.coef_, clf.intercept_ = init
            return clf.fit(x, ty, sample_weight=tw)
    except Exception:  # noqa: BLE001 - see the docstring: an error of the data itself is raised below
        pass
    return LogisticRegression(C=10.0, max_iter=5000).fit(x, ty, sample_weight=tw)


def _warm_coef(prev: Any, classes: list[Any], cols: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Where a blind answerer's fit starts: the previous fold's coefficients (``(classes, term
    columns, coef_, intercept_)``) laid out by answer and term for this fit's answers and terms,
    0 for an answer or a term it did not have; None (a cold start) without a previous fit or when
    one is binary and the other not. The folds' training rows overlap by (k-2)/(k-1), so lbfgs
    starts near this fit's optimum: ~30 % fewer iterations (issue 27, session 6). The optimum is
    the same strictly convex one; lbfgs stops within its tolerance of it from either start, so an
    accuracy can move by a row or two where two answers' scores are within that tolerance."""
    if prev is None:
        return None
    p_classes, p_cols, p_coef, p_int = prev
    binary = len(classes) == 2
    if binary != (len(p_classes) == 2) or (binary and list(p_classes) != list(classes)):
        return None
    where = {int(t): j for j, t in enumerate(p_cols)}
    src = np.array([where.get(int(t), -1) for t in cols], np.int64)
    have = src >= 0
    row = {c: i for i, c in enumerate(p_classes)}
    coef = np.zeros((1 if binary else len(classes), len(cols)))
    icpt = np.zeros(coef.shape[0])
    for r, c in enumerate([classes[1]] if binary else classes):
        i = 0 if binary else row.get(c)
        if i is not None:
            coef[r, have] = p_coef[i, src[have]]
            icpt[r] = p_int[i]
    return coef, icpt


def _small_dense(x: Any) -> Any:
    """A small sparse matrix as a dense array: the merged TF-IDF rows are a few hundred by a few
    hundred, where scipy.sparse's per-iteration products and transposes cost lbfgs more than the
    arithmetic (issue 27: the blind answerers' fits -15 %; the same objective, summed in another
    order; the same accuracies on the bench's and the demo's samples)."""
    return x.toarray() if x.shape[0] * x.shape[1] <= _DENSE_CELLS else x


class _TermCounts:
    """``CountVectorizer(ngram_range=(1, 2))`` fitted once on every text of the blind answerers'
    rows. A vectorizer fitted on a subset of them has the subset's terms as its vocabulary, in the
    same (sorted) order: its count matrix is this one's rows and the columns of the terms the
    subset holds, integer for integer. So each fold's vectorizer is a column selection, not a new
    tokenization of its texts (issue 27: ~25 % of the blind answerers' CPU); the same matrices."""

    def __init__(self, texts: list[str]) -> None:
        from sklearn.feature_extraction.text import CountVectorizer

        self.row = {t: i for i, t in enumerate(dict.fromkeys(texts))}
        self.cv = CountVectorizer(ngram_range=(1, 2), lowercase=True)
        self.counts = self.cv.fit_transform(list(self.row)).tocsr()

    def __call__(self, batch: list[str]) -> Any:
        """Counts of ``batch`` over every term (a text not fitted on: transformed on its own)."""
        if all(t in self.row for t in batch):
            return self.counts[[self.row[t] for t in batch]]
        return self.cv.transform(batch).tocsr()


def _tfidf_weighted(texts: list[str], ys: list[Any],
                    terms: _TermCounts | None = None) -> tuple[Any, Any, tuple[list[Any], np.ndarray]]:
    """``TfidfVectorizer(ngram_range=(1, 2))`` fitted on ``texts``, with the rows of identical
    (text, answer) merged into one row weighted by its count: the questions are templated, so
    ~1,300 rows per variant are a few dozen distinct ones. The idf counts every row, so the
    matrix rows are the vectorizer's; and logistic regression's objective (per-sample losses
    summed with their weights, over the weight total) is the one of the repeated rows, at a
    fraction of the cost (issue 27: the blind answerers were 40 % of the audit).
    Returns (transform of a list of texts, the merged rows' matrix, (their answers, weights)).
    ``terms``: the counts of a superset of ``texts`` (``_TermCounts``; default: fitted on these)."""
    from sklearn.preprocessing import normalize

    mult = Counter(texts)
    uniq = list(mult)
    terms = terms or _TermCounts(uniq)
    counts = terms(uniq)
    # the vocabulary a vectorizer fitted on ``texts`` would have: the terms they hold
    cols = np.flatnonzero(np.diff(counts.tocsc().indptr))
    counts = counts[:, cols]
    # TfidfTransformer's smooth idf: ln((1 + n) / (1 + df)) + 1, df over every (repeated) row
    df = (counts > 0).T.astype(np.float64) @ np.array([mult[t] for t in uniq], np.float64)
    idf = np.log(float(len(texts) + 1) / (np.asarray(df).ravel() + 1)) + 1.0

    def vec(batch: list[str]) -> Any:
        x = terms(batch)[:, cols].astype(np.float64).tocsr()
        x.sort_indices()
        x.data *= idf[x.indices]
        return normalize(x, norm="l2", copy=False)

    vec.cols = cols  # type: ignore[attr-defined] - which of ``terms``' columns its features are

    pairs = Counter(zip(texts, ys, strict=True))
    keys = list(pairs)
    row = {t: i for i, t in enumerate(uniq)}
    x = vec(uniq)[[row[t] for t, _ in keys]]
    return vec, x, ([a for _, a in keys], np.array([pairs[k] for k in keys], np.float64))


# -- the audit ----------------------------------------------------------------------------------------
def audit_version(version_dir: str | Path, settings: AuditConfig | dict[str, Any] | None = None, *,
                  from_shards: bool = False) -> dict[str, Any]:
    """The shortcut audit of one version folder (or a staging folder about to be published).

    ``settings``: an ``AuditConfig`` (or its dict); default: the ``audit:`` section of the
    version's ``config.yaml``. The sample: the index's keys under the hash cut of
    ``audit_features.AuditSample`` (``sample_pairs`` of the manifest's inputs in expectation).
    Its image statistics come from the features the writers computed in the stream
    (``audit/*.npz``), else (``from_shards``, an older version, settings other than the run's)
    from the shards. Returns a JSON-able dict: ``detectability``, ``blind``, ``balance``,
    ``presupposition`` (all per variant where it applies), ``thresholds``, ``warnings`` (one line
    each; empty when the dataset is under every threshold), ``cost``."""
    t0 = time.perf_counter()
    vdir = Path(version_dir)
    cfg = _read_config(vdir)
    if settings is None:
        settings = cfg.get("audit") or {}
    s = settings if isinstance(settings, AuditConfig) else AuditConfig.model_validate(settings)
    abstain = cfg.get("abstain_answer", "unknown")
    n_inputs = json.loads((vdir / MANIFEST).read_bytes())["counts"]["inputs"]
    sample = AuditSample(seed=s.seed, sample_pairs=s.sample_pairs, n_inputs=n_inputs, grid=s.grid, abstain=abstain)

    # one pass over the index, a batch of rows at a time: (c) label balance from every row (no
    # image is read for it), and only the sampled rows kept (the index is never held as rows)
    table = read_parquet(vdir / INDEX, columns=["key", "shard", "variants", "questions", "question_kinds", "answers"])
    n_rows = table.num_rows
    variant_set: set[str] = set()
    by_key: dict[str, dict[str, Any]] = {}
    balance: dict[str, Any] = {}
    per_v: dict[str, Counter[str]] = defaultdict(Counter)
    per_vk: dict[str, dict[str, Counter[str]]] = defaultdict(lambda: defaultdict(Counter))
    for batch in table.to_batches(max_chunksize=4096):
        for r in batch.to_pylist():
            variant_set.update(r["variants"])
            r["answers"] = answers_of(r["answers"])
            for kind, ans in zip(r["question_kinds"], r["answers"], strict=True):
                for v, a in ans.items():
                    per_v[v][a] += 1
                    per_vk[v][kind][a] += 1
            if s.sample_pairs and sample.wants(r["key"]):
                by_key[r["key"]] = r
    del table
    variants_all = sorted(variant_set)
    for v in ["orig", *variants_all]:
        n = sum(per_v[v].values())
        if n:
            balance[v] = {"rows": n, "abstain_share": round(per_v[v][abstain] / n, 4),
                          "answers": {k: dict(sorted(c.most_common(6), key=lambda t: (-t[1], t[0])))
                                      for k, c in sorted(per_vk[v].items())}}
    chosen = sorted(by_key)
    by_shard: dict[str, set[str]] = defaultdict(set)
    for k in chosen:
        by_shard[by_key[k]["shard"]].add(k)
    records, how = sample_records(vdir, by_shard, sample, from_shards)

    pairs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    rows: list[dict[str, Any]] = []
    pres: Counter[str] = Counter()
    examples: list[str] = []
    exhaustive: Counter[str] = Counter()
    images = 0
    wins: list[np.ndarray] = []  # each image's windows once: an original, then its variants
    for g, key in enumerate(chosen):
        rec = records.get(key)
        if rec is None:
            continue
        exhaustive[rec["exhaustive"]] += 1
        # (b) the blind answerers' rows: this sample's questions, from the index
        r = by_key[key]
        for q, kind, ans in zip(r["questions"], r["question_kinds"], r["answers"], strict=True):
            for v, a in sorted(ans.items()):
                rows.append({"g": g, "v": v, "q": q, "k": kind, "a": a, "orig": ans.get("orig")})
        pres.update(rec["presupposition"])
        examples += rec["examples"][:_MAX_EXAMPLES - len(examples)]
        images += rec["images"]
        if rec["orig_win"] is None:  # a clip: the image probe does not apply
            continue
        ow = rec["orig_win"].astype(np.float64)
        wins.append(ow)
        of = len(wins) - 1
        for p in rec["pairs"]:
            cw = p["cf_win"].astype(np.float64)
            wins.append(cw)
            pairs[p["v"]].append({"orig_img": of, "cf_img": len(wins) - 1, "orig_win": ow, "cf_win": cw,
                                  "cover": p["cover"]})
    # every image's summary at once (~1,700 percentile calls were 0.3 s): the same numbers
    img_feats = image_features_many(wins)
    for ps in pairs.values():
        for p in ps:
            p["orig_img"], p["cf_img"] = img_feats[p["orig_img"]], img_feats[p["cf_img"]]

    import sklearn.linear_model  # noqa: F401 - its BLAS and OpenMP libraries loaded before they are limited
    from sklearn import config_context
    from threadpoolctl import threadpool_limits

    # one thread: these fits are small (a few hundred rows), and idle BLAS/OpenMP threads spinning
    # between their calls cost 4x the fits' own CPU (issue 27: 23 -> 5 CPU s at N=300, same figures).
    # The inputs are ours and finite, the parameters fixed here: scikit-learn's per-call finiteness
    # checks and parameter validation (signature inspection per call) are skipped, the same numbers
    with threadpool_limits(limits=1), config_context(assume_finite=True, skip_parameter_validation=True):
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
        "sample": {"samples": n_rows, "audited": len(records), "seed": s.seed, "inputs": n_inputs,
                   "expected": min(s.sample_pairs, n_inputs),
                   "exhaustive_annotations": dict(sorted(exhaustive.items()))},
        "detectability": detect,
        "blind": blind,
        "balance": balance,
        "presupposition": presupposition,
        "thresholds": thresholds,
        "warnings": warnings,
        # seconds: at publish (this call); stream_seconds: the statistics computed on the workers
        # (summed over shards); the sample counts say where each sample's statistics came from
        "cost": {"images_decoded": images, "from_stream": how["stream_samples"], "from_shards": how["shard_samples"],
                 "stream_seconds": round(how["stream_seconds"], 2),
                 "seconds": round(time.perf_counter() - t0, 2)},
    }


def card_audit(version_dir: str | Path, cfg: dict[str, Any]) -> dict[str, Any] | None:
    """The audit as a card carries it: None when the config turns it off (``audit.sample_pairs:
    0``); a failure is the card's warning, not the run's (``error``, one line). Here rather than
    in ``card`` so that the helper process that runs it at publish imports the audit alone."""
    settings = cfg.get("audit") or {}
    if settings.get("sample_pairs", 1) == 0:
        return None
    try:
        return audit_version(version_dir, settings)
    except Exception as exc:  # noqa: BLE001 - a card is still written; the failure is its warning
        msg = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:300]
        return {"error": msg, "warnings": [f"the audit could not be computed ({msg})"],
                "cost": {"seconds": None, "stream_seconds": None}}


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
    smp, cost = a["sample"], a["cost"]
    where = (f"{cost.get('from_stream', 0)} samples' statistics computed in the stream, "
             f"{cost.get('from_shards', 0)} read back from the shards")
    lines = [f"Audited {smp['audited']} of {smp['samples']} samples: a hash sample (seed {smp['seed']}) of "
             f"expected size {smp.get('expected', '-')} of {smp.get('inputs', '-')} inputs; "
             f"{cost['images_decoded']} images decoded ({where}); its time, on the workers (audit_in_stream) and "
             "at publish (audit), is under Time per stage. Exhaustive annotations (absence asserted only for these): "
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
