"""CPU cost per pair of the embedded default (issue 27): the plain-loop floor, in CPU time.

On a shared or loaded machine wall time says little; this process's CPU time does (the floor
runs in one process). Prints one line per run: CPU ms per pair for the whole run, for the
stream (first input to last row) and for what runs after it (card, audit, publish), the audit's
own seconds, peak RSS and the content id (two commits that make the same bytes print the same
id). ``--profile``: the stage code alone (``local_batches`` through the part encoder) under
cProfile, top entries by own time; ``--audit DIR``: the shortcut audit of a published version
alone, in CPU seconds.

``--stream N``: the stage code and the part encoder alone (what the floor's stream runs), CPU ms
per input and a digest of the rows (same digest = same bytes), without the writer or the audit.

Usage: python bench/cpu_cost.py [--n 1000 [--sampler] [--threads] [--no-helper]] [--profile 120 [--sort cumulative]] [--stream 300 [--questions 2]]
[--audit outputs/demo/v1]
Run two commits side by side (a ``git worktree`` of the old one, each with its own PYTHONPATH)
at the same time: then both see the same load.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import pstats
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import run as bench_run  # noqa: E402
from stream_cost import with_questions  # noqa: E402

from counterfactory.pipeline.runner import local_batches, run_pipeline  # noqa: E402


class ThreadCPU:
    """Each thread's CPU during a run, read from ``/proc/self/task`` every 0.25 s by a thread of
    its own (``stream_cost._thread_cpu``; its own CPU is reported and left out): the lead's
    per-thread figures of a floor run, by role."""

    def __init__(self) -> None:
        import threading

        from stream_cost import _thread_cpu

        self.cpu: dict[int, float] = {}
        self.names: dict[int, str] = {}
        self.trace: list[tuple[float, float]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=_thread_cpu, name="monitor",
                                       args=(self.stop, self.cpu, self.names, 0.25, self.trace))

    def __enter__(self) -> ThreadCPU:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.3)  # one more reading after the run
        self.stop.set()
        self.thread.join()

    @property
    def own(self) -> float:
        return sum(c for t, c in self.cpu.items() if self.names.get(t) == "monitor")

    def report(self, pairs: int, stream_end: float) -> str:
        """CPU ms/pair by role; the main thread cut where the stream ended (``stream_end``, a
        ``perf_counter`` time): the writer and the audit's features before, publish after."""
        by: dict[str, float] = {}
        steps = sorted({n for n in self.names.values() if n.startswith("cf-step")})
        for t, c in self.cpu.items():
            name = self.names.get(t, f"native ({self.names.get(-t, '?')})")
            if name == "monitor":
                continue
            if name.startswith("cf-step"):  # the plain loop's steps: the last is the part encoder
                name = "part encoder" if name == steps[-1] else f"stages ({name})"
            role = {"cf-read": "reader (inputs, scene render)", "MainThread": "main"}.get(name, name)
            by[role] = by.get(role, 0.0) + c
        main = by.pop("main", 0.0)
        in_stream = max((c for t, c in self.trace if t <= stream_end), default=0.0)
        by["main: writer + audit features (stream)"] = in_stream
        by["main: publish (after the stream)"] = main - in_stream
        return "; ".join(f"{k} {1000 * v / pairs:.2f}" for k, v in sorted(by.items(), key=lambda kv: -kv[1]) if v >= 0.005) \
            + f" (monitor's own {1000 * self.own / pairs:.2f}, left out)"


def floor(n: int, sampler: bool = False, threads: bool = False) -> str:
    """The whole floor run in this process. Its peak RSS is the kernel's ``ru_maxrss`` (one
    process, no children): the figures before issue 27's s27encode part ran it inside
    ``bench_run.PeakRSS``, a thread that lists every process of the machine through psutil five
    times a second, and charged that thread's CPU to the floor (``run.py``'s ``timed_run``
    subtracts it, this did not). ``sampler``: that old instrument again, its own CPU printed
    beside the floor's, so the old rows can be compared (old figure = floor + sampler)."""
    tmp = Path(tempfile.mkdtemp(prefix="cf-cpu-"))
    try:
        cfg = bench_run.scenes_config(n, tmp)
        with (bench_run.PeakRSS() if sampler else contextlib.nullcontext() as mem,
              ThreadCPU() if threads else contextlib.nullcontext() as per):
            t0, c0, h0 = time.perf_counter(), time.process_time(), bench_run.helper_cpu()
            res = run_pipeline(cfg, local=True, progress=False)
            cpu, wall = time.process_time() - c0, time.perf_counter() - t0
            helper = bench_run.helper_cpu() - h0  # the audit's helper process: counted in the floor's CPU
        cpu += helper
        sampler_cpu = mem.cpu if sampler else 0.0
        cpu -= sampler_cpu + (per.own if threads else 0.0)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        helper_rss = bench_run.helper_rss()
        summary = json.loads((res.out_dir / "summary.json").read_text())
        stream = summary["pipeline"]["wall_seconds"]
        card = json.loads((res.out_dir / "card.json").read_text())
        info = json.loads((res.out_dir / "version.json").read_text())
        s = res.manifest["counts"]["samples"]
        return (f"N={n}: {s} pairs, CPU {1000 * cpu / s:.1f} ms/pair ({s / wall:.1f} pairs/s wall); wall: stream "
                f"{stream:.1f} s, after it {wall - stream:.1f} s (audit {card['timing']['audit_seconds']} s); "
                f"peak RSS {peak / 2**20:.0f} MiB (+ the helper process {helper_rss / 2**20:.0f} MiB, its "
                f"{helper:.2f} CPU s counted above); content id {info['content_id'][:16]}"
                + (f"; the psutil sampler's own CPU {sampler_cpu:.2f} s ({1000 * sampler_cpu / s:.1f} ms/pair, "
                   f"peak RSS by it {mem.peak / 2**20:.0f} MiB), left out above" if sampler else "")
                + (f"\nper thread, CPU ms/pair: {per.report(s, t0 + stream)}" if threads else ""))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def profile(n: int, top: int = 25, sort: str = "tottime") -> None:
    import scipy.sparse.linalg  # noqa: F401 - the fill imports it once per process, not per input

    from tests.conftest import load_records

    tmp = Path(tempfile.mkdtemp(prefix="cf-cpu-"))
    cfg = bench_run.scenes_config(n, tmp)
    records = load_records(cfg)
    # CPU time, not wall time: on a loaded machine a wall-clock profile charges other processes'
    # time to whatever call was running
    pr = cProfile.Profile(time.process_time)
    c0 = time.process_time()
    pr.enable()
    # the chain as the floor runs it: the part encoder on the samples (issue 27: the profile
    # used to pickle every raw array after verify and unpickle it for a separate encoder, a
    # round trip the floor never makes), and the samples kept as they are (s28write: no row
    # encode of meta JSON and pickled parts, which the floor's writer does not ask for either)
    for _ in local_batches(cfg, records, as_samples=True):
        pass
    pr.disable()
    print(f"stage code + encoding, {n} inputs: {1000 * (time.process_time() - c0) / n:.1f} CPU ms/input under cProfile")
    st = pstats.Stats(pr)
    # per stage: the cumulative CPU of each stage's ``process`` and of the part encoder
    per = {f"{Path(f).parent.name}/{Path(f).stem}.{fn}": ct for (f, _, fn), (_, _, _, ct, _) in st.stats.items()
           if "counterfactory" in f and (fn == "process" and "/stages/" in f or fn == "encode_samples")}
    print("per stage, cumulative CPU ms/input: " + ", ".join(
        f"{k} {1000 * v / n:.1f}" for k, v in sorted(per.items(), key=lambda kv: -kv[1])))
    st.sort_stats(sort).print_stats(top)
    shutil.rmtree(tmp, ignore_errors=True)


def stream(n: int, questions: int = 1) -> str:
    """The stage code and the part encoder alone, as the floor's chain runs them (no cProfile, no
    writer, no audit): CPU ms per input, and a digest of every sample it returns (keys, status,
    meta, encoded parts; the per-stage wall seconds left out), so two commits can be compared for
    the same bytes in a fraction of a run. The samples are taken as the floor's writer takes them
    (s28write: before, each batch was encoded into rows, meta JSON and pickled parts, and the
    digest's own work was counted too: ~1 CPU ms/input that the floor never spends); the digest
    is the same as the rows' was (the meta as a row holds it: ``json.dumps(sort_keys=True)``)."""
    import hashlib

    from tests.conftest import load_records

    tmp = Path(tempfile.mkdtemp(prefix="cf-cpu-"))
    try:
        cfg = with_questions(bench_run.scenes_config(n, tmp), n, questions)
        records = load_records(cfg)
        digest = hashlib.sha256()
        spent = 0.0  # the digest's own CPU, left out
        c0 = time.process_time()
        for samples in local_batches(cfg, records, as_samples=True):
            d0 = time.process_time()
            for sm in samples:
                meta = json.loads(json.dumps(sm.meta, sort_keys=True))  # the row's meta
                meta.pop("seconds", None)  # wall time per stage: not part of the output
                digest.update(f"{sm.idx}|{sm.key}|{sm.status}|{json.dumps(meta, sort_keys=True)}".encode())
                if sm.ok and sm.arrays:  # a row's blob: only an accepted sample's parts
                    parts = sm.arrays["parts"]
                    for name in sorted(parts):
                        digest.update(name.encode() + bytes(parts[name]))
            spent += time.process_time() - d0
        cpu = time.process_time() - c0 - spent
        n = len(records)
        return (f"stream alone, {n} inputs" + (f" ({questions} questions per scene)" if questions != 1 else "")
                + f": {1000 * cpu / n:.1f} CPU ms/input; rows digest {digest.hexdigest()[:16]}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def audit_cost(vdir: str) -> str:
    from counterfactory import audit

    c0 = time.process_time()
    a = audit.audit_version(vdir)
    return (f"audit of {vdir}: {time.process_time() - c0:.1f} CPU s, {a['sample']['audited']} of "
            f"{a['sample']['samples']} samples, {a['cost']['images_decoded']} images decoded; probe AUC "
            + json.dumps({v: d.get("auc") for v, d in a["detectability"].items()}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--profile", type=int, default=0, help="profile the stage code on this many inputs instead")
    ap.add_argument("--stream", type=int, default=0, help="CPU and a digest of the stage code + encoder alone "
                    "on this many inputs instead")
    ap.add_argument("--questions", type=int, default=1, help="with --stream: questions per scene (inputs of one "
                    "image in a row, as the demo's 2)")
    ap.add_argument("--sort", default="tottime", help="profile order: tottime (own time) or cumulative")
    ap.add_argument("--top", type=int, default=25, help="profile entries printed")
    ap.add_argument("--audit", default=None, help="time the audit of this published version instead")
    ap.add_argument("--threads", action="store_true", help="with --n: each thread's CPU per pair too (from "
                    "/proc, read every 0.25 s by a monitor thread whose own CPU is left out)")
    ap.add_argument("--no-helper", action="store_true", help="with --n: no helper process (the driver "
                    "computes the audit's statistics and fits itself, as before session 6): the same bytes")
    ap.add_argument("--sampler", action="store_true", help="the floor inside the old psutil RSS sampler "
                    "(bench/run.PeakRSS), its own CPU printed apart: compares with rows measured before s27encode")
    args = ap.parse_args()
    if args.audit:
        print(audit_cost(args.audit))
    elif args.stream:
        print(stream(args.stream, args.questions))
    elif args.profile:
        profile(args.profile, args.top, args.sort)
    else:
        if args.no_helper:
            from counterfactory import helper_process

            helper_process._failed = True  # as if it could not start: everything computed in the driver
        print(floor(args.n, args.sampler, args.threads))


if __name__ == "__main__":
    main()
