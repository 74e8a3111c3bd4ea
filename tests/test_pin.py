"""``counterfactory pin``: Hub revisions written into a config as commits, comments kept.

The Hub is a loopback HTTP server answering ``/api/models/{repo}/revision/{rev}`` the way the
Hub does (``HfApi(endpoint=...)``: the real client, no mock of it)."""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import unquote

import pytest
import yaml

from counterfactory.pin import PinError, hub_refs, pin_file, pin_text
from tests.conftest import loopback_server

SHA = {("IDEA-Research/grounding-dino-base", "main"): "a" * 40,
       ("facebook/sam-vit-huge", "main"): "b" * 40,
       ("latent-consistency/lcm-lora-sdv1-5", "main"): "c" * 40,
       ("stable-diffusion-v1-5/stable-diffusion-inpainting", "v1"): "d" * 40}


class _Hub(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        path = unquote(self.path.split("?")[0])
        prefix = "/api/models/"
        repo, _, rev = path[len(prefix):].partition("/revision/")
        sha = SHA.get((repo, rev))
        if sha is None:
            body = json.dumps({"error": "Repository not found"}).encode()
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound" if (repo, "main") not in SHA else "RevisionNotFound")
        else:
            body = json.dumps({"id": repo, "modelId": repo, "sha": sha, "private": False}).encode()
            self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def hub():
    yield from loopback_server(_Hub)


CONFIG = """\
# a job (comments must survive)
stages:
  - name: localize
    backend: grounding-dino
    params:
      model: IDEA-Research/grounding-dino-base   # the detector
      revision: main  # moves
      box_threshold: 0.3
  - name: segment
    backend: sam
    params: {model: facebook/sam-vit-huge, batch_size: 8}
  - name: edit
    backend: diffusers-inpaint
    params:
      model: "stable-diffusion-v1-5/stable-diffusion-inpainting"
      revision: v1
      loras:
        - id: latent-consistency/lcm-lora-sdv1-5
          scale: 1.0
  - name: qa
    backend: openai
    params: {model: Qwen/Qwen2.5-7B-Instruct, base_url: http://vllm:8000/v1}
  - name: verify
    backend: grounding-dino
    params:
      model: IDEA-Research/grounding-dino-base
"""


def test_pins_every_hub_model_and_keeps_comments(hub):
    new, refs = pin_text(CONFIG, endpoint=hub)
    assert [r.repo for r in refs] == ["IDEA-Research/grounding-dino-base", "facebook/sam-vit-huge",
                                      "stable-diffusion-v1-5/stable-diffusion-inpainting",
                                      "latent-consistency/lcm-lora-sdv1-5", "IDEA-Research/grounding-dino-base"]
    assert all(r.source == "hub" for r in refs)
    data = yaml.safe_load(new)
    p = [s["params"] for s in data["stages"]]
    assert p[0]["revision"] == "a" * 40 and p[0]["box_threshold"] == 0.3
    assert p[1] == {"model": "facebook/sam-vit-huge", "batch_size": 8, "revision": "b" * 40}
    assert p[2]["revision"] == "d" * 40  # the configured tag v1, resolved; not main
    assert p[2]["loras"][0] == {"id": "latent-consistency/lcm-lora-sdv1-5", "scale": 1.0, "revision": "c" * 40}
    assert "revision" not in p[3]  # a served model name is not a Hub repo
    assert p[4]["revision"] == "a" * 40  # the second use of the same id, in its own stage
    for kept in ("# a job (comments must survive)", "# the detector", "  # moves"):
        assert kept in new
    again, _ = pin_text(new, endpoint=hub)  # pinned is a fixed point
    assert again == new


def test_pin_file_diff_and_atomic_write(hub, tmp_path):
    f = tmp_path / "job.yaml"
    f.write_text(CONFIG)
    diff, _ = pin_file(f, endpoint=hub)
    assert f.read_text() == CONFIG  # a dry run writes nothing
    assert "+      revision: " + "a" * 40 in diff
    pin_file(f, endpoint=hub, write=True)
    assert yaml.safe_load(f.read_text())["stages"][1]["params"]["revision"] == "b" * 40
    diff, _ = pin_file(f, endpoint=hub)
    assert diff == ""


def test_unknown_repo_or_revision_is_one_line(hub):
    with pytest.raises(PinError, match="no such model repo"):
        pin_text("stages: [{name: x, params: {model: nobody/nothing}}]\n", endpoint=hub)
    with pytest.raises(PinError, match="no revision 'v9'"):
        pin_text("params: {model: facebook/sam-vit-huge, revision: v9}\n", endpoint=hub)


def test_unreachable_hub_falls_back_to_the_cache(tmp_path, monkeypatch):
    # a Hub cache snapshot of the model (the layout huggingface_hub writes), and no Hub at all
    cache = tmp_path / "hub"
    repo = cache / "models--facebook--sam-vit-huge"
    (repo / "snapshots" / ("e" * 40)).mkdir(parents=True)
    (repo / "snapshots" / ("e" * 40) / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("e" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as C
    monkeypatch.setattr(C, "HF_HUB_CACHE", str(cache))
    new, refs = pin_text("params: {model: facebook/sam-vit-huge}\n", offline=True)
    assert refs[0].source == "cache" and yaml.safe_load(new)["params"]["revision"] == "e" * 40
    new, refs = pin_text("params: {model: facebook/sam-vit-huge}\n", endpoint="http://127.0.0.1:9")
    assert refs[0].source == "cache"
    with pytest.raises(PinError, match="did not answer.*no snapshot"):
        pin_text("params: {model: other/model}\n", endpoint="http://127.0.0.1:9")


def test_local_folders_and_commits_are_left_alone(tmp_path):
    folder = tmp_path / "weights"
    folder.mkdir()
    text = f"a: {{model: {folder}}}\nb: {{model: x/y, revision: {'f' * 40}}}\n"
    refs = hub_refs(yaml.safe_load(text))
    assert [r.repo for r in refs] == ["x/y"]
    new, _ = pin_text(text, offline=True)
    assert new == text


def test_the_shipped_gpu_config_parses_into_its_hub_refs():
    text = (Path(__file__).resolve().parents[1] / "configs" / "gpu.yaml").read_text()
    repos = {r.repo for r in hub_refs(yaml.safe_load(text))}
    assert {"IDEA-Research/grounding-dino-base", "facebook/sam-vit-huge"} <= repos


def test_cli_pin_dry_run_then_write(hub, tmp_path, capsys):
    from counterfactory.cli import main

    f = tmp_path / "job.yaml"
    f.write_text(CONFIG)
    assert main(["pin", str(f), "--endpoint", hub]) == 0
    out = capsys.readouterr().out
    assert "facebook/sam-vit-huge@main: " + "b" * 40 + " (from the hub)" in out and "--write" in out
    assert f.read_text() == CONFIG
    assert main(["pin", str(f), "--endpoint", hub, "--write"]) == 0
    assert main(["pin", str(f), "--endpoint", hub]) == 0
    assert "every Hub model is pinned" in capsys.readouterr().out
    assert main(["pin", str(tmp_path / "missing.yaml"), "--offline"]) == 2
    assert capsys.readouterr().err.startswith("error: cannot read")
