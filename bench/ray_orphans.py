"""How long a local Ray instance's processes outlive a driver killed with kill -9 (issue 30).

Starts a driver (``init_ray`` on configs/demo.yaml, one CPU) in a child process, waits for Ray,
records every process under the driver (GCS, raylet, agents, workers), kills the driver with
SIGKILL and prints, per process, how many seconds it stayed alive (``--limit`` seconds at most;
what is still alive then is killed by this script, never anything it did not start).

    PYTHONPATH=$PWD python bench/ray_orphans.py [--limit 30]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DRIVER = """
import sys, time
from counterfactory.pipeline.config import load_config
from counterfactory.pipeline.runner import init_ray
init_ray(load_config(sys.argv[1], ["ray.num_cpus=1"]), verbose=False)
print("ready", flush=True)
time.sleep(600)
"""


def _tree(root: int) -> dict[int, bytes]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    kids.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(d))
            except (OSError, ValueError, IndexError):
                continue
    out, stack = {}, [root]
    while stack:
        for c in kids.get(stack.pop(), []):
            if (cmd := _cmdline(c)) is not None:
                out[c] = cmd
            stack.append(c)
    return out


def _cmdline(pid: int) -> bytes | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read() or None
    except OSError:
        return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=float, default=30.0)
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", str(REPO))}
    t0 = time.monotonic()
    p = subprocess.Popen([sys.executable, "-c", DRIVER, str(REPO / "configs" / "demo.yaml")],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    assert p.stdout.readline().startswith("ready")
    print(f"Ray ready after {time.monotonic() - t0:.1f} s")
    time.sleep(2)
    tree = _tree(p.pid)
    p.send_signal(signal.SIGKILL)
    p.wait()
    killed = time.monotonic()
    gone: dict[int, float] = {}
    while len(gone) < len(tree) and time.monotonic() - killed < args.limit:
        for pid, cmd in tree.items():
            if pid not in gone and _cmdline(pid) != cmd:
                gone[pid] = time.monotonic() - killed
        time.sleep(0.2)
    for pid, cmd in sorted(tree.items(), key=lambda kv: gone.get(kv[0], 1e9)):
        args_ = [a.decode(errors="replace") for a in cmd.split(b"\0") if a]
        prog = [a for a in args_[1:] if not a.startswith("-")][:1] if "python" in args_[0] else []
        name = "python -c (the watchdog)" if "-c" in args_ else (prog or args_[:1])[0].strip().rsplit("/", 1)[-1][:40]
        print(f"{name:42s} " + (f"{gone[pid]:.1f} s" if pid in gone else f"alive at {args.limit:.0f} s"))
        if pid not in gone:
            os.kill(pid, signal.SIGKILL)
    print(f"{len(tree) - len(gone)} of {len(tree)} processes outlived the driver by more than {args.limit:.0f} s")


if __name__ == "__main__":
    main()
