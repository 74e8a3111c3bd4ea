"""The command line's conventions: overrides and flags in any order, --version, per-verb help,
exit codes that mean the state (status against a job server on loopback), --json, limited runs
never `latest` unless asked, tags, the end summary in 80 columns, and the live progress display
driven under a pseudo-terminal."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from counterfactory import cli
from counterfactory import versions as V
from counterfactory.pipeline.config import load_config
from counterfactory.pipeline.runner import run_pipeline
from tests.conftest import REPO, loopback_server

DEMO = REPO / "configs" / "demo.yaml"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


# -- parsing -----------------------------------------------------------------------------------
def test_overrides_and_flags_in_any_order() -> None:
    a = cli.parse_args(["run", "c.yaml", "--dry-run", "output.shard_size=8", "--limit", "3", "seed=2"])
    assert a.overrides == ["output.shard_size=8", "seed=2"] and a.dry_run and a.limit == 3
    a = cli.parse_args(["submit", "c.yaml", "--address", "http://h:8265", "output.root=/x", "--wait", "5"])
    assert a.overrides == ["output.root=/x"] and a.address == "http://h:8265" and a.wait == 5
    a = cli.parse_args(["plan", "c.yaml", "seed=1", "--address", "http://h:8265", "seed=3"])
    assert a.overrides == ["seed=1", "seed=3"]


@pytest.mark.parametrize("argv", [["run", "c.yaml", "--bogus"], ["versions", "demo", "seed=1"],
                                  ["run", "c.yaml", "--dry-run", "stray"]])
def test_unknown_words_are_a_usage_error(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        cli.parse_args(argv)
    assert e.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_dry_run_takes_an_override_after_the_flag(capsys: pytest.CaptureFixture) -> None:
    rc, out, err = run_cli(capsys, "run", str(DEMO), "--dry-run", "output.shard_size=7")
    assert rc == 0, err
    assert "shard_size: 7" in out


def test_dry_run_names_the_parts_of_a_split_model_stage(capsys: pytest.CaptureFixture,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps the table to the terminal
    rc, out, err = run_cli(capsys, "run", str(DEMO.parent / "gpu_fast.yaml"), "--dry-run")
    assert rc == 0, err
    for part in ("segment (sam-hf): model", "segment (sam-hf): host after", "edit (diffusers-inpaint): host before",
                 "edit (diffusers-inpaint): model", "verify (redetect): host before"):
        assert part in out
    assert "ingest (default) " in out and "ingest (default):" not in out


def test_version_and_help(capsys: pytest.CaptureFixture) -> None:
    from counterfactory import __version__

    with pytest.raises(SystemExit) as e:
        cli.parse_args(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"counterfactory {__version__}"
    with pytest.raises(SystemExit):
        cli.parse_args(["--help"])
    top = capsys.readouterr().out
    assert "\nVerbs: run, versions" in top and "\nDATASET is a dataset name" in top  # paragraphs kept
    for verb in ("run", "export", "push", "tag", "status", "versions", "submit"):
        with pytest.raises(SystemExit) as e:
            cli.parse_args([verb, "--help"])
        text = capsys.readouterr().out
        assert e.value.code == 0 and f"usage: counterfactory {verb}" in text and "\nexample:\n  counterfactory" in text


# -- status against a job server on loopback ------------------------------------------------
class _Jobs(BaseHTTPRequestHandler):
    """The two endpoints of Ray's job server that `status` calls (a process boundary)."""

    states = {"raysubmit_ok": "SUCCEEDED", "raysubmit_bad": "FAILED", "raysubmit_run": "RUNNING",
              "raysubmit_wait": "PENDING", "raysubmit_stop": "STOPPED"}

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        import ray

        if self.path == "/api/version":
            body = {"version": "4", "ray_version": ray.__version__, "ray_commit": "x", "session_name": "s"}
        elif self.path.startswith("/api/jobs/") and self.path.rsplit("/", 1)[1] in self.states:
            job = self.path.rsplit("/", 1)[1]
            body = {"type": "SUBMISSION", "status": self.states[job], "entrypoint": "counterfactory run c.yaml",
                    "submission_id": job, "message": f"job {self.states[job].lower()}", "start_time": 1, "end_time": 2}
        else:
            self.send_response(404)
            self.end_headers()
            self.wfile.write(f"Job {self.path.rsplit('/', 1)[1]} does not exist".encode())
            return
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a: object) -> None:
        pass


@pytest.fixture(scope="module")
def job_server():
    yield from loopback_server(_Jobs)


@pytest.mark.parametrize("job,code", [("raysubmit_ok", 0), ("raysubmit_bad", 1), ("raysubmit_stop", 1),
                                      ("raysubmit_run", 3), ("raysubmit_wait", 3)])
def test_status_exit_code_means_the_state(job_server: str, job: str, code: int,
                                          capsys: pytest.CaptureFixture) -> None:
    rc, out, _ = run_cli(capsys, "status", job, "--address", job_server)
    assert rc == code and out.startswith(f"{job}: {_Jobs.states[job]}")
    rc, out, _ = run_cli(capsys, "status", "--json", job, "--address", job_server)
    assert rc == code and json.loads(out)["status"] == _Jobs.states[job]


def test_status_of_an_unknown_job_is_one_line(job_server: str, capsys: pytest.CaptureFixture) -> None:
    rc, out, err = run_cli(capsys, "status", "raysubmit_nope", "--address", job_server)
    assert rc == 2 and out == "" and err.count("\n") == 1 and "does not exist" in err and "Traceback" not in err


# -- versions: limited runs, latest, tags, --json ---------------------------------------------
def test_limited_runs_are_labelled_and_never_latest(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "out"
    cfg = lambda *o: load_config(DEMO, [f"output.root={root}", *o])  # noqa: E731
    full = run_pipeline(cfg(), limit=10_000, local=True, progress=False)  # a limit above the inputs: full
    small = run_pipeline(cfg(), limit=4, local=True, progress=False)
    assert not full.limited and small.limited and V.read_latest(root / "demo") == full.label == "v1"
    rc, out, _ = run_cli(capsys, "versions", "demo", "--root", str(root), "--json")
    rows = {r["label"]: r for r in json.loads(out)["versions"]}
    assert rc == 0 and rows["v1"]["latest"] and rows["v1"]["limited"] is None
    assert rows["v2"]["limited"] == 4 and not rows["v2"]["latest"] and rows["v2"]["samples"] == small.manifest["counts"]["samples"]
    rc, out, _ = run_cli(capsys, "versions", "demo", "--root", str(root))
    assert "v2 (limited: 4 inputs)" in out
    asked = run_pipeline(cfg("seed=1"), limit=4, local=True, progress=False, latest=True)
    assert V.read_latest(root / "demo") == asked.label == "v3"
    # a dataset whose only version is limited has no latest, and says why
    only = tmp_path / "only"
    run_pipeline(load_config(DEMO, [f"output.root={only}"]), limit=2, local=True, progress=False)
    with pytest.raises(V.VersionError, match="limited runs, never latest"):
        V.locate("demo", only)


def test_tags_name_a_version_once(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "out"
    res = run_pipeline(load_config(DEMO, [f"output.root={root}"]), limit=3, local=True, progress=False)
    rc, out, err = run_cli(capsys, "tag", "demo@v1", "paper-table-2", "--root", str(root))
    assert rc == 0, err
    assert V.locate("demo@paper-table-2", root).path == res.out_dir
    rc, out, err = run_cli(capsys, "tag", "demo@v1", "paper-table-2", "--root", str(root))
    assert rc == 2 and err.count("\n") == 1 and "exists" in err
    for bad in ("v2", "latest", "9lives"):
        rc, _, err = run_cli(capsys, "tag", "demo@v1", bad, "--root", str(root))
        assert rc == 2 and err.startswith("error: bad tag")
    rc, out, _ = run_cli(capsys, "versions", "demo", "--root", str(root), "--json")
    assert json.loads(out)["versions"][0]["tags"] == ["paper-table-2"]
    rc, _, err = run_cli(capsys, "verify", "demo@nosuchtag", "--root", str(root))
    assert rc == 2 and "bad version label 'nosuchtag'" in err


def test_eval_json(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    res = run_pipeline(load_config(DEMO, [f"output.root={tmp_path}"]), limit=3, local=True, progress=False)
    ask = tmp_path / "ask.jsonl"
    assert run_cli(capsys, "eval", str(res.out_dir), "--export", str(ask))[0] == 0
    preds = tmp_path / "pred.jsonl"
    preds.write_text("".join(json.dumps({**json.loads(line), "answer": "yes"}) + "\n"
                             for line in ask.read_text().splitlines()))
    rc, out, _ = run_cli(capsys, "eval", str(res.out_dir), "--predictions", str(preds), "--json")
    assert rc == 0 and json.loads(out)["answered"] == len(ask.read_text().splitlines())


# -- a real run under a pseudo-terminal: progress, no Ray noise, the summary ------------------
def test_run_under_a_terminal_shows_progress_and_an_80_column_summary(tmp_path: Path) -> None:
    import fcntl
    import pty
    import select
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "TERM": "xterm", "COLUMNS": "80"}
    env.pop("NO_COLOR", None)
    p = subprocess.Popen([sys.executable, "-m", "counterfactory.cli", "run", str(DEMO), "--limit", "16",
                          f"output.root={tmp_path / 'out'}", "ray.num_cpus=2"],
                         stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True, cwd=tmp_path)
    os.close(slave)
    chunks = []
    while True:
        r, _, _ = select.select([master], [], [], 300)
        if not r:
            p.kill()
            raise AssertionError("no output for 300 s")
        try:
            data = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    assert p.wait(timeout=60) == 0, b"".join(chunks).decode(errors="replace")[-3000:]
    raw = b"".join(chunks).decode(errors="replace")
    text = ANSI.sub("", raw).replace("\r\n", "\n")
    assert "16/16" in text and " pairs" in text and "/s" in text  # the live display's last state
    assert "\r" in raw or "\x1b[" in raw  # redrawn in place, not printed line by line
    for noise in ("streaming_executor", "INFO", "Progress bars disabled", "Token authentication"):
        assert noise not in text, noise
    summary = text[text.index("demo@v1: "):].strip().splitlines()
    # a path is never wrapped or cut (the output line); every other line fits
    assert all(len(line) <= 80 for line in summary if not line.startswith("output: ")), summary
    joined = "\n".join(summary)
    assert "limited run (--limit): not made latest" in joined
    assert re.search(r"\n  n/a +\d+ variant\(s\) that do not apply", joined)  # expected, apart from failures
    assert "\n  dropped " in joined and "\n  rejected " in joined
    assert "\nnext:\n  counterfactory card demo@v1 --root out --html" in joined
    assert "\nversion: demo@v1  spec id " in joined


class _BusyThenReady(_Jobs):
    """A head whose job agent is not up yet: Ray's job server answers 500 "No available agent"
    to the first submissions (it asks to try again later), then accepts."""

    refusals = 2
    posts: list[str] = []

    def do_GET(self) -> None:  # noqa: N802
        if self.path.startswith("/api/packages/"):  # package not uploaded yet
            self.send_response(404)
            self.end_headers()
            return
        super().do_GET()

    def do_PUT(self) -> None:  # noqa: N802 - the working_dir package upload
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.end_headers()

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).posts.append(self.path)
        if len(type(self).posts) <= self.refusals:
            msg = b"No available agent to submit job, please try again later."
            self.send_response(500)
            self.send_header("Content-Length", str(len(msg)))
            self.end_headers()
            self.wfile.write(msg)
            return
        data = json.dumps({"job_id": "raysubmit_new", "submission_id": "raysubmit_new"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_submit_waits_for_a_job_agent_that_is_not_up_yet(capsys: pytest.CaptureFixture) -> None:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _BusyThenReady)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        rc, out, err = run_cli(capsys, "submit", str(DEMO), "--address", f"http://127.0.0.1:{srv.server_address[1]}")
    finally:
        srv.shutdown()
    assert rc == 0 and out.strip() == "raysubmit_new" and "error:" not in err
    assert len(_BusyThenReady.posts) == 3  # two refusals, then the submission
