"""The last hostile cases (issue 30): paths and values the README promises as one line and exit
2, a loader that checks what it reads against manifest.json and the content id, a viewer that
shows only what the version holds, and a local Ray that does not outlive a killed driver.
Each test fails on 87cce25. RELIABILITY.md lists the classes."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from counterfactory import versions as V
from counterfactory import viewer
from counterfactory.cli import main
from counterfactory.layout import sha256_bytes
from counterfactory.loader import LoaderError, load, resolve_shards
from counterfactory.pipeline.runner import run_pipeline
from tests.conftest import (
    REPO,
    demo_dict,
    make_config,
    save,
    scenes_input,
    square_line,
    square_scene,
)
from tests.test_hostile import _cli

PY = sys.executable


@pytest.fixture(scope="module")
def small_version(tmp_path_factory):
    res = run_pipeline(make_config(tmp_path_factory.mktemp("tail"), [scenes_input(4)], output={"shard_size": 2}),
                       local=True, progress=False)
    return V.read_version(res.out_dir)


def _run_config(tmp_path: Path) -> Path:
    data = demo_dict()
    data["inputs"] = [scenes_input(2)]
    data["output"]["root"] = str(tmp_path / "out")
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


# -- 1. paths: exit 2 and one line naming the value (was exit 1 with errno text) ----------------------
@pytest.mark.parametrize("case", ["long_dataset", "root_is_a_file", "root_under_a_file", "root_in_proc",
                                  "root_name_too_long"])
def test_unusable_paths_in_a_config_are_one_line_exit_2(tmp_path, capsys, case):
    cfg = _run_config(tmp_path)
    (tmp_path / "plain.txt").write_text("a file, not a folder")
    override, named = {
        "long_dataset": ("dataset=" + "a" * 5000, "dataset"),  # was [Errno 36] File name too long
        "root_is_a_file": (f"output.root={tmp_path / 'plain.txt'}", "output.root"),  # was [Errno 20]
        "root_under_a_file": (f"output.root={tmp_path / 'plain.txt' / 'sub'}", "output.root"),
        "root_in_proc": ("output.root=/proc/counterfactory-out", "/proc"),  # was [Errno 2], exit 1
        "root_name_too_long": (f"output.root={tmp_path / ('b' * 300)}", "output.root"),
    }[case]
    rc, err = _cli(capsys, "run", str(cfg), override, "--quiet")
    assert rc == 2 and named in err and "Errno" not in err, err
    assert len(err) < 500, "a 5,000-character value is not echoed whole"
    assert not (tmp_path / "out").exists() and not Path("/proc/counterfactory-out").exists()


def test_a_long_dataset_name_on_reading_verbs_is_one_line(tmp_path, capsys):
    for verb in ("versions", "verify", "card"):
        rc, err = _cli(capsys, verb, "x" * 5000, "--root", str(tmp_path))
        assert rc == 2 and "Errno" not in err and len(err) < 500, (verb, err)


def test_eval_export_to_a_folder_and_predictions_from_a_device(small_version, tmp_path, capsys):
    vdir = str(small_version.path)
    rc, err = _cli(capsys, "eval", vdir, "--export", str(tmp_path))  # was [Errno 21] Is a directory, exit 1
    assert rc == 2 and str(tmp_path) in err and "folder" in err and "Errno" not in err, err
    r = subprocess.run([PY, "-m", "counterfactory.cli", "eval", vdir, "--predictions", "/dev/zero"],
                       capture_output=True, text=True, timeout=120, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    err = r.stderr.strip()
    assert r.returncode == 2 and "/dev/zero" in err and "not a regular file" in err and len(err.splitlines()) == 1
    assert "not found" not in err  # it exists: saying "not found" sends the user looking in the wrong place
    # a regular file of zeros without a newline is read a bounded line at a time
    zeros = tmp_path / "zeros.jsonl"
    with open(zeros, "wb") as f:
        f.truncate(8 << 20)
    rc, err = _cli(capsys, "eval", vdir, "--predictions", str(zeros))
    assert rc == 2 and "no usable prediction" in err


def test_an_os_error_on_a_named_path_is_one_line_exit_2(small_version, tmp_path, capsys):
    """What no up-front check caught goes through one mapping in cli.main (was exit 1, errno text)."""
    (tmp_path / "plain.txt").write_text("a file")
    rc, err = _cli(capsys, "card", str(small_version.path), "--html", "--out", str(tmp_path / "plain.txt" / "viewer"))
    assert rc == 2 and "plain.txt" in err and "Errno" not in err, err


def test_card_max_samples_must_not_be_negative(small_version, capsys):
    with pytest.raises(SystemExit) as e:  # was: accepted, and -5 showed 4 of 9 samples
        main(["card", str(small_version.path), "--html", "--max-samples", "-5"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--max-samples" in err and "-5" in err


# -- 2. values inside manifest lines -------------------------------------------------------------------
def test_unknown_question_kind_and_a_400_digit_box_are_specific_rejects(tmp_path):
    save(square_scene(), tmp_path / "sq.png")
    good = square_line("sq.png")
    box = {"category": "box", "attributes": {"color": "red"}}
    lines = [
        json.dumps({**good, "kind": "banana"}),                                     # was accepted and carried
        json.dumps({**good, "objects": [{**box, "box": [10 ** 400, 0, 20, 20]}]}),  # was stage_error OverflowError
        json.dumps({**good, "objects": [{**box, "polygon": [[10 ** 400, 0], [5, 5], [0, 5]]}]}),
        json.dumps(good),
    ]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    cfg = make_config(tmp_path, [{"kind": "manifest", "path": str(tmp_path / "m.jsonl")}])
    res = run_pipeline(cfg, local=True, progress=False)
    rejects = pq.read_table(res.out_dir / "rejects.parquet").to_pylist()
    by_idx = {r["input_index"]: r for r in rejects if r["variant"] is None}
    assert {i: by_idx[i]["reason"] for i in (0, 1, 2)} == {0: "bad_manifest_line", 1: "bad_box", 2: "bad_polygon"}
    assert "banana" in by_idx[0]["detail"] and "existence" in by_idx[0]["detail"]
    assert "Overflow" not in by_idx[1]["detail"] and len(by_idx[1]["detail"]) < 200
    assert 3 not in by_idx and not [r for r in rejects if r["reason"] == "stage_error"]


# -- 3. the loader checks manifest.json and the content id --------------------------------------------
def _write_json(path: Path, doc) -> None:
    path.write_text(json.dumps(doc, indent=1))


def _seal(folder: Path) -> None:
    """Record the (edited) manifest's sha256 as the content id: a consistent-looking forgery."""
    info = json.loads((folder / "version.json").read_text())
    info["content_id"] = sha256_bytes((folder / "manifest.json").read_bytes())
    _write_json(folder / "version.json", info)


TAMPER = {
    # the five manifest edits of the battery: each changes the manifest's sha256
    "manifest_counts": lambda m, f: m["counts"].update(samples=m["counts"]["samples"] + 1),
    "manifest_shard_sha": lambda m, f: m["shards"][0].update(sha256="0" * 64),
    "manifest_shard_bytes": lambda m, f: m["shards"][0].update(bytes=m["shards"][0]["bytes"] + 1),
    "manifest_drops_shard": lambda m, f: m["shards"].pop(),
    "manifest_reformatted": lambda m, f: None,  # same content, other bytes: not the recorded manifest
}


@pytest.mark.parametrize("edit", sorted(TAMPER))
def test_loader_refuses_a_manifest_that_is_not_the_content_id(small_version, tmp_path, edit):
    folder = Path(shutil.copytree(small_version.path, tmp_path / "v"))
    cid = small_version.info["content_id"]
    m = json.loads((folder / "manifest.json").read_text())
    TAMPER[edit](m, folder)
    (folder / "manifest.json").write_text(json.dumps(m, indent=3))
    with pytest.raises(LoaderError, match=f"content id {cid[:12]}"):
        load(folder, decode="pil")
    if edit != "manifest_reformatted":  # sealed with a matching content id: shards.json disagrees
        _seal(folder)
        with pytest.raises(LoaderError, match="disagrees with manifest.json|samples, its shards hold"):
            load(folder, decode="pil")
    assert len(list(load(folder, decode="pil", check_manifest=False))) == small_version.manifest()["counts"]["samples"]


def test_loader_refuses_an_unlisted_shard_and_a_garbage_version_json(small_version, tmp_path):
    folder = Path(shutil.copytree(small_version.path, tmp_path / "v"))
    first = json.loads((folder / "shards.json").read_text())["shardlist"][0]["url"]
    shutil.copy(folder / first, folder / "extra-000099.tar")
    with pytest.raises(LoaderError, match="extra-000099.tar is a shard manifest.json .*does not list"):
        resolve_shards(str(folder))
    assert resolve_shards(str(folder), check_manifest=False)[0]  # told not to: reads what shards.json lists
    (folder / "extra-000099.tar").unlink()
    for body in (b"\x00\xffgarbage", b"[1, 2]", b'{"label": "v1"}', b'{"content_id": "../../x"}'):
        (folder / "version.json").write_bytes(body)
        with pytest.raises(LoaderError, match="version.json"):
            load(folder)
    (folder / "version.json").unlink()  # a folder not published yet: the manifest still against shards.json
    assert len(resolve_shards(str(folder))[0]) == len(small_version.manifest()["shards"])


# -- 4. the viewer shows only what the version holds ---------------------------------------------------
@pytest.fixture(scope="module")
def reject_outside(tmp_path_factory):
    """A version whose rejects ledger names an image outside the version folder."""
    tmp = tmp_path_factory.mktemp("outside")
    save(square_scene(), tmp / "private.png")
    line = square_line("private.png", objects=[{"category": "box", "box": [1, 2, 3]}])  # bad_box: a whole-input reject
    (tmp / "m.jsonl").write_text(json.dumps(line) + "\n" + json.dumps(square_line("private.png")) + "\n")
    res = run_pipeline(make_config(tmp, [{"kind": "manifest", "path": str(tmp / "m.jsonl")}]), local=True,
                       progress=False)
    return V.read_version(res.out_dir), tmp / "private.png"


def _reject_images(page: Path) -> list[str]:
    return sorted(p.name for p in (page.parent / "img").glob("reject-*"))


def test_viewer_makes_no_thumbnail_of_a_file_outside_the_version(reject_outside):
    version, private = reject_outside
    rows = pq.read_table(version.path / "rejects.parquet").to_pylist()
    assert any(r["source"] == str(private) and r["variant"] is None for r in rows)
    page = viewer.build_viewer(version)
    assert _reject_images(page) == [], "a thumbnail of a file outside the version (was: reject-00000.jpg)"
    # a path inside the version would be shown, but only from a ledger the manifest vouches for
    inside = version.path / "shown.png"
    shutil.copy(private, inside)
    assert viewer._source_thumb(str(inside), 64, version.path) is not None
    assert viewer._source_thumb(str(private), 64, version.path) is None
    table = pq.read_table(version.path / "rejects.parquet")
    rows = [{**r, "source": str(inside)} for r in table.to_pylist()]
    kept = (version.path / "rejects.parquet").read_bytes()
    try:
        pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), version.path / "rejects.parquet")
        assert _reject_images(viewer.build_viewer(version)) == [], "the ledger fails verify: no thumbnail"
    finally:
        (version.path / "rejects.parquet").write_bytes(kept)
        inside.unlink()


def test_default_viewer_folder_keeps_a_users_files(small_version, capsys):
    out = small_version.path / "viewer"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    (out / "keep.txt").write_text("my notes")
    try:
        rc, err = _cli(capsys, "card", str(small_version.path), "--html")  # was: keep.txt deleted
        assert rc == 2 and "viewer" in err and "--out" in err
        assert (out / "keep.txt").read_text() == "my notes"
        (out / "keep.txt").unlink()  # an empty folder, then the tool's own viewer, are replaced
        for _ in range(2):
            rc, _err = _cli(capsys, "card", str(small_version.path), "--html")
            assert rc == 0 and (out / "index.html").is_file() and (out / viewer.MARKER).is_file()
    finally:
        shutil.rmtree(out, ignore_errors=True)


@pytest.mark.parametrize("path", ["/index.html%00.txt", "/viewer/index.html%00", "/%00"])
def test_serve_answers_odd_paths_without_a_traceback(small_version, capfd, path):
    server = viewer.serve(small_version.path)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
        conn.request("GET", path)
        status = conn.getresponse().status
        conn.close()
    finally:
        server.shutdown()
        server.server_close()
    err = capfd.readouterr().err
    assert status in (400, 404) and "Traceback" not in err, err  # was: ValueError: embedded null byte


# -- 5. a killed driver's local Ray processes ------------------------------------------------------------
def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    return kids


def _cmdline(pid: int) -> bytes | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read() or None  # a zombie has none
    except OSError:
        return None


DRIVER = """
import sys, time
from counterfactory.pipeline.config import load_config
from counterfactory.pipeline.runner import init_ray
init_ray(load_config(sys.argv[1], ["ray.num_cpus=1"]), verbose=False)
print("ready", flush=True)
time.sleep(600)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_local_ray_processes_do_not_outlive_a_killed_driver(tmp_path):
    """kill -9 of a driver that started a local Ray: every process under it (GCS, raylet,
    DashboardAgent, RuntimeEnvAgent, workers) is gone within 20 s (was: the agents lived on for
    up to a minute, competing with the rerun)."""
    driver = subprocess.Popen([PY, "-c", DRIVER, str(_run_config(tmp_path))], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    tree: dict[int, bytes] = {}
    try:
        ready: list[str] = []
        reader = threading.Thread(target=lambda: ready.append(driver.stdout.readline()), daemon=True)
        reader.start()
        reader.join(180)
        assert ready and ready[0].startswith("ready"), "Ray did not start within 180 s"
        time.sleep(2)  # the raylet starts its agents and a worker
        kids, stack = _children(), [driver.pid]
        while stack:
            for c in kids.get(stack.pop(), []):
                if (cmd := _cmdline(c)) is not None:
                    tree[c] = cmd
                stack.append(c)
        names = b" ".join(tree.values())
        assert b"raylet" in names and b"ray::DashboardAgent" in names and b"ray::RuntimeEnvAgent" in names, names
        driver.send_signal(signal.SIGKILL)
        driver.wait(30)
        end = time.monotonic() + 20
        alive = list(tree)
        while alive and time.monotonic() < end:
            time.sleep(0.5)
            alive = [p for p in alive if _cmdline(p) == tree[p]]
        assert not alive, [tree[p][:60] for p in alive]
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait(30)
        for p in tree:  # what this test started and left: never another process
            if _cmdline(p) == tree[p]:
                os.kill(p, signal.SIGKILL)
