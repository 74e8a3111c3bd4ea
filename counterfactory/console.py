"""What the command line shows while it works and when it ends.

One live progress display (rich, on stderr, only when stderr is a terminal, so a log file or a
pipe gets no control codes): inputs read, pairs written, rejects by reason, rate and ETA for a
run, and a count for the long verbs (export). The end-of-run summary is plain text wrapped to
80 columns (a table cut at the terminal's width hid figures), separates variants that do not
apply to a sample (``not_applicable``: expected) from those a filter dropped, and names the
next commands.
"""

from __future__ import annotations

import json
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

WIDTH = 80
EXPECTED = {"not_applicable"}  # a variant that cannot exist for this sample (one instance for `count`)


def _console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


class RunProgress:
    """``on_progress(writer)`` target for ``run_pipeline``: a live line of figures."""

    def __init__(self, total: int, label: str = "run", enabled: bool = True) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.console = _console()
        self.enabled = enabled and self.console.is_terminal
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(bar_width=20), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                                 TextColumn("{task.fields[extra]}"), console=self.console,
                                 disable=not self.enabled, transient=False)
        self.task = self.progress.add_task(label, total=total or None, rate="", extra="")
        self.t0 = time.monotonic()
        self.start_idx: int | None = None

    def __enter__(self) -> RunProgress:
        self.called = False
        self.progress.start()  # at once: Ray's start-up is the slowest part of a small run
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self.called:  # nothing ran (a spec whose version exists): leave no empty bar
            self.progress.live.transient = True
        self.progress.stop()

    def __call__(self, writer: Any) -> None:
        self.called = True
        done = writer.next_idx
        if self.start_idx is None:  # a resumed run starts past its journaled shards
            self.start_idx = writer.resumed_inputs
        dt = max(time.monotonic() - self.t0, 1e-6)
        rate = (done - self.start_idx) / dt
        top = ", ".join(f"{k} {n}" for k, n in writer.reject_counts.most_common(2))
        extra = f"{sum(writer.variant_counts.values())} pairs" + (f", rejected {top}" if top else "")
        self.progress.update(self.task, completed=done, rate=f"{rate:.1f}/s", extra=extra)


class CountProgress:
    """A count with a total for a long verb (export: samples read)."""

    def __init__(self, total: int | None, label: str, enabled: bool = True) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.console = _console()
        self.progress = Progress(TextColumn(label), BarColumn(bar_width=30), MofNCompleteColumn(),
                                 TimeRemainingColumn(), console=self.console,
                                 disable=not (enabled and self.console.is_terminal))
        self.task = self.progress.add_task(label, total=total)

    def __enter__(self) -> CountProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    def __call__(self, done: int) -> None:
        self.progress.update(self.task, completed=done)


def status(text: str, enabled: bool = True) -> Any:
    """A spinner for a verb that has no count to show (verify, push)."""
    import contextlib

    con = _console()
    return con.status(text) if enabled and con.is_terminal else contextlib.nullcontext()


# -- the end of a run ---------------------------------------------------------------------------
def _wrap(head: str, text: str) -> list[str]:
    return textwrap.wrap(text, WIDTH, initial_indent=f"  {head:<10}", subsequent_indent=" " * 12) or [f"  {head}"]


def run_summary(res: Any, *, root_arg: str = "") -> list[str]:
    """The end of a run as lines of at most 80 columns."""
    m = res.manifest
    c = m["counts"]
    name = f"{m['dataset']}@{res.label}"
    pairs = sum(c["variants"].values())
    lines = [f"{name}: {c['samples']} samples, {pairs} pairs from {c['inputs']} inputs "
             f"in {len(m['shards'])} shard(s), {res.seconds:.1f} s"]
    if getattr(res, "limited", False):
        lines.append(f"  limited run (--limit): not made latest; load it as {name}")
    variants = sorted(c["variants"].items(), key=lambda kv: (-kv[1], kv[0]))
    lines += _wrap("variants", ", ".join(f"{k} {v}" for k, v in variants) or "-")
    inputs = [r for r in m["rejects"] if r["scope"] == "input"]
    failed = [r for r in m["rejects"] if r["scope"] == "variant" and r["reason"] not in EXPECTED]
    expected = [r for r in m["rejects"] if r["scope"] == "variant" and r["reason"] in EXPECTED]

    def why(rows: list[dict[str, Any]]) -> str:
        rows = sorted(rows, key=lambda r: (-r["count"], r["stage"], r["reason"]))
        return ", ".join(f"{r['stage']}/{r['reason']} {r['count']}" for r in rows)

    n_in = sum(r["count"] for r in inputs)
    lines += _wrap("rejected", f"{n_in} input(s)" + (f": {why(inputs)}" if inputs else ""))
    n_f = sum(r["count"] for r in failed)
    lines += _wrap("dropped", f"{n_f} variant(s) a filter removed" + (f": {why(failed)}" if failed else ""))
    n_e = sum(r["count"] for r in expected)
    if n_e:
        lines += _wrap("n/a", f"{n_e} variant(s) that do not apply to their sample (expected, "
                              f"e.g. count with one instance): {why(expected)}")
    lines += stage_lines(res.out_dir)
    lines.append(version_line(res))
    lines.append(f"output: {res.location}")
    lines += next_commands(name, root_arg)
    return lines


def version_line(res: Any) -> str:
    return (f"version: {res.manifest['dataset']}@{res.label}  spec id {res.spec_id[:12]}  "
            f"content id {res.content_id[:12]}")


def next_commands(name: str, root_arg: str = "") -> list[str]:
    cmds = [(f"counterfactory card {name}{root_arg} --html", "look at every pair"),
            (f"counterfactory verify {name}{root_arg}", "checksums"),
            (f"counterfactory export {name}{root_arg} --format trl --out DIR", "for a trainer")]
    return ["next:"] + [f"  {c}" + (f"  # {w}" if len(c) + len(w) + 6 <= WIDTH else "") for c, w in cmds]


def stage_lines(out_dir: Path) -> list[str]:
    """The run report from summary.json, columns that fit 80 characters."""
    try:
        summary = json.loads((Path(out_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        return []
    rows = summary.get("stages", [])
    if not rows:
        return []
    wait = any(r.get("waiting_seconds") is not None for r in rows)
    gpu = any(r.get("gpu_busy_share") is not None for r in rows)
    head = f"  {'stage':<10}{'in':>7}{'out':>7}{'rejects':>9}{'busy s':>9}{'rows/s':>9}"
    head += f"{'wait s':>9}" if wait else ""
    head += f"{'GPU':>6}" if gpu else ""
    out = ["run report (per stage; rejects: inputs + variants):", head]
    for r in rows:
        rate = r.get("rows_per_busy_second")
        rej = f"{r['rejected_inputs']}+{r['rejected_variants']}v"
        rate_s = "-" if rate is None else f"{rate:.1f}"
        line = (f"  {r['stage'][:10]:<10}{r['rows_in']:>7}{r['rows_out']:>7}"
                f"{rej:>9}{r['busy_seconds']:>9.2f}{rate_s:>9}")
        if wait:
            w = r.get("waiting_seconds")
            w_s = "-" if w is None else f"{w:.1f}"
            line += f"{w_s:>9}"
        if gpu:
            g = r.get("gpu_busy_share")
            g_s = "-" if g is None else f"{g:.0%}"
            line += f"{g_s:>6}"
        out.append(line)
    p = summary.get("pipeline", {})
    ips = p.get("inputs_per_second")
    ips_s = "-" if ips is None else f"{ips:.1f}"
    tail = (f"  pipeline {p.get('wall_seconds', 0):.1f} s, {ips_s} inputs/s, "
            f"driver waited {p.get('driver_wait_seconds', 0):.1f} s")
    resumed = summary.get("resumed", {})
    if resumed.get("shards"):
        tail += f"; resumed after {resumed['shards']} shard(s)"
    out += textwrap.wrap(tail, WIDTH, subsequent_indent="    ")
    return out


def print_lines(lines: list[str]) -> None:
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()
