"""Config validation: every problem is one line naming the file and the key, exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from counterfactory.cli import main
from counterfactory.pipeline.config import ConfigError, load_config
from tests.conftest import DEMO, demo_dict


def _write(tmp_path: Path, data) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return p


def _procedural(data):
    data["inputs"] = [{"kind": "procedural", "count": 2}]
    return data


@pytest.mark.parametrize(
    ("mutate", "expect"),
    [
        (lambda d: d.update(colour=1), "colour: Extra inputs are not permitted"),
        (lambda d: d["output"].update(shard_size="many"), "output.shard_size: Input should be a valid integer"),
        (lambda d: d["stages"][3]["params"].update(inpaint_radius="x"), "stages.edit.params.inpaint_radius"),
        (lambda d: d["stages"][3]["params"].update(radius=3), "stages.edit.params.radius: Extra inputs"),
        (lambda d: d["stages"][2].update(backend="sam9"), "stages.segment.backend: unknown backend 'sam9'"),
        (lambda d: d["stages"][1]["resources"].update(num_gpus=-1), "stages.localize.resources.num_gpus"),
        (lambda d: d["stages"][1]["resources"].update(num_gpus=1.5),
         "stages.localize.resources.num_gpus: above 1, GPUs are whole numbers"),
        (lambda d: d["stages"][2]["resources"].update(concurrency=0), "stages.segment.resources.concurrency: must be a number of workers"),
        (lambda d: d["stages"][2]["resources"].update(concurrency=[4, 1]), "stages.segment.resources.concurrency"),
        (lambda d: d["inputs"].append({"kind": "manifest", "path": "nope.jsonl"}), "inputs.1.path: file not found"),
        (lambda d: d["inputs"].append({"kind": "webcam"}), "inputs.1: Input tag 'webcam'"),
        (lambda d: d["inputs"].append({"kind": "procedural", "count": 2, "size": [16, 64]}),
         "inputs.1.size: scene size 16x64 too small (min side 32)"),
        (lambda d: d["inputs"].append({"kind": "procedural_video", "count": 2, "size": [64, 48]}),
         "inputs.1.size: clip size 64x48 too small (min side 64)"),
        (lambda d: d.pop("dataset"), "dataset: Field required"),
        (lambda d: d["stages"].pop(4), "stages must include"),
    ],
)
def test_bad_config_is_one_line_with_key(tmp_path, mutate, expect, capsys):
    data = _procedural(demo_dict())
    mutate(data)
    path = _write(tmp_path, data)
    assert main(["run", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {path}: ") and expect in err, err


def test_invalid_yaml_and_missing_config(tmp_path, capsys):
    path = _write(tmp_path, "dataset: [unclosed\n")
    assert main(["run", str(path)]) == 2
    assert "invalid YAML" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "absent.yaml")]) == 2
    assert "cannot read config" in capsys.readouterr().err


def test_overrides_address_stages_by_name():
    cfg = load_config(DEMO, ["output.shard_size=3", "stages.edit.params.inpaint_radius=9", "seed=7",
                             "stages.edit.params.variants=[remove]"], check_files=False)
    assert cfg.output.shard_size == 3 and cfg.seed == 7
    assert cfg.stage("edit").params["inpaint_radius"] == 9
    assert cfg.stage("edit").params["variants"] == ["remove"]
    with pytest.raises(ConfigError, match="no list item named 'paint'"):
        load_config(DEMO, ["stages.paint.params.x=1"], check_files=False)
    with pytest.raises(ConfigError, match="seed: Input should be a valid integer"):
        load_config(DEMO, ["seed=abc"], check_files=False)


def test_config_hash_ignores_placement_and_location():
    a = load_config(DEMO, check_files=False)
    b = load_config(DEMO, ["output.root=/elsewhere", "stages.edit.resources.batch_size=2"], check_files=False)
    c = load_config(DEMO, ["seed=1"], check_files=False)
    assert a.config_hash() == b.config_hash() != c.config_hash()


def test_cli_dry_run_prints_plan_and_bad_config_exits_2(tmp_path):
    exe = Path(sys.executable).parent / "counterfactory"
    path = _write(tmp_path, _procedural(demo_dict()))
    ok = subprocess.run([exe, "run", str(path), "--dry-run"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "stage plan (4 inputs)" in ok.stdout and "tasks" in ok.stdout
    bad = subprocess.run([exe, "run", str(path), "output.shard_size=0"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip() == f"error: {path}: output.shard_size: Input should be greater than or equal to 1"


def test_cli_refuses_a_limit_below_one_and_a_port_out_of_range(tmp_path):
    """--limit 0 would publish an empty version as the latest; both are usage errors (exit 2)."""
    exe = Path(sys.executable).parent / "counterfactory"
    path = _write(tmp_path, _procedural(demo_dict()))
    for args, words in ((["run", str(path), "--limit", "0"], "at least 1"),
                        (["run", str(path), "--limit", "-1"], "at least 1"),
                        (["card", "x", "--serve", "--port", "99999"], "0-65535")):
        r = subprocess.run([exe, *args], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and words in r.stderr.strip().splitlines()[-1], r.stderr
    assert not (tmp_path / "out").exists()


def test_a_manifest_that_is_not_a_regular_file_is_a_config_error(tmp_path):
    data = demo_dict()
    data["inputs"] = [{"kind": "manifest", "path": "/dev/zero"}]
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(_write(tmp_path, data))


def test_an_autoscaling_pool_is_planned_by_its_min_and_max():
    """[min, max] concurrency: the minimum must fit, the pool grows to what is free."""
    from counterfactory.cluster import Node, make_plan

    cfg = load_config(DEMO, ["stages.segment.resources.concurrency=[1,9]"])
    plan = make_plan(cfg, [Node("a", cpus=4, gpus=0, memory=16 << 30)])
    assert not plan.wont_fit and any("grow to" in n for n in plan.notes)
    assert next(s for s in plan.steps if "segment" in s["step"])["concurrency"] == "1-9"
    cfg = load_config(DEMO, ["stages.segment.resources.concurrency=[6,9]"])
    assert any("6 actors asked" in w for w in make_plan(cfg, [Node("a", cpus=4, gpus=0, memory=16 << 30)]).wont_fit)


def test_a_job_server_that_never_answers_times_out_in_one_line(monkeypatch, capsys):
    """Ray's job client sets no HTTP timeout: a server that accepts and never replies held
    `submit` forever. Ours bounds each request, and `plan --address` with nothing there is
    one line."""
    import socket

    from counterfactory import cluster

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts connections (the kernel does) and never reads or writes
    port = silent.getsockname()[1]
    monkeypatch.setattr(cluster, "JOB_SERVER_TIMEOUT", (2, 1))
    try:
        assert main(["status", "raysubmit_x", "--address", f"http://127.0.0.1:{port}"]) == 1
        assert "timed out" in capsys.readouterr().err
    finally:
        silent.close()
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        closed = free.getsockname()[1]
    assert main(["plan", str(DEMO), "--address", f"http://127.0.0.1:{closed}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --address http://127.0.0.1:{closed}: cannot list") and "\n" not in err


def test_a_run_with_an_autoscaling_pool_reports_its_stages(tmp_path):
    """The run report counts a [min, max] pool at its largest (it multiplied by the pair)."""
    import json as _json

    from counterfactory.pipeline.runner import run_pipeline
    from tests.conftest import make_config, scenes_input

    cfg = make_config(tmp_path, [scenes_input(2)])
    cfg.stage("segment").resources.concurrency = (1, 2)
    res = run_pipeline(cfg, local=True, progress=False)
    rows = _json.loads((res.out_dir / "summary.json").read_text())["stages"]
    assert "waiting_seconds" in next(r for r in rows if r["stage"] == "segment")
