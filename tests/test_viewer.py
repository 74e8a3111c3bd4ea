"""The static HTML viewer in a real headless Chromium (Debian `chromium` + `chromium-driver`,
installed by `make test` where missing): images load, filters work, rejects are shown, and a
screenshot is taken (set VIEWER_SCREENSHOT=path to keep it)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from counterfactory import versions as V
from counterfactory import viewer
from counterfactory.cli import main
from counterfactory.pipeline.runner import run_pipeline
from tests.conftest import make_config, save, scenes_input, square_line, square_scene

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def version(tmp_path_factory):
    """Procedural scenes plus a manifest with a good photo-like image and two broken inputs,
    so that the page has accepted samples, variant rejects and whole-input rejects."""
    tmp = tmp_path_factory.mktemp("viewer")
    big = (30, 22, 130, 98)  # 40% of the image (more once dilated): no room for an equal-area control
    save(square_scene(box=big), tmp / "good.png")
    (tmp / "text.jpg").write_bytes(b"not an image\n" * 10)
    lines = [square_line("good.png", box=big), square_line("text.jpg"), square_line("missing.jpg")]
    (tmp / "m.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    cfg = make_config(tmp, [{"kind": "manifest", "path": str(tmp / "m.jsonl")}, scenes_input(8)],
                      output={"shard_size": 7})
    cfg.stage("verify").set_params(min_area_frac=0.03)  # some scenes rejected: thumbnails of rejects
    res = run_pipeline(cfg, local=True)
    return V.read_version(res.out_dir)


def test_viewer_files_and_cli(version, capsys):
    root = version.path.parent.parent
    assert main(["card", "demo", "--root", str(root), "--html"]) == 0
    page = Path(capsys.readouterr().out.strip())
    assert page == (version.path / "viewer" / "index.html").resolve()
    text = page.read_text()
    assert "<script" in text and '"samples"' in text
    index = pq.read_table(version.path / "index.parquet").to_pylist()
    imgs = list((page.parent / "img").iterdir())
    n_frames = sum(1 + len(r["variants"]) for r in index)
    assert len([p for p in imgs if not p.name.startswith("reject-")]) == n_frames
    assert all(p.stat().st_size < 60_000 for p in imgs), "thumbnails, not full images"
    assert not [p for p in version.path.glob("*/*.tar") if p.parent.name != "pairs"], "shards are never extracted"


@pytest.fixture(scope="module")
def browser():
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("chromium/chromedriver not installed: `make test` installs the Debian packages "
                    "chromium and chromium-driver (apt-get, needs root and a Debian mirror)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="cf-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              f"--user-data-dir={profile}", "--window-size=1300,1400"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def _wait_images(driver, timeout: float = 10.0) -> tuple[int, int]:
    """(images, images that failed to load) once every image has completed."""
    end = time.time() + timeout
    while True:
        done, total, broken = driver.execute_script(
            "const im=[...document.images];"
            "return [im.filter(i=>i.complete).length, im.length, im.filter(i=>i.complete&&i.naturalWidth===0).length];")
        if done == total or time.time() > end:
            return total, broken + (total - done)
        time.sleep(0.1)


def _visible(driver, css: str) -> int:
    return driver.execute_script(
        f"return [...document.querySelectorAll({json.dumps(css)})].filter(e=>e.offsetParent!==null).length;")


def test_viewer_in_chromium_file_url(version, browser, tmp_path):
    from selenium.webdriver.support.ui import Select

    page = viewer.build_viewer(version)
    browser.get(page.resolve().as_uri())
    total, broken = _wait_images(browser)
    index = pq.read_table(version.path / "index.parquet").to_pylist()
    rejects = pq.read_table(version.path / "rejects.parquet").to_pylist()
    assert total > 2 * len(index) and broken == 0
    assert _visible(browser, ".sample") == len(index)
    assert browser.find_elements("css selector", "svg polygon.ev"), "mask outlines drawn"
    assert len(browser.find_elements("css selector", ".reject")) == len(rejects)
    reasons = browser.find_element("id", "rejects").text
    assert "not_an_image" in reasons and "file_not_found" in reasons and "mask_area_out_of_bounds" in reasons
    # whole-input rejects that can still be read (procedural scenes) have a thumbnail
    assert browser.execute_script(
        "return [...document.querySelectorAll('.reject img')].filter(i=>i.naturalWidth>0).length") > 0

    Select(browser.find_element("id", "variant-filter")).select_by_value("random_mask")
    with_rm = [r for r in index if "random_mask" in r["variants"]]
    assert 0 < len(with_rm) < len(index)
    assert _visible(browser, ".sample") == len(with_rm)
    assert _visible(browser, ".sample figure") == 2 * len(with_rm)  # orig + random_mask only
    assert browser.find_element("id", "shown-count").text.startswith(f"showing {len(with_rm)} of")

    Select(browser.find_element("id", "variant-filter")).select_by_value("")
    Select(browser.find_element("id", "kind-filter")).select_by_value("color")
    with_color = [r for r in index if "color" in r["question_kinds"]]
    assert _visible(browser, ".sample") == len(with_color)
    kinds = browser.execute_script(
        "return [...document.querySelectorAll('tr.qa')].filter(e=>e.offsetParent!==null).map(e=>e.dataset.kind)")
    assert set(kinds) == {"color"}
    Select(browser.find_element("id", "kind-filter")).select_by_value("")

    shot = Path(os.environ.get("VIEWER_SCREENSHOT") or tmp_path / "viewer.png")
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000


def test_viewer_served_on_localhost(version, browser):
    page = viewer.build_viewer(version)
    server = viewer.serve(version.path)
    host, port = server.server_address[:2]
    assert host == "127.0.0.1"
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        base = f"http://127.0.0.1:{port}"
        browser.get(f"{base}/viewer/{page.name}")
        total, broken = _wait_images(browser)
        assert total > 0 and broken == 0
        with urllib.request.urlopen(f"{base}/README.md", timeout=5) as r:  # the page's card link
            assert r.status == 200 and b"# demo v1" in r.read()
    finally:
        server.shutdown()
        server.server_close()
