"""The data card written beside the shards: Hugging Face dataset-card style, every figure taken
from the manifest (which is itself computed from the shards, index and rejects)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from counterfactory.pipeline.config import PipelineConfig
from counterfactory.pipeline.writer import atomic_write
from counterfactory.rules import ANSWER_RULES, QUESTION_KINDS, RULE_TEXT


def rule_table(variants: list[str]) -> str:
    head = "| question kind | " + " | ".join(["orig", *variants]) + " |"
    sep = "|" + "---|" * (len(variants) + 2)
    rows = [f"| {k} | " + " | ".join(RULE_TEXT[ANSWER_RULES[v][k]] for v in ["orig", *variants]) + " |"
            for k in QUESTION_KINDS]
    return "\n".join([head, sep, *rows])


def card_text(manifest: dict[str, Any], cfg: PipelineConfig) -> str:
    c = manifest["counts"]
    variants = list(c["variants"])
    front = {
        "pretty_name": cfg.dataset,
        "task_categories": ["visual-question-answering"],
        "tags": ["counterfactual", "webdataset", "counterfactory"],
        "size_categories": ["n<1K" if c["samples"] < 1000 else "1K<n<10K" if c["samples"] < 10_000 else "10K<n"],
    }
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        f"# {cfg.dataset}", "",
        "Paired counterfactual data made by counterfactory: each sample holds an original image, "
        "variants in which the evidence a question depends on was removed or masked (plus an "
        "equal-area control), the evidence mask, and the same questions answered for every variant.",
        "",
        "## Counts", "",
        "| inputs | samples | rejected inputs | rejected variants | shards |",
        "|---|---|---|---|---|",
        f"| {c['inputs']} | {c['samples']} | {c['rejected_inputs']} | {c['rejected_variants']} | {len(manifest['shards'])} |",
        "",
        "Variants: " + (", ".join(f"{k} {v}" for k, v in c["variants"].items()) or "none"),
        "",
        "Questions by kind: " + (", ".join(f"{k} {v}" for k, v in c["question_kinds"].items()) or "none"),
        "",
        "## Answer rules", "",
        rule_table(variants or ["remove", "blackout", "random_mask"]),
        "",
        f'The abstention answer is "{cfg.abstain_answer}".',
        "",
        "## Rejects (the yield of every filter)", "",
        "| stage | reason | scope | count |", "|---|---|---|---|",
        *[f"| {r['stage']} | {r['reason']} | {r['scope']} | {r['count']} |" for r in manifest["rejects"]],
        "",
        "## Sample layout", "",
        "One WebDataset sample per source and question: `KEY.orig.jpg`, one `KEY.<variant>.jpg` per "
        "variant, `KEY.mask.png` (evidence, dilated), `KEY.control_mask.png` (random_mask region), "
        "`KEY.json` (questions, answers per variant, instances, metrics, provenance).",
        "",
        "## Provenance", "",
        f"- config hash: `{manifest['config_hash']}`",
        f"- seed: {cfg.seed}",
        f"- counterfactory {manifest['package_version']}",
        "- stages: " + ", ".join(f"{s.name}={s.backend}" for s in cfg.stages),
        "- regenerate: `counterfactory run config.yaml` (the resolved config saved beside this card)",
        "",
    ]
    return "\n".join(lines)


def write_card(out_dir: Path, manifest: dict[str, Any], cfg: PipelineConfig) -> None:
    atomic_write(out_dir / "README.md", card_text(manifest, cfg).encode())
