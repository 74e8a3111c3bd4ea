"""What a trainer's side says and does: the loader and the example name the version they read
(a limited one says so), and ``image_size`` keeps the aspect ratio (pad or crop, chosen) with
one geometry for a sample's pictures and masks."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from counterfactory.loader import load
from counterfactory.pipeline.config import load_config
from counterfactory.pipeline.runner import run_pipeline
from tests.conftest import REPO

DEMO = REPO / "configs" / "demo.yaml"


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("photos")
    cfg = load_config(DEMO, [f"output.root={tmp}", "output.shard_size=4"])
    return run_pipeline(cfg, limit=12, local=True, progress=False).out_dir


def wide(photos: Path) -> dict:
    """A record of a photograph wider than tall (coffee: 600 x 400)."""
    for rec in load(photos, decode="pil", announce=False):
        w, h = rec["orig"].size
        if w > h * 1.2:
            return rec
    raise AssertionError("the demo has no wide photograph")


def test_pad_keeps_the_aspect_ratio(photos: Path) -> None:
    key = wide(photos)["key"]
    w, h = wide(photos)["orig"].size
    rec = next(r for r in load(photos, image_size=64, announce=False) if r["key"] == key)
    band = round((64 - round(h * 64 / w)) / 2)
    assert band >= 5
    img, mask = rec["orig"], rec["mask"]
    assert img.shape == (3, 64, 64) and mask.shape == (1, 64, 64)
    # zero borders above and below, the picture between them, at the original's aspect ratio
    assert img[:, : band - 1].abs().sum() == 0 and img[:, 64 - band + 1:].abs().sum() == 0
    assert img[:, band + 1: 64 - band - 1].abs().sum(0).gt(0).float().mean() > 0.95
    assert mask[:, : band - 1].sum() == 0
    for name, v in rec["variants"].items():  # every variant has the same geometry
        assert v.shape == img.shape and v[:, : band - 1].abs().sum() == 0 and v[:, 64 - band + 1:].abs().sum() == 0
        if name not in ("blackout", "random_mask"):  # flat fills may reach the picture's edge
            assert v[:, band + 1: 64 - band - 1, :3].abs().sum(0).gt(0).all()  # a strip of picture at the edge


def test_crop_fills_and_stretch_squashes(photos: Path) -> None:
    key = wide(photos)["key"]
    crop = next(r for r in load(photos, image_size=64, resize="crop", announce=False) if r["key"] == key)
    stretch = next(r for r in load(photos, image_size=64, resize="stretch", announce=False) if r["key"] == key)
    assert crop["orig"].abs().sum(0).gt(0).float().mean() > 0.99  # no border
    assert not torch.equal(crop["orig"], stretch["orig"])
    with pytest.raises(ValueError, match="resize must be one of pad, crop, stretch"):
        load(photos, image_size=64, resize="squash", announce=False)


def test_pad_of_masks_stays_binary(photos: Path) -> None:
    for rec in load(photos, image_size=(48, 40), announce=False):
        assert set(np.unique(rec["mask"].numpy()).tolist()) <= {0.0, 1.0}


def test_loader_and_example_name_the_version(photos: Path, capsys: pytest.CaptureFixture) -> None:
    load(photos)
    err = capsys.readouterr().err
    assert err.startswith(f"counterfactory.loader: reading demo@{photos.name} (a limited --limit run), content id ")
    spec = importlib.util.spec_from_file_location("train_pairs", REPO / "examples" / "train_pairs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--data", str(photos), "--steps", "1", "--batch-size", "2", "--image-size", "16", "--workers", "0"])
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith(f"training on demo@{photos.name} (a limited --limit run)")
