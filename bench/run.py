"""CPU benchmarks of the embedded default (issue 7). Prints one table; `make bench`.

  floor      the stage code in a plain loop in one process (runner.local_batches + writer; the
             audit's statistics and fits on its helper process, whose CPU the floor counts)
  ray-1cpu   the Ray Data pipeline on a local Ray instance with 1 CPU
  ray-2cpu   the same with 2 CPUs
  growth     time per pair and peak RSS (driver + Ray workers) at N = 100, 1,000, 10,000: of
             the whole run, of the stream alone (first input read to last row written), the
             per-run cost outside the stream (planning, closing the writer, card, publish), and
             the marginal cost of a pair between two sizes, where any fixed cost cancels
  writer     the shard writer (ShardWriter per shard fed decoded samples, as a shard task feeds
             it, + DatasetCommit) vs a plain tarfile loop writing the same member bytes (with and
             without an fsync: ours fsyncs every shard), without and with the pairs/ copy, wall
             and CPU time, and the image encode cost
  driver     the driver process's own CPU per input (RUSAGE_SELF around the run, Ray's threads
             in the driver included) and its peak RSS, with and without a first shard 30 s late
             (issue 26: the driver commits metadata, so a straggler holds nothing back)
  profile    share of stage time in the demo run

Timings exclude Ray start-up (one `ray.init` per CPU setting, before the clock starts);
they include reading inputs, all stages, encoding and writing shards.

Usage: python bench/run.py [--n 1000] [--growth 100,1000,10000] [--only floor,ray,growth,writer,profile]
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from counterfactory.pipeline.config import load_config, validate_config  # noqa: E402
from counterfactory.pipeline.runner import run_pipeline  # noqa: E402

VARIANTS: list[str] | None = None  # --variants: pin the edit set (A/B across commits)


def scenes_config(n: int, root: Path, num_cpus: int | None = None):
    import yaml

    data = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    if VARIANTS:
        next(s for s in data["stages"] if s["name"] == "edit")["params"]["variants"] = VARIANTS
    data["inputs"] = [{"kind": "procedural", "count": n, "seed": 1, "size": [256, 256], "questions_per_scene": 1}]
    data["output"]["root"] = str(root)
    # one Ray task writes each shard (issue 26): a run needs several shards per CPU to balance
    data["output"]["shard_size"] = int(os.environ.get("COUNTERFACTORY_BENCH_SHARD_SIZE", 256))
    if num_cpus:
        data["ray"]["num_cpus"] = num_cpus
    return validate_config(data, source="bench", base_dir=REPO)


class PeakRSS:
    """Peak of (this process + every Ray worker process of its own Ray instance) RSS, sampled
    every 0.2 s. Only descendants count: another session's Ray workers on the machine do not."""

    def __init__(self) -> None:
        self.peak = 0
        self.cpu = 0.0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        me = psutil.Process()
        total = me.memory_info().rss
        for p in me.children(recursive=True):
            try:
                cmd = " ".join(p.cmdline() or [])
                if "ray::" in cmd or "default_worker.py" in cmd or "loky" in cmd:  # loky: the audit's helper
                    total += p.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return total

    def _run(self) -> None:
        c0 = time.thread_time()
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            time.sleep(0.2)
        # its own CPU: it runs in the driver, so RUSAGE_SELF counts it (every Ray process's
        # /proc entries read five times a second: tens of ms a second); taken out of the driver
        self.cpu = time.thread_time() - c0

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def driver_rss() -> int:
    return psutil.Process().memory_info().rss


class PeakDriverRSS(PeakRSS):
    """Peak RSS of this process alone (the driver), sampled every 0.2 s."""

    def _sample(self) -> int:
        return driver_rss()


def helper_cpu() -> float:
    """CPU seconds so far of this process's children that are not Ray's: the audit's helper
    process (``counterfactory/helper_process.py``, a loky worker) and loky's resource tracker.
    A run in one process hands them the audit's statistics and fits, so the floor's CPU counts
    them beside its own (``process_time`` does not see a child)."""
    return sum(t.user + t.system for t in _of_loky("loky", lambda p: p.cpu_times()))


def helper_rss() -> int:
    """Peak RSS of the helper process (the kernel's high-water mark, VmHWM: its RSS after a run is
    lower than while publish's fits ran there; its RSS now where /proc has no peak)."""
    return sum(_of_loky("popen_loky", _peak_rss))


def _of_loky(mark: str, read):
    """``read(p)`` of each child process of this one whose command line holds ``mark``."""
    for p in psutil.Process().children(recursive=True):
        try:
            if mark in " ".join(p.cmdline() or []):
                yield read(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


def _peak_rss(p: psutil.Process) -> int:
    try:
        with open(f"/proc/{p.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return p.memory_info().rss


def timed_run(cfg, *, local: bool, sample_all: bool = True) -> tuple[float, int, int, float, float]:
    """Wall seconds, samples, peak RSS, this process's CPU seconds (for the in-process floor the
    CPU time is the figure least disturbed by other load on the machine), and the seconds of the
    stream alone (first input read to last row written, from the run's summary.json).
    ``sample_all=False``: no sampling of every Ray process's RSS (the driver's own CPU measured)."""
    with PeakRSS() if sample_all else PeakDriverRSS() as mem:
        t0, c0, h0 = time.perf_counter(), time.process_time(), helper_cpu()
        res = run_pipeline(cfg, local=local, progress=False)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        if local:  # the helper's share (a Ray run's helper does publish's fits only: not the driver's CPU)
            cpu += helper_cpu() - h0
    stream = json.loads((res.out_dir / "summary.json").read_text())["pipeline"]["wall_seconds"]
    TIMED["sampler_cpu_s"] = mem.cpu
    # the sampler is a thread of this process: its CPU is in process_time, not the run's (the
    # floor's CPU figures before issue 27's s27encode part included it: ~15 ms per second here)
    return dt, res.manifest["counts"]["samples"], mem.peak, cpu - mem.cpu, stream


TIMED: dict[str, float] = {}  # the last timed_run's RSS sampler CPU (taken out of the driver's)


def ray_child(n: int, cpus: int, root: str) -> None:
    """One Ray setting per process, so each gets a fresh local instance of the given size. The
    driver's own CPU (``RUSAGE_SELF``: its threads, Ray's included, not the workers) and peak RSS
    are taken around the timed run."""
    import resource

    import ray

    cfg = scenes_config(n, Path(root), cpus)
    env = {k: v for k, v in os.environ.items() if k == "COUNTERFACTORY_STRAGGLER_S"}
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    run_pipeline(scenes_config(min(n, 32), Path(root) / "warm", cpus), progress=False)  # warm workers
    # --only driver: the driver's own CPU, so no sampler of every Ray process beside it (its
    # cost, tens of ms a second, is the driver's otherwise); the driver's RSS sampler's own CPU
    # is taken out of both figures (the stream's pro rata of its wall seconds)
    driver_only = os.environ.get("COUNTERFACTORY_BENCH_DRIVER") == "1"
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    with PeakDriverRSS() as drv:
        dt, samples, peak, _, stream = timed_run(cfg, local=False, sample_all=not driver_only)
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    sampler = drv.cpu + TIMED["sampler_cpu_s"]
    driver_cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime) - sampler
    pipe = json.loads(max(Path(root).glob("demo/v*/summary.json"), key=lambda p: p.stat().st_mtime).read_text())["pipeline"]
    stream_cpu = pipe.get("driver_cpu_seconds") - sampler * min(1.0, stream / dt)
    print(json.dumps({"seconds": dt, "samples": samples, "peak_rss": peak, "stream_seconds": stream,
                      "driver_cpu_s": driver_cpu, "driver_stream_cpu_s": stream_cpu, "sampler_cpu_s": sampler,
                      "driver_peak_rss": drv.peak, "inputs": n}))


def run_ray(n: int, cpus: int, root: Path, env: dict | None = None) -> dict:
    extra = ["--variants", ",".join(VARIANTS)] if VARIANTS else []
    out = subprocess.run([sys.executable, __file__, "--ray-child", str(n), str(cpus), str(root), *extra],
                         capture_output=True, text=True, check=True, env={**os.environ, **(env or {})})
    return json.loads(out.stdout.strip().splitlines()[-1])


def _plain_tar(samples: list, path: Path, fsync: bool) -> None:
    """The floor for shard writing: tarfile's own loop over the same member bytes."""
    with open(path, "wb") as f:
        with tarfile.open(fileobj=f, mode="w") as tf:
            for key, parts in samples:
                for ext in sorted(parts):
                    ti = tarfile.TarInfo(f"{key}.{ext}")
                    ti.size = len(parts[ext])
                    tf.addfile(ti, io.BytesIO(parts[ext]))
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def bench_writer(n: int, root: Path, rounds: int = 3) -> dict:
    """Our writer against a plain tarfile loop on the same member bytes (encode measured apart).

    Ours fsyncs every shard (and its journal entry, index, manifest) before renaming it into
    place; a plain loop does not, so it is also timed with one fsync of its tar before close.
    One untimed round first (imports, e.g. pandas that pyarrow pulls in on the first parquet
    write, already loaded by Ray Data in a real run), then ``rounds`` rounds, the three writers
    interleaved in each, each output deleted before the next write; medians reported."""

    from counterfactory.pipeline.datasink import ShardSink
    from counterfactory.pipeline.datasink import _feed as feed
    from counterfactory.pipeline.runner import local_batches
    from counterfactory.pipeline.writer import DatasetCommit, PartEncoder
    from counterfactory.sample import decode_batch
    from tests.conftest import load_records

    cfg = scenes_config(n, root)
    root.mkdir(parents=True, exist_ok=True)
    records = load_records(cfg)
    t0 = time.perf_counter()
    batches = list(local_batches(cfg, records, stop_after="verify"))
    stages_s = time.perf_counter() - t0

    enc = PartEncoder("jpg", 95)
    t0 = time.perf_counter()
    encoded = [enc(b) for b in batches]
    encode_s = time.perf_counter() - t0
    n_images = sum(len(s.arrays["parts"]) - 1 for b in encoded for s in decode_batch(b) if s.ok)
    samples = [(s.key, s.arrays["parts"]) for b in encoded for s in decode_batch(b) if s.ok]

    # what a shard task hands its writer: decoded samples, in input order (make_and_write_shard);
    # the plain loop gets the same members already decoded, so neither pays the decode
    decoded = [s for b in encoded for s in decode_batch(b)]

    def plain(fsync: bool) -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        _plain_tar(samples, root / "plain.tar", fsync)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        (root / "plain.tar").unlink()
        return dt, cpu

    def ours(pairs: bool = False) -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        out = root / "ours"
        commit = DatasetCommit(out, "bench", 256, len(records), {}, "x", pairs=pairs)
        commit.on_write_start()
        sink = ShardSink(str(out), "bench", 256, len(records), pairs)
        for k, group in itertools.groupby(decoded, key=lambda s: s.idx // sink.shard_size):
            writer = sink.writer(k)
            feed(writer, list(group))
            commit.on_write_result(writer.finish())
        commit.on_write_complete()
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        shutil.rmtree(out)
        return dt, cpu

    plain(False), ours()  # warm-up, untimed
    times: dict[str, list[tuple[float, float]]] = {"plain_s": [], "plain_fsync_s": [], "ours_s": [], "ours_pairs_s": []}
    for _ in range(rounds):
        times["plain_s"].append(plain(False))
        times["ours_s"].append(ours())
        times["plain_fsync_s"].append(plain(True))
        times["ours_pairs_s"].append(ours(pairs=True))
    mb = sum(len(v) for _, p in samples for v in p.values()) / 1e6
    return {"samples": len(samples), "MB": mb, **{k: statistics.median(t for t, _ in v) for k, v in times.items()},
            **{k.replace("_s", "_cpu_s"): statistics.median(c for _, c in v) for k, v in times.items()},
            "rounds": rounds, "encode_ms_per_image": 1000 * encode_s / max(n_images, 1), "stages_s": stages_s}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--growth", default="100,1000,10000")
    ap.add_argument("--only", default="floor,ray,growth,writer,driver,profile")
    ap.add_argument("--rounds", type=int, default=3, help="runs per floor/Ray setting (median reported)")
    ap.add_argument("--ray-child", nargs=3)
    ap.add_argument("--variants", default=None, help="comma list: pin the edit variants (default: demo config)")
    args = ap.parse_args()
    global VARIANTS
    if args.variants:
        VARIANTS = args.variants.split(",")
    if args.ray_child:
        ray_child(int(args.ray_child[0]), int(args.ray_child[1]), args.ray_child[2])
        return
    only = set(args.only.split(","))
    rows: list[tuple[str, str]] = []
    tmp = Path(tempfile.mkdtemp(prefix="cf-bench-"))
    try:
        print(f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"{psutil.virtual_memory().total / 2**30:.0f} GiB, python {platform.python_version()}")
        # Each setting runs `--rounds` times, interleaved (floor, 1 CPU, 2 CPUs, floor, ...), each
        # into a fresh output root, and the median is reported with the range: on this VM one
        # run of the same setting can be 20 % off the next, which decides a ratio to the floor.
        rounds = max(1, args.rounds)
        timings: dict[str, list[dict]] = {"floor": [], "ray1": [], "ray2": []}
        growth_ns = [int(x) for x in args.growth.split(",")] if "growth" in only else []
        # the growth sizes below --n run in the same rounds, so that their ratio to N=--n is
        # taken over the same stretch of the VM's drifting speed
        short = {n: [] for n in growth_ns if n < args.n}
        for r in range(rounds if {"floor", "ray"} & only else 0):
            dt, samples, peak, cpu, stream = timed_run(scenes_config(args.n, tmp / f"floor-{r}"), local=True)
            timings["floor"].append({"seconds": dt, "samples": samples, "peak_rss": peak, "cpu": cpu,
                                     "stream_seconds": stream})
            if "ray" in only:
                for cpus in (1, 2):
                    timings[f"ray{cpus}"].append(run_ray(args.n, cpus, tmp / f"ray{cpus}-{r}"))
                for n, runs in short.items():
                    runs.append(run_ray(n, 2, tmp / f"growth{n}-{r}"))

        def rate(runs: list[dict]) -> tuple[float, float, float]:
            rates = sorted(x["samples"] / x["seconds"] for x in runs)
            return statistics.median(rates), rates[0], rates[-1]

        floor = None
        if timings["floor"]:
            floor, lo, hi = rate(timings["floor"])
            cpu = statistics.median(1000 * x["cpu"] / x["samples"] for x in timings["floor"])
            after = statistics.median(x["seconds"] - x["stream_seconds"] for x in timings["floor"])
            share = statistics.median((x["seconds"] - x["stream_seconds"]) / x["seconds"] for x in timings["floor"])
            rows.append((f"floor (plain loop + the audit's helper process), N={args.n}, median of {rounds}",
                         f"{floor:.1f} pairs/s (range {lo:.1f}-{hi:.1f}; {cpu:.1f} CPU ms/pair, the helper's "
                         f"included); after the stream {after:.1f} s = {100 * share:.1f} % of the run"))
        for cpus in (1, 2):
            if timings[f"ray{cpus}"]:
                med, lo, hi = rate(timings[f"ray{cpus}"])
                # the stream alone (first input read to last shard committed): the serial part after
                # it (the card, the audit at publish) weighs on the whole run's ratio, not on this one
                stream = (statistics.median(x["samples"] / x["stream_seconds"] for x in timings[f"ray{cpus}"])
                          / statistics.median(x["samples"] / x["stream_seconds"] for x in timings["floor"]))
                # Ray's own scaling, 2 CPUs against 1: the floor's wall rate uses the helper's core too
                scale = (f"; {med / rate(timings['ray1'])[0]:.2f}x Ray 1 CPU"
                         if cpus == 2 and timings["ray1"] else "")
                rows.append((f"ray pipeline, {cpus} CPU, N={args.n}, median of {rounds}",
                             f"{med:.1f} pairs/s (range {lo:.1f}-{hi:.1f}) = {med / floor:.2f}x floor "
                             f"(range {lo / floor:.2f}-{hi / floor:.2f}x); the stream alone {stream:.2f}x{scale}"))
        if "growth" in only:
            per_n: dict[int, dict[str, float]] = {}
            for n in growth_ns:
                if n == args.n and timings["ray2"]:
                    runs = timings["ray2"]  # the same setting as the 2-CPU rounds above
                elif short.get(n):
                    runs = short[n]
                else:  # the long N once; the short ones as often as the rounds above
                    runs = [run_ray(n, 2, tmp / f"growth{n}-{r}") for r in range(rounds if n <= args.n else 1)]
                per_n[n] = {"per": statistics.median(1000 * x["seconds"] / x["samples"] for x in runs),
                            "seconds": statistics.median(x["seconds"] for x in runs),
                            "samples": statistics.median(x["samples"] for x in runs),
                            "rss": max(x["peak_rss"] for x in runs), "k": len(runs),
                            "stream": statistics.median(1000 * x["stream_seconds"] / x["samples"] for x in runs),
                            # per run, not per pair: planning, closing the writer, the card, publishing
                            "fixed": statistics.median(x["seconds"] - x["stream_seconds"] for x in runs)}
            ns = sorted(per_n)
            base, mid = per_n[ns[0]], per_n[args.n if args.n in per_n else ns[0]]
            prev = None
            for n in ns:
                g = per_n[n]
                # marginal: what each further pair costs between two sizes, (T2 - T1) / (S2 - S1) of
                # whole runs; a fixed cost per run cancels out, a cost that grows with N does not
                marginal = "" if prev is None else (
                    f"; marginal {prev} -> {n}: "
                    f"{1000 * (g['seconds'] - per_n[prev]['seconds']) / (g['samples'] - per_n[prev]['samples']):.2f} ms/pair")
                rows.append((f"growth N={n} (ray, 2 CPU, median of {g['k']})",
                             f"{g['per']:.2f} ms/pair ({g['per'] / mid['per']:.2f}x N={args.n}; stream alone "
                             f"{g['stream']:.2f} ms/pair = {g['stream'] / mid['stream']:.2f}x; per-run fixed "
                             f"{g['fixed']:.2f} s{marginal})  peak RSS {g['rss'] / 2**20:.0f} MiB "
                             f"({g['rss'] / base['rss']:.2f}x N={ns[0]})"))
                prev = n
        if "writer" in only:
            w = bench_writer(min(args.n, 500), tmp / "writer")
            rows.append((f"writer, {w['samples']} samples, {w['MB']:.0f} MB (median of {w['rounds']})",
                         f"ours {w['MB'] / w['ours_s']:.0f} MB/s vs plain tarfile {w['MB'] / w['plain_s']:.0f} MB/s "
                         f"= {w['plain_s'] / w['ours_s']:.2f}x; vs plain tarfile + fsync "
                         f"{w['MB'] / w['plain_fsync_s']:.0f} MB/s = {w['plain_fsync_s'] / w['ours_s']:.2f}x; "
                         f"CPU {1000 * w['ours_cpu_s']:.0f} vs {1000 * w['plain_fsync_cpu_s']:.0f} ms = "
                         f"{w['plain_fsync_cpu_s'] / w['ours_cpu_s']:.2f}x"))
            rows.append(("writer with the pairs/ copy beside each shard (same MB counted once)",
                         f"{w['MB'] / w['ours_pairs_s']:.0f} MB/s = {w['plain_fsync_s'] / w['ours_pairs_s']:.2f}x "
                         f"plain tarfile + fsync; CPU {1000 * w['ours_pairs_cpu_s']:.0f} ms = "
                         f"{w['plain_fsync_cpu_s'] / w['ours_pairs_cpu_s']:.2f}x"))
            rows.append(("image encode (JPEG q95 / PNG, on the workers)",
                         f"{w['encode_ms_per_image']:.2f} ms/image"))
        if "driver" in only:
            straggle = {"COUNTERFACTORY_STRAGGLER_S": "30"}
            for label, env in (("", {"COUNTERFACTORY_BENCH_DRIVER": "1"}), (", first shard 30 s late", straggle)):
                d = run_ray(args.n, 2, tmp / f"driver{len(label)}", env)
                print(json.dumps({"driver_run": label, **d}), flush=True)
                rows.append((f"driver process (ray, 2 CPU, N={args.n}{label})",
                             f"stream + commit {1000 * d['driver_stream_cpu_s'] / d['inputs']:.2f} CPU ms/input, "
                             f"whole run with card and audit {1000 * d['driver_cpu_s'] / d['inputs']:.2f} "
                             "(RUSAGE_SELF), "
                             f"peak RSS {d['driver_peak_rss'] / 2**20:.0f} MiB, {d['seconds']:.1f} s"))
        if "profile" in only:
            cfg = load_config(REPO / "configs" / "demo.yaml", [f"output.root={tmp / 'demo'}"])
            res = run_pipeline(cfg, local=True)
            total = sum(res.stage_seconds.values())
            share = ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in
                              sorted(res.stage_seconds.items(), key=lambda kv: -kv[1]))
            rows.append((f"demo profile ({res.manifest['counts']['inputs']} inputs, {total:.2f} s in stages)", share))
        width = max(len(r[0]) for r in rows)
        print(f"| {'benchmark'.ljust(width)} | result |")
        print(f"|{'-' * (width + 2)}|--------|")
        for k, v in rows:
            print(f"| {k.ljust(width)} | {v} |")
    finally:  # datasets of every N (GBs for a full run): temporary, like the name says
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
