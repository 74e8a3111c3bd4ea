"""``counterfactory export``: each format read back by what consumes it (TRL rows through a real
LLaVA processor's chat template on a tiny tokenizer, ``datasets`` reading the parquet with Image
features, LLaVA's and LLaMA-Factory's own checks on their JSON), deterministic bytes, splits by
source image, and the refusals (unknown format, a folder it did not create)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from PIL import Image

from counterfactory import export as X
from counterfactory import versions as V
from counterfactory.index import answers_of
from counterfactory.pipeline.config import load_config
from counterfactory.pipeline.runner import run_pipeline
from tests.conftest import LENIENT_FOOTPRINT, REPO

DEMO = REPO / "configs" / "demo.yaml"


@pytest.fixture(scope="module")
def version(tmp_path_factory: pytest.TempPathFactory) -> V.Version:
    tmp = tmp_path_factory.mktemp("photos")
    cfg = load_config(DEMO, [f"output.root={tmp}", "output.shard_size=4", *LENIENT_FOOTPRINT])
    return V.read_version(run_pipeline(cfg, limit=12, local=True, progress=False).out_dir)


def index(v: V.Version) -> list[dict[str, Any]]:
    return pq.read_table(v.path / "index.parquet").to_pylist()


def images_expected(v: V.Version, keep: list[str] | None = None) -> list[tuple[str, str, list[str]]]:
    """(key, image, answers for that image) in export order."""
    out = []
    for r in index(v):
        answers = answers_of(r["answers"])
        for name in ["orig", *r["variants"]]:
            if keep is None or name in keep:
                out.append((r["key"], name, [str(a[name]) for a in answers]))
    return out


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def tiny_llava_processor(path: Path) -> Any:
    """A real LlavaProcessor (CLIP image processor, a BPE tokenizer trained here, a chat template
    that renders TRL's content parts), saved and loaded back as a user's would be."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        AutoProcessor,
        CLIPImageProcessor,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(["Is there a person in the image? How many? yes no unknown left right USER ASSISTANT"] * 20,
                           trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>", "<image>"],
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    template = ("{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
                "{% endfor %}\n{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    ip = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                   chat_template=template, image_token="<image>", num_additional_image_tokens=1).save_pretrained(path)
    return AutoProcessor.from_pretrained(path)


def test_trl_rows_render_through_a_real_processor(version: V.Version, tmp_path: Path) -> None:
    from datasets import load_dataset

    out = tmp_path / "trl"
    X.export(version, "trl", out)
    ds = load_dataset(str(out), split="train", cache_dir=str(tmp_path / "hf"))
    want = images_expected(version)
    assert [(r["key"], r["variant"]) for r in ds.select_columns(["key", "variant"])] == [(k, n) for k, n, _ in want]
    proc = tiny_llava_processor(tmp_path / "proc")
    image_id = proc.tokenizer.convert_tokens_to_ids("<image>")
    for row, (_, _, answers) in zip(ds.select(range(8)), want, strict=False):
        assert len(row["images"]) == 1 and isinstance(row["images"][0], Image.Image)
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"] * len(answers)
        text = proc.apply_chat_template(row["messages"], tokenize=False)
        assert text.count("<image>") == 1 and all(f"ASSISTANT: {a}" in text for a in answers)
        batch = proc(text=[text], images=row["images"], return_tensors="pt")
        assert tuple(batch["pixel_values"].shape) == (1, 3, 28, 28)
        assert int((batch["input_ids"] == image_id).sum()) == 4  # (28 / 14)^2 patches


def test_parquet_has_image_features(version: V.Version, tmp_path: Path) -> None:
    from datasets import Image as HFImage
    from datasets import load_dataset

    out = tmp_path / "pq"
    X.export(version, "parquet", out, variants=["remove", "blackout"])
    ds = load_dataset(str(out), split="train", cache_dir=str(tmp_path / "hf"))
    assert all(isinstance(ds.features[c], HFImage) for c in ("orig", "counterfactual", "mask"))
    rows = index(version)
    want = [(r["key"], v) for r in rows for v in r["variants"] if v in ("remove", "blackout")]
    assert [(r["key"], r["variant"]) for r in ds.select_columns(["key", "variant"])] == want
    r = ds[0]
    assert r["orig"].size == r["counterfactual"].size and r["orig"].tobytes() != r["counterfactual"].tobytes()
    assert r["qa"][0]["answer_orig"] == answers_of(rows[0]["answers"])[0]["orig"]


def test_llava_json_follows_llavas_loader(version: V.Version, tmp_path: Path) -> None:
    out = tmp_path / "llava"
    X.export(version, "llava", out, variants=["orig", "remove"])
    recs = json.loads((out / "train.json").read_text())
    want = images_expected(version, ["orig", "remove"])
    assert [r["id"] for r in recs] == [f"{k}_{n}" for k, n, _ in want]
    for r, (_, _, answers) in zip(recs, want, strict=True):
        # what LLaVA's LazySupervisedDataset reads: image relative to the image folder, turns
        # alternating human/gpt, one <image> token, in the first human turn
        Image.open(out / r["image"]).verify()
        conv = r["conversations"]
        assert [c["from"] for c in conv] == ["human", "gpt"] * len(answers)
        assert "".join(c["value"] for c in conv).count("<image>") == 1 and conv[0]["value"].startswith("<image>\n")
        assert [c["value"] for c in conv[1::2]] == answers


def test_sharegpt_follows_llama_factory(version: V.Version, tmp_path: Path) -> None:
    from datasets import load_dataset

    out = tmp_path / "sg"
    X.export(version, "sharegpt", out, splits=X.parse_splits("train=0.5,test=0.5"))
    info = json.loads((out / "dataset_info.json").read_text())
    total = 0
    for name, entry in info.items():
        assert entry["formatting"] == "sharegpt" and entry["columns"] == {"messages": "messages", "images": "images"}
        assert entry["tags"]["role_tag"] == "role" and entry["tags"]["user_tag"] == "user"
        ds = load_dataset("json", data_files=str(out / entry["file_name"]), split="train",
                          cache_dir=str(tmp_path / "hf" / name))
        for row in ds:
            # LLaMA-Factory's check: as many <image> tokens as images, roles alternating
            assert sum(m["content"].count("<image>") for m in row["messages"]) == len(row["images"]) == 1
            assert [m["role"] for m in row["messages"]][:2] == ["user", "assistant"]
            assert (out / row["images"][0]).is_file()
        total += ds.num_rows
    assert total == len(images_expected(version))


def test_splits_keep_a_source_in_one_split_and_exports_are_deterministic(version: V.Version, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        X.export(version, "llava", out, splits=X.parse_splits("train=0.7,test=0.3"))
    assert tree_digest(a) == tree_digest(b)
    X.export(version, "parquet", tmp_path / "p1")
    X.export(version, "parquet", tmp_path / "p2")
    assert tree_digest(tmp_path / "p1") == tree_digest(tmp_path / "p2")
    source = {r["key"]: r["source_sha256"] for r in index(version)}
    where: dict[str, set[str]] = {}
    for split in ("train", "test"):
        for r in json.loads((a / f"{split}.json").read_text()):
            where.setdefault(source[r["id"].split("_", 1)[0]], set()).add(split)
    assert all(len(s) == 1 for s in where.values()) and {x for s in where.values() for x in s} == {"train", "test"}


def test_out_folder_rules(version: V.Version, tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(X.ExportError, match="did not create"):
        X.export(version, "llava", mine)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    out = tmp_path / "again"
    X.export(version, "llava", out)
    X.export(version, "sharegpt", out)  # an earlier export of ours is replaced whole
    assert (out / "dataset_info.json").is_file() and json.loads((out / X.MARKER).read_text())["format"] == "sharegpt"
    with pytest.raises(X.ExportError, match="not in"):
        X.export(version, "llava", tmp_path / "v", variants=["nonsense"])
    assert not (tmp_path / "v").exists()
    assert not [p for p in tmp_path.iterdir() if ".export-" in p.name]  # no temporary folder left


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "counterfactory.cli", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_cli_export_errors_are_one_line_and_write_nothing(version: V.Version, tmp_path: Path) -> None:
    out = tmp_path / "x"
    r = _cli("export", str(version.path), "--format", "coco", "--out", str(out))
    assert r.returncode == 2 and r.stderr == "error: unknown format 'coco': choose one of llava, trl, sharegpt, parquet, pope, popev2, beaf, defacto, countercurate\n"
    assert not out.exists()
    r = _cli("export", str(version.path), "--out", str(out), "--format", "llava", "--split", "train=0.5")
    assert r.returncode == 2 and "add up to 0.5" in r.stderr and r.stderr.count("\n") == 1 and not out.exists()
    r = _cli("export", str(version.path), "--format", "trl", "--out", str(out), "--variants", "orig,remove")
    assert r.returncode == 0, r.stderr
    assert f"read demo@{version.label}" in r.stdout and (out / "README.md").is_file()


# -- the papers' recipes (configs/recipes/) and their layouts ---------------------------------
RECIPES = REPO / "configs" / "recipes"


def recipe_version(name: str, root: Path, limit: int | None = None) -> V.Version:
    # every input: the CPU removals that verify keeps are on the procedural scenes, after the photos
    cfg = load_config(RECIPES / f"{name}.yaml", [f"output.root={root}"])
    return V.read_version(run_pipeline(cfg, limit=limit, local=True, progress=False).out_dir)


def test_every_recipe_is_documented_in_one_line() -> None:
    names = sorted(p.stem for p in RECIPES.glob("*.yaml"))
    assert names == ["beaf", "countercurate", "defacto", "pope", "popev2"]
    for n in names:
        first = (RECIPES / f"{n}.yaml").read_text().splitlines()[0]
        assert first.startswith("# ") and f"--format {n}" in first
        assert n in X.FORMATS


@pytest.fixture(scope="module")
def removals(tmp_path_factory: pytest.TempPathFactory) -> V.Version:
    """The removal recipe (beaf.yaml; pope and popev2 differ only in name), built once."""
    return recipe_version("beaf", tmp_path_factory.mktemp("removals"))


def docs(v: V.Version) -> list[dict[str, Any]]:
    return [doc for doc, _ in X.iter_samples(v)]


def test_beaf_recipe_reads_as_beaf_metric_reads_it(removals: V.Version, tmp_path: Path) -> None:
    out = tmp_path / "beaf"
    X.export(removals, "beaf", out)
    qna = json.loads((out / "beaf_qna.json").read_text())
    assert qna and [q["id"] for q in qna] == list(range(len(qna)))
    assert all(set(q) == {"id", "image", "question", "orig_img", "removed_q", "gt"} and q["gt"] in ("yes", "no")
               for q in qna)
    # beaf_metric.py: originals by image and question; an edited image finds its original by
    # name[:-7] + ".jpg"; a perfect model is true understanding on every removed question
    orig = {(q["image"], q["question"]): q["gt"] for q in qna if q["orig_img"]}
    tu = 0
    for q in qna:
        Image.open(out / "images" / q["image"]).verify()
        if not q["orig_img"]:
            before = orig[(q["image"][:-7] + ".jpg", q["question"])]
            tu += q["removed_q"] and before == "yes" and q["gt"] == "no"
            if not q["removed_q"]:  # an object the removal left alone (or never there): same answer
                assert before == q["gt"]
    edited = [q for q in qna if not q["orig_img"]]
    assert tu == sum(1 for q in edited if q["removed_q"]) > 0
    # InDecision's denominator (id_tot): questions on edited images about objects not removed,
    # both present ones (yes) and absent ones (no)
    others = [q for q in edited if not q["removed_q"]]
    assert {q["gt"] for q in others} == {"yes", "no"}
    # its hard-coded sizes, and the command that replaces them with ours
    readme = (out / "README.md").read_text()
    assert f"s/26118/{len(qna)}/" in readme and f"s/1727/{tu}/g" in readme


def pope_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_pope_question_files(removals: V.Version, tmp_path: Path) -> None:
    out = tmp_path / "pope"
    X.export(removals, "pope", out)
    ds = removals.dataset
    files = {s: pope_rows(out / f"{ds}_pope_{s}.json") for s in ("random", "popular", "adversarial", "counterfactual")}
    annotated = {}
    for d in docs(removals):
        annotated.setdefault(d["source"]["sha256"], {o["category"] for o in d["annotated"]})
    freq = {c: sum(c in cats for cats in annotated.values()) for c in set().union(*annotated.values())}
    for setting, rows in files.items():
        # RUCAIBox/POPE evaluate.py: one object per line with a label; both labels present, so
        # precision and recall have denominators for any answers (an all-"no" half divides by zero)
        assert rows and all(set(r) == {"question_id", "image", "text", "label"} for r in rows), setting
        assert [r["question_id"] for r in rows] == list(range(1, len(rows) + 1))
        assert {r["label"] for r in rows} == {"yes", "no"}, setting
        for r in rows:
            assert (out / "images" / r["image"]).is_file() and r["text"].startswith("Is there ")
    negatives: dict[str, list[str]] = {}
    for r in files["popular"]:
        if r["label"] == "no":
            cat = r["text"].removeprefix("Is there a ").removeprefix("n ").removesuffix(" in the image?")
            negatives.setdefault(r["image"], []).append(cat)
    assert negatives
    for image, cats in negatives.items():  # absent categories, the dataset's most frequent first
        src = next(s for s in annotated if image.startswith(s[:24]))
        absent = sorted((c for c in freq if c not in annotated[src]), key=lambda c: (-freq[c], c))
        assert cats == absent[:len(cats)]
    X.export(removals, "pope", tmp_path / "again")  # the same bytes every time
    assert tree_digest(tmp_path / "again") == tree_digest(out)
    by_key = {d["key"]: d for d in docs(removals)}
    for r in files["counterfactual"]:
        d = by_key[r["image"].removesuffix("_remove.jpg")]
        truth = {q["question"]: q["answers"]["remove"] for q in d["qa"] if q["kind"] == "existence"}
        if r["label"] == "no":
            assert truth[r["text"]] == "no"
        else:  # an object the removal left intact, not the target
            assert not any(t in r["text"] for t in d["targets"])


def test_popev2_is_the_releases_parquet(tmp_path: Path) -> None:
    import datasets

    out = tmp_path / "popev2"
    v = recipe_version("popev2", tmp_path / "runs")
    X.export(v, "popev2", out)
    # AoiDragon/POPEv2 prepare_popev2_hf_parquet.py: these columns, in this order, of these types
    t = pq.read_table(out / "test.parquet")
    assert [(f.name, str(f.type)) for f in t.schema] == [
        ("example_id", "string"), ("image_id", "int64"), ("target_object", "string"), ("question", "string"),
        ("counterfactual_image", "struct<bytes: binary, path: string>"), ("counterfactual_label", "string"),
        ("normal_image", "struct<bytes: binary, path: string>"), ("normal_label", "string")]
    # load_dataset(folder) reads the questions (not the imagefolder builder)
    ds = datasets.load_dataset(str(out), split="test", cache_dir=str(tmp_path / "cache"))
    assert isinstance(ds.features["normal_image"], datasets.Image)
    assert isinstance(ds.features["counterfactual_image"], datasets.Image)
    assert ds.features["image_id"].dtype == "int64"
    removals_n = sum(1 for d in docs(v) if "remove" in d["variants"])
    assert ds.num_rows == removals_n > 0  # one question per image pair
    assert len(set(ds["image_id"])) == len(set(ds["example_id"])) == ds.num_rows
    for r in ds:
        assert (r["normal_label"], r["counterfactual_label"]) == ("yes", "no") and r["target_object"] in r["question"]
        assert r["normal_image"].size == r["counterfactual_image"].size


def test_defacto_recipe_folders(tmp_path: Path) -> None:
    out = tmp_path / "defacto"
    X.export(recipe_version("defacto", tmp_path / "runs"), "defacto", out)
    folders = sorted((p for p in out.iterdir() if p.is_dir()), key=lambda p: int(p.name))
    assert [p.name for p in folders] == [str(i) for i in range(1, len(folders) + 1)] and folders
    rows = [json.loads(x) for x in (out / "defacto.jsonl").read_text().splitlines()]

    def boxes(p: Path) -> list[tuple[int, ...]]:
        return [tuple(map(int, line.split())) for line in p.read_text().splitlines()]

    more = 0
    for d, r in zip(folders, rows, strict=True):
        assert {p.name for p in d.iterdir()} == {"original.jpg", "original_smask.jpg", "original_rmask.jpg", "boxes.txt",
                                                 "sboxes.txt", "outside_boxes.txt", "random_boxes.txt",
                                                 "question.txt", "answer.txt"}
        o, s = Image.open(d / "original.jpg"), Image.open(d / "original_smask.jpg")
        assert o.size == s.size and (d / "question.txt").read_text().strip() == r["question"]
        answer = (d / "answer.txt").read_text().strip()
        assert answer == r["answer_original"] == r["answer_rmask"]
        # the masked evidence answers "unknown"; DeFacto's reward penalizes unknown/no/none on the
        # intact images, so no such answer is written there
        assert r["answer_smask"] == "unknown" and not re.search("unknown|no|none", answer, re.IGNORECASE)
        # README: boxes = all boxes in the image, sboxes = the question's, outside = the rest,
        # random = the masked control region
        every, evidence, outside = boxes(d / "boxes.txt"), boxes(d / "sboxes.txt"), boxes(d / "outside_boxes.txt")
        assert evidence and set(evidence) <= set(every) and sorted(outside) == sorted(b for b in every if b not in evidence)
        rnd = boxes(d / "random_boxes.txt")
        assert len(rnd) == 1 and rnd[0] not in every
        for x0, y0, x1, y1 in every + rnd:
            assert 0 <= x0 < x1 <= o.size[0] and 0 <= y0 < y1 <= o.size[1]
        more += len(every) > len(evidence)
    assert more > 0  # images with objects besides the evidence


def test_countercurate_recipe_reads_as_its_csv_dataset(tmp_path: Path) -> None:
    import pandas as pd

    out = tmp_path / "cc"
    X.export(recipe_version("countercurate", tmp_path / "runs", limit=40), "countercurate", out)
    df = pd.read_csv(out / "train_countercurate.csv", sep="\t")  # CounterCurate's CsvDataset
    assert list(df.columns) == ["captions", "images", "neg_captions", "neg_images"] and len(df)
    assert any("left" in c for c in df["captions"]) and any(c.startswith("There ") for c in df["captions"])
    elsewhere = tmp_path / "training-starts-here"
    elsewhere.mkdir()
    cwd = os.getcwd()
    try:  # CsvDataset opens Image.open(path) from wherever training starts
        os.chdir(elsewhere)
        for _, r in df.iterrows():
            assert r["captions"] != r["neg_captions"]
            assert Path(r["images"]).is_absolute() and Path(r["neg_images"]).is_absolute()
            assert Image.open(r["images"]).size == Image.open(r["neg_images"]).size
    finally:
        os.chdir(cwd)
