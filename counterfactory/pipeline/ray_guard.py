"""A local Ray instance dies with its driver (issue 30): the processes ``ray.init()`` starts carry
this driver's mark, and a watchdog stops exactly those when the driver is gone, however it dies."""

from __future__ import annotations

import os
from typing import Any

# -- a local Ray instance dies with its driver -------------------------------------------------------
# ray.init() without an address starts a head (GCS, raylet, ...) whose raylet starts agents and
# workers. When the driver is killed (kill -9), Ray's own reaper takes the GCS and raylet, but
# DashboardAgent and RuntimeEnvAgent live on until their own check notices (up to a minute), and a
# rerun on a small machine competes with them. PR_SET_PDEATHSIG is not inherited by grandchildren,
# so instead every process the local head starts carries an environment variable naming its driver
# (children inherit the environment: the agents and workers too, whoever their parent becomes), and
# a watchdog holding the read end of a pipe from the driver wakes when the driver is gone and stops
# exactly the processes that carry its mark: never another user's Ray, never another run's.
RAY_OWNER_ENV = "COUNTERFACTORY_RAY_OWNER"
_WATCHDOG: Any = None  # the watchdog's Popen: its stdin pipe must live as long as this process
_OWNER = ""

_WATCHDOG_CODE = r"""
import os, signal, sys, time
mark = (sys.argv[1] + "=" + sys.argv[2]).encode()
sys.stdin.buffer.read()  # returns at EOF: the driver has exited or was killed
def marked():
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != os.getpid():
            try:
                with open("/proc/" + d + "/environ", "rb") as f:
                    if mark in f.read().split(b"\0"):
                        out.append(int(d))
            except OSError:
                pass
    return out
for sig, grace in ((signal.SIGTERM, float(sys.argv[3])), (signal.SIGKILL, 2.0)):
    pids = marked()
    for p in pids:
        try:
            os.kill(p, sig)
        except OSError:
            pass
    end = time.monotonic() + grace
    while pids and time.monotonic() < end:
        time.sleep(0.1)
        pids = marked()
    if not pids:
        break
"""


def ray_owner_mark() -> str:
    """This process's mark for the local Ray processes it starts (``pid-random``), with its
    watchdog started on first use (Linux: the watchdog reads ``/proc``; elsewhere none)."""
    import secrets
    import subprocess
    import sys

    global _WATCHDOG, _OWNER
    if not _OWNER or not _OWNER.startswith(f"{os.getpid()}-"):  # a forked child marks its own
        _OWNER, _WATCHDOG = f"{os.getpid()}-{secrets.token_hex(6)}", None
    if sys.platform.startswith("linux") and (_WATCHDOG is None or _WATCHDOG.poll() is not None):
        env = {k: v for k, v in os.environ.items() if k != RAY_OWNER_ENV}
        # its own session: a Ctrl-C to the terminal reaches the driver, not the watchdog
        _WATCHDOG = subprocess.Popen([sys.executable, "-I", "-S", "-c", _WATCHDOG_CODE, RAY_OWNER_ENV, _OWNER, "3"],
                                     stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env=env, start_new_session=True)
    return _OWNER


class local_ray_guard:  # noqa: N801 - used as `with local_ray_guard():` around ray.init
    """Around ``ray.init()`` of a local instance: the processes it starts carry this driver's
    mark (``ray_owner_mark``), so they are stopped when the driver dies, however it dies. The
    variable is set only while Ray starts, so other children of the driver do not carry it."""

    # SPT_NOENV: Ray renames its processes (ray::DashboardAgent) with setproctitle, which by
    # default may write the title over the environment block that /proc/PID/environ shows, and
    # with it the mark; with SPT_NOENV set it keeps to the command line's own space
    MARKS = (RAY_OWNER_ENV, "SPT_NOENV")

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.saved: dict[str, str | None] = {}

    def __enter__(self) -> local_ray_guard:
        if self.enabled:
            self.saved = {k: os.environ.get(k) for k in self.MARKS}
            os.environ[RAY_OWNER_ENV] = ray_owner_mark()
            os.environ["SPT_NOENV"] = os.environ.get("SPT_NOENV") or "1"
        return self

    def __exit__(self, *exc: Any) -> None:
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        self.saved = {}
