"""The shortcut audit's settings (the ``audit:`` section of a config): a model of its own at the
bottom layer, so ``audit.py`` (below the pipeline) and ``pipeline/config.py`` share it."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class AuditConfig(BaseModel):
    """The shortcut audit computed at publish (``counterfactory.audit``): sample size and the
    thresholds over which the card carries a warning (or, with ``--strict``, nothing is published).
    Part of the spec: other thresholds give another card."""

    model_config = ConfigDict(extra="forbid")

    sample_pairs: int = Field(256, ge=0, description="expected size of the audit's sample (image probe, blind "
                              "answerers, presupposition check): the keys whose sha256(seed:key) falls under the cut "
                              "that keeps this many of the inputs; their statistics are computed in the stream "
                              "(0: audit off)")
    folds: int = Field(5, ge=2, le=20, description="cross-validation folds (grouped by sample)")
    seed: int = 0
    grid: int = Field(8, ge=2, le=32, description="the probe's windows: a grid x grid split of each image")
    max_probe_auc: float = Field(0.9, ge=0.5, le=1.0, description="edit detectability (orig vs variant) over this warns")
    probe_exempt: list[str] = Field(["blackout", "random_mask"], description="variants meant to be seen (DeFacto's "
                                    "masked evidence and its control)")
    max_blind_accuracy: float = Field(0.85, ge=0.0, le=1.0, description="a blind answerer (text or answer prior only) "
                                      "over this on a counterfactual variant warns")
    max_abstain_share: float = Field(0.6, ge=0.0, le=1.0, description="abstentions on a variant whose rules do not "
                                     "abstain on everything, over this share, warn")
    max_presupposing: int = Field(0, ge=0, description="questions about an object absent from the image they are "
                                  "asked of (on an original, or answered on a variant), over this warn")
