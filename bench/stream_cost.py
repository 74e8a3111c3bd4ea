"""What the floor's stream spends outside the stages (issue 27, s27encode), in CPU time.

``--threads N``: the overlapped plain loop as the floor runs it (``local_batches(overlap=True)``
into ``datasink.write_local``, no publish), each thread's CPU per pair read from
``/proc/self/task`` (a monitor thread, its own CPU left out): the stages (``cf-step0``), the part
encoder (the last step), the reader and the writer (the main thread). The shortcut audit's
collector runs in the writer; ``--audit`` keeps it, by default it is off (``audit.sample_pairs=0``)
so the writer's own figure shows.

``--parts N``: the part encoder and the shard writer alone on the verified samples of N inputs,
each timed best of ``--rounds`` in CPU time: ``PartEncoder.encode_samples`` (JPEG, PNG masks,
JSON), then ``ShardWriter`` (shard and ``pairs/`` tars, hashes, index rows, journal).

Run two commits side by side (a copy of the old tree with this file in its bench/, each with
its own PYTHONPATH) at the same time, as ``bench/cpu_cost.py`` says.
Usage: python bench/stream_cost.py --threads 300 [--audit] | --parts 120 [--rounds 5] [--questions 2] [--floors]
"""

from __future__ import annotations

import argparse
import copy
import inspect
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import run as bench_run  # noqa: E402

from counterfactory.pipeline import writer  # noqa: E402
from counterfactory.pipeline.datasink import ShardSink, write_local  # noqa: E402
from counterfactory.pipeline.inputs import plan_inputs  # noqa: E402
from counterfactory.pipeline.runner import local_batches  # noqa: E402
from counterfactory.pipeline.writer import PartEncoder, ShardWriter  # noqa: E402
from counterfactory.sample import decode_batch  # noqa: E402


def _thread_cpu(stop: threading.Event, cpu: dict[int, float], names: dict[int, str], every: float = 0.02,
                trace: list[tuple[float, float]] | None = None) -> None:
    """Each thread's CPU seconds (user + system, from ``/proc/self/task``) into ``cpu`` by thread
    id, its name into ``names``, every ``every`` seconds until ``stop``; ``trace``: the main
    thread's CPU over time, as (``perf_counter``, seconds) pairs."""
    tick = os.sysconf("SC_CLK_TCK")
    main = threading.main_thread().native_id
    while not stop.is_set():
        for t in threading.enumerate():
            if t.native_id:
                names[t.native_id] = t.name
        for tid in os.listdir("/proc/self/task"):
            try:
                f = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # the thread just ended: its last reading stays
                continue
            cpu[int(tid)] = (int(f[11]) + int(f[12])) / tick
            if int(tid) not in names and -int(tid) not in names:  # a thread Python did not start: its kernel name, once
                try:
                    names.setdefault(-int(tid), Path(f"/proc/self/task/{tid}/comm").read_text().strip())
                except OSError:
                    pass
        if trace is not None:
            trace.append((time.perf_counter(), cpu.get(main, 0.0)))
        time.sleep(every)


def threads(n: int, audit: bool) -> str:
    tmp = Path(tempfile.mkdtemp(prefix="cf-stream-"))
    try:
        cfg = bench_run.scenes_config(n, tmp)
        if not audit:
            cfg = cfg.model_copy(update={"audit": cfg.audit.model_copy(update={"sample_pairs": 0})})
        plan = plan_inputs(cfg, n)
        (tmp / "out").mkdir()
        if audit:  # the driver's plan, as DatasetCommit.on_write_start writes it: the writers read it
            from counterfactory.audit_features import audit_sample, write_plan

            write_plan(tmp / "out", audit_sample(cfg.model_dump(mode="json"), n))
        sink = ShardSink(str(tmp / "out"), "d", cfg.output.shard_size, n)
        # the samples straight to the writer where this tree can (s27encode), else its rows
        kw = {"as_samples": True} if "as_samples" in inspect.signature(local_batches).parameters else {}
        cpu: dict[int, float] = {}
        names: dict[int, str] = {}
        stop = threading.Event()
        mon = threading.Thread(target=_thread_cpu, args=(stop, cpu, names), name="monitor")
        mon.start()
        m0, c0 = time.thread_time(), time.process_time()
        entries = list(write_local(local_batches(cfg, plan, overlap=True, **kw), sink))
        total, main = time.process_time() - c0, time.thread_time() - m0
        time.sleep(0.1)
        stop.set()
        mon.join()
        pairs = sum(e["samples"] for e in entries)
        own = sum(c for t, c in cpu.items() if names.get(t) == "monitor")
        role = {"MainThread": "writer" + (" + audit collector" if audit else ""), "cf-read": "reader",
                "cf-step0": "stages"}
        # threads Python did not start (OpenBLAS, OpenCV pools): summed as "native", by name
        native = sum(c for t, c in cpu.items() if t not in names)
        kinds: dict[str, float] = {}
        for t, c in cpu.items():
            if t not in names:
                kinds[names.get(-t, "?")] = kinds.get(names.get(-t, "?"), 0.0) + c
        per = [f"{role.get(names[t], names[t])} {1000 * c / pairs:.2f}"
               for t, c in sorted(cpu.items(), key=lambda kv: -kv[1])
               if t in names and names[t] not in ("MainThread", "monitor") and c >= 0.01]
        per.append(f"native threads {1000 * native / pairs:.2f} (" + ", ".join(
            f"{k} {1000 * c / pairs:.2f}" for k, c in sorted(kinds.items(), key=lambda kv: -kv[1]) if c) + ")")
        last = max((names[t] for t in names if names[t].startswith("cf-step")), default="")
        per = [p.replace(last, "part encoder", 1) if last and p.startswith(last) else p for p in per]
        return (f"stream, {n} inputs, {pairs} pairs, audit {'on' if audit else 'off'}: {1000 * (total - own) / pairs:.1f} "
                f"CPU ms/pair; per thread, CPU ms/pair: {role['MainThread']} {1000 * main / pairs:.2f}, " + ", ".join(per))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def with_questions(cfg: Any, n: int, questions: int) -> Any:
    """The bench's config with ``questions`` questions per scene: inputs of one image in a row,
    one per question (the demo asks 2), about ``n`` inputs in all."""
    if questions == 1:
        return cfg
    return cfg.model_copy(update={"inputs": [i.model_copy(update={"questions_per_scene": questions,
                                                                   "count": -(-n // questions)})
                                             for i in cfg.inputs]})


def parts(n: int, rounds: int, questions: int = 1, floors: bool = False) -> str:
    from tests.conftest import load_records

    tmp = Path(tempfile.mkdtemp(prefix="cf-stream-"))
    try:
        cfg = with_questions(bench_run.scenes_config(n, tmp), n, questions)
        verified = [s for b in local_batches(cfg, load_records(cfg), encode=False) for s in decode_batch(b)]
        enc = PartEncoder(cfg.output.image_format, cfg.output.jpeg_quality)
        encodes = _pictures_encoded(PartEncoder(cfg.output.image_format, cfg.output.jpeg_quality), verified)
        best_enc = best_write = float("inf")
        encoded = []
        for r in range(rounds):
            batch = _copies(verified)
            c0 = time.process_time()
            enc.encode_samples(batch)
            best_enc = min(best_enc, time.process_time() - c0)
            encoded = batch
            out = tmp / f"w{r}"
            out.mkdir()
            w = ShardWriter(out, "d", 0, 0, len(encoded))
            c0 = time.process_time()
            for i, s in enumerate(encoded):
                w.add(i, s.key, s.status, s.meta, s.arrays.get("parts", {}))
            w.finish()
            best_write = min(best_write, time.process_time() - c0)
        ok = [s for s in encoded if s.ok]
        png = [len(b) for s in ok for name, b in s.arrays["parts"].items() if name.endswith(".png")]
        line = (f"{len(verified)} samples ({len(ok)} accepted), best of {rounds}: part encoder "
                f"{1000 * best_enc / len(verified):.2f} CPU ms/sample, writer (shard + pairs/ + journal) "
                f"{1000 * best_write / len(verified):.2f} CPU ms/sample; {len(png)} PNG masks, "
                f"{sum(png) / max(1, len(png)):.0f} B each on average; {encodes} pictures encoded of "
                f"{sum(1 + len(s.meta['variants']) for s in ok)} (the parts equal to each sample's encoded alone)")
        return line + ("\n" + _floors(verified, tmp / f"w{rounds - 1}", rounds, cfg) if floors else "")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _copies(samples: list) -> list:
    out = [copy.copy(s) for s in samples]
    for s in out:
        s.arrays, s.meta = dict(s.arrays), copy.deepcopy(s.meta)
    return out


def _pictures_encoded(enc: PartEncoder, verified: list) -> int:
    """How many pictures ``enc`` encodes for copies of ``verified`` (``_encode_image`` calls: a
    tree that reuses the bytes a source's questions share encodes fewer); its parts are checked
    equal to each sample's encoded alone by an encoder of its own."""
    calls: list[int] = []
    real = writer._encode_image
    writer._encode_image = lambda *a: calls.append(1) or real(*a)
    try:
        batch = _copies(verified)
        enc.encode_samples(batch)
    finally:
        writer._encode_image = real
    alone = _copies(verified)
    for s in alone:
        PartEncoder(enc.fmt, enc.quality).encode_samples([s])
    if [s.arrays for s in batch] != [s.arrays for s in alone]:
        raise AssertionError("the encoder's parts differ from each sample's encoded alone")
    return len(calls)


def _floors(verified: list, out: Path, rounds: int, cfg: Any) -> str:
    """What no change of ours can take off the encoder and the writer while the bytes stay the
    same, best of ``rounds`` in CPU time: the codec calls alone (every picture and mask of the
    accepted samples through ``_encode_image`` / ``encode_mask``, as the encoder calls them), and
    the shard's and ``pairs/`` shard's bytes (as written) hashed with sha256 and written to a file,
    one update and one write per sample's worth, then fsynced."""
    import hashlib

    from counterfactory.pipeline.writer import _encode_image, encode_mask

    fmt, q = cfg.output.image_format, cfg.output.jpeg_quality
    pics = [a for s in verified if s.ok for k, a in s.arrays.items() if k == "image" or k.startswith("variant/")]
    masks = [a for s in verified if s.ok for k, a in s.arrays.items()
             if k == "mask" or (k.startswith("mask/") and k[5:] in s.meta["variants"])]
    data = [(out / "d-000000.tar").read_bytes(), (out / "pairs" / "d-000000.tar").read_bytes()]
    step = max(1, sum(map(len, data)) // max(1, 2 * len(verified)))  # about one sample's bytes

    def best(fn: Any) -> float:
        t = float("inf")
        for _ in range(rounds):
            c0 = time.process_time()
            fn()
            t = min(t, time.process_time() - c0)
        return 1000 * t / len(verified)

    def hash_write() -> None:
        with open(out / "floor.bin", "wb", buffering=0) as f:
            for buf in data:
                sha = hashlib.sha256()
                for i in range(0, len(buf), step):
                    chunk = buf[i:i + step]
                    sha.update(chunk)
                    f.write(chunk)
            os.fsync(f.fileno())

    jpeg = best(lambda: [_encode_image(a, fmt, q) for a in pics])
    png = best(lambda: [encode_mask(a) for a in masks])
    hw = best(hash_write)
    return (f"floors, CPU ms/sample: codecs {jpeg + png:.2f} ({len(pics) / len(verified):.1f} pictures "
            f"{jpeg:.2f}, {len(masks) / len(verified):.1f} masks {png:.2f}); sha256 + write + fsync of the shard "
            f"and pairs/ bytes ({sum(map(len, data)) / len(verified) / 1e3:.0f} KB/sample) {hw:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=0, help="per-thread CPU of the floor's stream on this many inputs")
    ap.add_argument("--audit", action="store_true", help="with --threads: the audit's collector on")
    ap.add_argument("--parts", type=int, default=0, help="the part encoder and the writer alone on this many inputs")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--questions", type=int, default=1, help="with --parts: questions per scene (inputs of one "
                    "image in a row, as the demo's 2; N inputs = N / questions scenes)")
    ap.add_argument("--floors", action="store_true", help="with --parts: the codecs alone and the sha256 + write "
                    "of the written bytes alone (what the same bytes cost at least)")
    args = ap.parse_args()
    if args.parts:
        print(parts(args.parts, args.rounds, args.questions, args.floors))
    else:
        print(threads(args.threads or 300, args.audit))


if __name__ == "__main__":
    main()
