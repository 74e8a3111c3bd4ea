"""Command line: ``counterfactory VERB ...`` (``counterfactory VERB --help`` for each verb).

Verbs: run, versions, card, verify, regenerate, diff, eval, export, push, tag, plan, submit,
status, logs, stop. Overrides (``dotted.key=value``) and flags go in any order. User errors are
one line on stderr. Exit codes: 0 done (status: the job SUCCEEDED), 1 a check failed or the job
FAILED/STOPPED, 2 a usage or input error, 3 a run stopped by its failure budget or nothing to
publish (status: the job is still PENDING/RUNNING).

DATASET is a dataset name under --root (default ./outputs; a local folder or an object-store URI
such as s3://bucket/prefix) or a path or URI to ROOT/DATASET; @VERSION is a label (v1, v2, ...),
``latest`` (the default) or a tag given with ``counterfactory tag``.

This module is over 450 lines because it is the whole command line: one parser and one small
function per verb; output formatting lives in ``console.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

from counterfactory import layout
from counterfactory.pipeline.config import ConfigError, load_config
from counterfactory.publish import FailureBudgetExceeded


def _print_plan(cfg, n_inputs: int) -> None:
    from rich.console import Console
    from rich.table import Table

    from counterfactory.pipeline.runner import plan_steps

    con = Console()
    con.print(yaml.safe_dump(cfg.resolved(), sort_keys=False))
    t = Table(title=f"stage plan ({n_inputs} inputs): one row per map_batches step")
    for col in ("stages (backend)", "runs as", "CPUs", "GPUs", "actors", "batch"):
        t.add_column(col, no_wrap=col != "stages (backend)")
    for step in plan_steps(cfg):
        r = step.resources
        t.add_row("\n".join(f"{s.name} ({s.backend})" for s in step.specs), "actors" if step.actors else "tasks",
                  str(r.num_cpus), str(r.num_gpus), str(r.concurrency or 1) if step.actors else "auto",
                  str(r.batch_size))
    con.print(t)


def _command_line(argv: list[str] | None) -> str:
    import shlex

    args = sys.argv[1:] if argv is None else argv
    return "counterfactory " + " ".join(shlex.quote(a) for a in args)


def cmd_run(args: argparse.Namespace) -> int:
    from counterfactory import console
    from counterfactory.pipeline.inputs import plan_inputs

    # --strict: a dataset over the audit's thresholds is refused at publish (exit 3); it is a
    # failure-budget setting, so it changes no spec id
    overrides = [*args.overrides, *(["failure_budget.refuse_on_audit=true"] if args.strict else [])]
    cfg = load_config(args.config, overrides)
    if args.dry_run:
        _print_plan(cfg, plan_inputs(cfg, args.limit).n)
        return 0
    from counterfactory.pipeline.runner import run_pipeline

    total = plan_inputs(cfg, args.limit).n  # counting is cheap (no image is read)
    with console.RunProgress(total, f"{cfg.dataset}", enabled=not args.quiet) as display:
        res = run_pipeline(cfg, limit=args.limit, progress=args.verbose, command=args.command_line,
                           force=args.force, latest=args.latest, on_progress=display, verbose=args.verbose)
    if res.reused:
        if args.quiet:
            print(console.version_line(res))
            return 0
        print(f"{cfg.dataset}@{res.label} already holds this spec (spec id {res.spec_id[:12]}, "
              f"content id {res.content_id[:12]}): nothing to do. Use --force to build a new version.")
        print(f"output: {res.location}")
        return 0
    if args.quiet:
        print(console.version_line(res))
        return 0
    root_arg = "" if cfg.output.root == "outputs" else f" --root {_display_root(res)}"
    console.print_lines(console.run_summary(res, root_arg=root_arg))
    return 0


def _display_root(res) -> str:
    """The --root that names this version from here (relative when that is shorter)."""
    loc = res.location
    if "://" in loc:
        return loc.rsplit("/", 2)[0]
    root = Path(loc).parent.parent
    rel = os.path.relpath(root)
    return rel if not rel.startswith("..") or len(rel) < len(str(root)) else str(root)


def cmd_versions(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from counterfactory import versions as V

    ds_dir = V.locate_dataset(args.dataset, args.root)
    latest = V.read_latest(ds_dir)
    tags: dict[str, list[str]] = {}
    for name, label in V.read_tags(ds_dir).items():
        tags.setdefault(label, []).append(name)
    rows = []
    for v in V.list_versions(ds_dir):
        try:
            c = v.manifest()["counts"]
        except (OSError, ValueError, KeyError):
            c = {}
        limit = (v.info.get("spec") or {}).get("limit") if V.is_limited(v) else None
        rows.append({"label": v.label, "latest": v.label == latest, "limited": limit, "tags": tags.get(v.label, []),
                     "spec_id": v.info.get("spec_id"), "content_id": v.info.get("content_id"),
                     "created": v.info.get("created"), "samples": c.get("samples"),
                     "rejected_inputs": c.get("rejected_inputs"), "rejected_variants": c.get("rejected_variants"),
                     "status": v.status(), "hub": v.info.get("hub", [])})
    unfinished = [p.name for p in V.staging_dirs(ds_dir)]
    if args.json:
        print(json.dumps({"dataset": str(ds_dir), "latest": latest, "versions": rows, "unfinished": unfinished},
                         indent=2))
        return 0
    t = Table(title=f"{ds_dir}")
    for col in ("label", "spec id", "content id", "date", "samples", "rejects", "status"):
        t.add_column(col, no_wrap=True)
    for r in rows:
        label = r["label"] + (" (latest)" if r["latest"] else "") + "".join(f" [{n}]" for n in r["tags"])
        if r["limited"] is not None:
            label += f" (limited: {r['limited']} inputs)"
        samples = "-" if r["samples"] is None else str(r["samples"])
        rejects = "-" if r["rejected_inputs"] is None else f"{r['rejected_inputs']} + {r['rejected_variants']} var."
        t.add_row(label, (r["spec_id"] or "-")[:12], (r["content_id"] or "-")[:12], r["created"] or "-",
                  samples, rejects, r["status"])
    for name in unfinished:
        t.add_row(name, "-", "-", "-", "-", "-", "unfinished run (in progress or crashed)")
    Console(width=max(140, Console().width)).print(t)
    return 0


def cmd_card(args: argparse.Namespace) -> int:
    from counterfactory import versions as V

    v = V.locate(args.dataset, args.root)
    if args.html or args.serve:
        from counterfactory import viewer

        page = viewer.build_viewer(v, out_dir=Path(args.out) if args.out else None,
                                   max_samples=args.max_samples)
        print(page.resolve())
        if args.serve:
            # the default viewer links ../README.md and ../card.json: serve the version folder
            base = v.path if page.parent == v.path / "viewer" else page.parent
            server = viewer.serve(base, port=args.port)
            host, port = server.server_address[:2]
            print(f"serving http://{host}:{port}/{page.relative_to(base).as_posix()}  (Ctrl-C to stop)",
                  flush=True)
            try:
                server.serve_forever()
            except KeyboardInterrupt:
                pass
            finally:
                server.server_close()
        return 0
    readme = v.path / "README.md"
    if not readme.exists():
        print(f"error: {v.path} has no README.md card", file=sys.stderr)
        return 1
    text = readme.read_text()
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.markdown import Markdown

        body = text.split("---", 2)[2] if text.startswith("---") else text
        Console().print(Markdown(body))
    else:
        print(text, end="")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    """Recompute a version's shortcut audit with the thresholds of its config; exit 3 when it is
    over them (so scripts can gate on it), 0 otherwise."""
    from counterfactory import audit
    from counterfactory import versions as V

    v = V.locate(args.dataset, args.root)
    if v.remote:
        raise V.VersionError(f"{args.dataset}: audit reads local versions only (copy it first)")
    try:
        a = audit.audit_version(v.path)
    except (KeyError, ValueError) as exc:
        raise V.VersionError(f"{v.path}: cannot audit: {exc}") from None
    if args.json:
        print(json.dumps(a, indent=2, sort_keys=True))
    else:
        print("\n".join(audit.summary_lines(a)))
    return 3 if a["warnings"] else 0


def cmd_verify(args: argparse.Namespace) -> int:
    from counterfactory import console
    from counterfactory import versions as V
    from counterfactory.verify import verify

    v = V.locate(args.dataset, args.root)
    with console.status(f"verifying {v.dataset}@{v.label}"):
        checks = verify(v)
    bad = [c for c in checks if not c.ok]
    for c in checks:
        if not c.ok or args.verbose:
            print(f"{'ok  ' if c.ok else 'FAIL'} {c.name}: {c.detail}")
    name = f"{v.dataset}@{v.label}"
    if bad:
        print(f"{name}: {len(bad)} problem(s) in {len(checks)} checks: " + ", ".join(c.name for c in bad))
        return 1
    n = sum(1 for c in checks if c.name.endswith(".tar"))
    print(f"{name}: ok ({n} shard(s), {len(checks)} checks, content id {v.content_id()[:12]})")
    return 0


def cmd_regenerate(args: argparse.Namespace) -> int:
    import shutil
    import tempfile

    from counterfactory import versions as V
    from counterfactory.regenerate import regenerate

    v = V.locate(args.dataset, args.root)
    if not (v.info.get("spec") or {}).get("config") and not (v.path / layout.CONFIG).exists():
        print(f"error: {v.path} records no spec to regenerate", file=sys.stderr)
        return 2
    scratch = Path(args.scratch) if args.scratch else Path(tempfile.mkdtemp(prefix="counterfactory-regen-"))
    try:
        from counterfactory import console

        with console.status(f"regenerating {v.dataset}@{v.label} in {scratch}", enabled=not args.quiet):
            rep = regenerate(v, scratch, local=args.local, progress=False, verbose=False)
    finally:
        if not args.keep and not args.scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    if args.json:
        print(json.dumps(rep, indent=2))
    else:
        for ch in rep["spec_changes"]:
            print(f"note: {ch['key']} differs from the stored spec: {ch['a']} -> {ch['b']}")
        if rep["identical"] and rep["stored_failures"]:
            print(f"{rep['version']}: the spec regenerates content id {rep['content_id'][:12]} byte for byte, "
                  f"but the stored copy is damaged: " + "; ".join(rep["stored_failures"][:5]))
        elif rep["identical"]:
            print(f"{rep['version']}: identical: content id {rep['content_id'][:12]} regenerated byte for byte")
        else:
            print(f"{rep['version']}: DIFFERENT: content id {rep['content_id'][:12]} "
                  f"!= regenerated {rep['regenerated_content_id'][:12]}")
            print(f"  differing shards ({len(rep['shards'])}): " + (", ".join(rep["shards"]) or "-"))
            print(f"  differing samples ({len(rep['samples'])}): " + (", ".join(rep["samples"][:50]) or "-")
                  + (" ..." if len(rep["samples"]) > 50 else ""))
            if rep["files"]:
                print("  differing files: " + ", ".join(rep["files"]))
            if rep["manifest_fields"]:
                print("  differing manifest fields: " + ", ".join(rep["manifest_fields"]))
        if args.keep or args.scratch:
            print(f"scratch: {rep['scratch']}")
    return 0 if rep["identical"] and not rep["stored_failures"] else 1


def cmd_diff(args: argparse.Namespace) -> int:
    from counterfactory import versions as V
    from counterfactory.diff import diff

    a, b = V.locate(args.a, args.root), V.locate(args.b, args.root)
    d = diff(a, b)
    if args.json:
        print(json.dumps(d, indent=2, default=str))
        return 0
    print(f"{d['a']} -> {d['b']}" + ("  (content identical)" if d["content_identical"] else ""))
    print("config changes:" + ("" if d["config"] else " none"))
    for c in d["config"]:
        note = "  (placement only: no effect on bytes)" if c.get("placement_only") else ""
        print(f"  {c['key']}: {c['a']!r} -> {c['b']!r}{note}")
    for c in d["spec"]:
        print(f"  {c['key']}: {c['a']!r} -> {c['b']!r}")
    print("counts:")
    for k, c in d["counts"].items():
        mark = f" ({c['delta']:+d})" if c["delta"] else ""
        print(f"  {k}: {c['a']} -> {c['b']}{mark}")
    print("reject reasons:" + ("" if d["rejects"] else " unchanged"))
    for k, c in d["rejects"].items():
        print(f"  {k}: {c['a']} -> {c['b']} ({c['delta']:+d})")
    s = d["samples"]
    print(f"samples: {len(s['added'])} added, {len(s['removed'])} removed, {len(s['changed'])} changed, "
          f"{s['unchanged']} unchanged")
    for label, keys in (("added", s["added"]), ("removed", s["removed"]), ("changed", s["changed"])):
        if keys:
            print(f"  {label}: " + ", ".join(keys[:20]) + (" ..." if len(keys) > 20 else ""))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from counterfactory import evaluate as E

    ds = E.dataset_dir(args.dataset, args.root)
    if args.export:
        out = Path(args.export)
        n = E.export_questions(ds, out)
        root = f" --root {args.root}" if args.root else ""
        print(f"{n} questions to ask written to {out}; answer each row with an 'answer' field and run "
              f"counterfactory eval {args.dataset}{root} --predictions FILE")
        return 0
    if not args.predictions:
        print("error: give --predictions FILE.jsonl (or --export FILE.jsonl)", file=sys.stderr)
        return 2
    if not Path(args.predictions).is_file():
        print(f"error: predictions file not found: {args.predictions}", file=sys.stderr)
        return 2
    abstain = args.abstain
    if abstain is None:  # the answer this dataset abstains with, as its config says
        from counterfactory.diff import version_config

        abstain = version_config(ds).get("abstain_answer", "unknown") if (ds / layout.CONFIG).exists() else "unknown"
    try:
        rep = E.evaluate(ds, Path(args.predictions), abstain=abstain)
    except E.PredictionsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.report) if args.report else Path(args.predictions).with_suffix(".report.json")
    out.write_text(json.dumps(rep, indent=2))
    if args.json:
        print(json.dumps(rep, indent=2))
        return 0
    print(E.report_table(rep))
    print(f"report: {out}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from counterfactory import cluster

    cfg = load_config(args.config, args.overrides)
    nodes = cluster.cluster_nodes(args.address) if args.address else cluster.local_nodes()
    plan = cluster.make_plan(cfg, nodes)
    con = Console()
    where = args.address or "this machine"
    print(f"{len(nodes)} node(s) at {where}: {sum(n.cpus for n in nodes):g} CPU, "
          f"{sum(n.gpus for n in nodes):g} GPU, {sum(n.memory for n in nodes) / 2**30:.1f} GiB")
    t = Table(title="steps")
    for col in ("step", "runs as", "CPU", "GPU", "memory GiB", "concurrency", "nodes that fit"):
        t.add_column(col, overflow="fold")
    for s in plan.steps:
        t.add_row(s["step"], s["runs_as"], f"{s['cpus']:g}", f"{s['gpus']:g}",
                  f"{s['memory'] / 2**30:.1f}" if s["memory"] else "-", str(s["concurrency"]), str(s["nodes_that_fit"]))
    con.print(t)
    for line in plan.wont_fit:
        print(f"will not fit: {line}")
    for line in plan.idle:
        print(f"idle: {line}")
    for line in plan.notes:
        print(f"note: {line}")
    if plan.ok and not plan.idle:
        print("ok: every step can be placed")
    return 0 if plan.ok else 1


def cmd_submit(args: argparse.Namespace) -> int:
    from counterfactory import cluster

    job_id = cluster.submit(args.config, args.overrides, args.address, limit=args.limit,
                            pip=args.pip, ship_package=args.ship_package, env=args.env)
    print(job_id)
    if args.wait:
        status = cluster.wait(job_id, args.address, args.wait)
        print(f"{job_id}: {status}")
        return 0 if status == "SUCCEEDED" else 1
    return 0


def cmd_job(args: argparse.Namespace) -> int:
    from counterfactory import cluster

    c = cluster.client(args.address)
    try:
        if args.command == "status":
            if args.wait:
                cluster.wait(args.job, args.address, args.wait)
            info = c.get_job_info(args.job)
            st = str(getattr(info.status, "value", info.status))
            if args.json:
                print(json.dumps({"job": args.job, "status": st, "message": info.message,
                                  "entrypoint": info.entrypoint, "start_time": info.start_time,
                                  "end_time": info.end_time}, indent=2))
            else:
                print(f"{args.job}: {st}" + (f" ({info.message})" if info.message else ""))
            return JOB_EXIT.get(st, 3)
        if args.command == "logs":
            print(c.get_job_logs(args.job), end="")
        else:
            print(f"{args.job}: {'stop requested' if c.stop_job(args.job) else 'not running'}")
    except RuntimeError as exc:  # the job server's answer (e.g. 404: no such job), as one line
        msg = str(exc).strip().splitlines()
        print(f"error: {args.job}: {msg[-1] if msg else type(exc).__name__}", file=sys.stderr)
        return 2
    return 0


# status: 0 succeeded, 1 failed or stopped, 3 not finished (a script can wait on it)
JOB_EXIT = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 1, "PENDING": 3, "RUNNING": 3}


def cmd_export(args: argparse.Namespace) -> int:
    from counterfactory import console
    from counterfactory import export as X
    from counterfactory import versions as V

    if args.format not in X.FORMATS:  # before anything is read or written
        raise X.ExportError(f"unknown format {args.format!r}: choose one of {', '.join(X.FORMATS)}")
    splits = X.parse_splits(args.split)
    X.check_out(Path(args.out))
    v = V.locate(args.dataset, args.root)
    variants = [x.strip() for x in args.variants.split(",") if x.strip()] if args.variants else None
    total = v.manifest()["counts"]["samples"]
    with console.CountProgress(total, f"export {v.dataset}@{v.label}", enabled=not args.quiet) as bar:
        meta = X.export(v, args.format, Path(args.out), variants=variants, splits=splits, progress=bar)
    print(f"read {v.dataset}@{v.label} (content id {(v.info.get('content_id') or '')[:12]}); "
          f"{args.format}: " + ", ".join(f"{n} {c} records" for n, c in meta["records"].items())
          + f" in {Path(args.out).resolve()}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from counterfactory import console, hub
    from counterfactory import versions as V

    v = V.locate(args.dataset, args.root)
    with console.status(f"pushing {v.dataset}@{v.label} to {args.repo_id}", enabled=not args.quiet):
        rec = hub.push(v, args.repo_id, private=args.private, revision=args.revision, large=args.large)
    print(f"{v.dataset}@{v.label} pushed to https://huggingface.co/datasets/{args.repo_id} "
          f"(revision {rec['revision'][:12]}, recorded in {v.path / V.VERSION_FILE})")
    return 0


def cmd_tag(args: argparse.Namespace) -> int:
    from counterfactory import versions as V

    name, label = V.split_ref(args.dataset)
    if label is None:
        raise V.VersionError(f"tag needs DATASET@VERSION (which version to name), got {args.dataset!r}")
    v = V.locate(args.dataset, args.root)
    V.write_tag(V.locate_dataset(name, args.root), args.name, v.label)
    print(f"{v.dataset}@{args.name} -> {v.label} (content id {(v.info.get('content_id') or '')[:12]})")
    return 0


def _count(text: str) -> int:
    """--limit: a whole number of inputs, at least 1 (0 would publish an empty version)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _port(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0-65535 (0: any free port), got {n}")
    return n


OVERRIDE_VERBS = ("run", "plan", "submit")  # verbs whose extra KEY=VALUE words are config overrides


def build_parser() -> argparse.ArgumentParser:
    from counterfactory import __version__

    raw = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="counterfactory", description=__doc__, formatter_class=raw)
    p.add_argument("--version", action="version", version=f"counterfactory {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="VERB")

    def verb(name: str, summary: str, example: str, func) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=summary, description=summary, epilog=f"example:\n  {example}",
                            formatter_class=raw)
        sp.set_defaults(func=func)
        return sp

    def root(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--root", default="outputs",
                        help="folder holding the datasets (default: ./outputs); DATASET may also be a path")

    def overrides(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("config", help="pipeline config (YAML)")
        sp.add_argument("overrides", nargs="*", metavar="dotted.key=value",
                        help="override config values (before or after the flags), e.g. output.shard_size=16")

    r = verb("run", "run a pipeline config and publish a new version",
             "counterfactory run configs/demo.yaml output.shard_size=8 --limit 20", cmd_run)
    overrides(r)
    r.add_argument("--limit", type=_count, default=None,
                   help="process only the first N inputs (a limited version: never `latest` unless --latest)")
    r.add_argument("--latest", action="store_true", help="make a --limit version `latest` all the same")
    r.add_argument("--dry-run", action="store_true", help="print the resolved config and stage plan, run nothing")
    r.add_argument("--quiet", action="store_true", help="print only errors and the version line")
    r.add_argument("--verbose", action="store_true", help="also show Ray's own log lines and progress bars")
    r.add_argument("--force", action="store_true", help="build a new version even if this spec has one")
    r.add_argument("--strict", action="store_true",
                   help="refuse to publish a dataset over the shortcut audit's thresholds (exit 3)")

    v = verb("versions", "list the versions of a dataset (labels, ids, counts, tags, health)",
             "counterfactory versions demo --json", cmd_versions)
    v.add_argument("dataset", metavar="DATASET")
    root(v)
    v.add_argument("--json", action="store_true", help="print the list as JSON")
    c = verb("card", "print a version's data card; --html writes the side-by-side viewer",
             "counterfactory card demo@v2 --html", cmd_card)
    c.add_argument("dataset", metavar="DATASET[@VERSION]")
    root(c)
    c.add_argument("--html", action="store_true", help="write the static HTML viewer and print its path")
    c.add_argument("--serve", action="store_true", help="write the viewer and serve it on 127.0.0.1")
    c.add_argument("--port", type=_port, default=0, help="port for --serve (default: any free port)")
    c.add_argument("--out", default=None, help="viewer folder (default: VERSION/viewer)")
    c.add_argument("--max-samples", type=int, default=300, help="samples shown in the viewer")
    g = verb("regenerate", "re-run a version's spec in a scratch folder and compare bytes",
             "counterfactory regenerate demo@v2 --local", cmd_regenerate)
    g.add_argument("dataset", metavar="DATASET@VERSION")
    root(g)
    g.add_argument("--scratch", default=None, help="where to write (kept); default: a temporary folder")
    g.add_argument("--keep", action="store_true", help="keep the temporary scratch folder")
    g.add_argument("--local", action="store_true", help="run in this process without Ray (same bytes)")
    g.add_argument("--json", action="store_true", help="print the report as JSON")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    f = verb("verify", "recompute shard and file checksums and sample counts against the manifest",
             "counterfactory verify demo@v2", cmd_verify)
    f.add_argument("dataset", metavar="DATASET@VERSION")
    root(f)
    f.add_argument("-v", "--verbose", action="store_true", help="print passing checks too")
    au = verb("audit", "shortcut audit of a version: edit detectability, blind answerers, label balance, "
              "presupposing questions (exit 3 when over its thresholds)", "counterfactory audit demo@v2 --json",
              cmd_audit)
    au.add_argument("dataset", metavar="DATASET[@vN]")
    root(au)
    au.add_argument("--json", action="store_true", help="print the audit as JSON")

    d = verb("diff", "compare two versions (config, counts, reject reasons, samples)",
             "counterfactory diff demo@v1 demo@v2 --json", cmd_diff)
    d.add_argument("a", metavar="DATASET@A")
    d.add_argument("b", metavar="DATASET@B")
    root(d)
    d.add_argument("--json", action="store_true", help="print the comparison as JSON")
    e = verb("eval", "score a model's answers on a version's pairs (or --export the questions)",
             "counterfactory eval demo --predictions answers.jsonl --json", cmd_eval)
    e.add_argument("dataset", metavar="DATASET@VERSION")
    root(e)
    e.add_argument("--predictions", default=None, help="JSONL: key, variant, qid, answer")
    e.add_argument("--export", default=None, metavar="FILE.jsonl", help="write the questions to ask")
    e.add_argument("--report", default=None, help="report path (default: PREDICTIONS.report.json)")
    e.add_argument("--abstain", default=None, help="the abstention answer (default: the dataset's abstain_answer)")
    e.add_argument("--json", action="store_true", help="print the report as JSON")
    x = verb("export", "write a version for a trainer: llava | trl | sharegpt (LLaMA-Factory) | parquet",
             "counterfactory export demo@v2 --format trl --out exports/demo-trl --split train=0.9,test=0.1", cmd_export)
    x.add_argument("dataset", metavar="DATASET@VERSION")
    root(x)
    x.add_argument("--format", required=True, metavar="FORMAT",
                   help="llava, trl, sharegpt, parquet; or a paper's layout: defacto, beaf, popev2, countercurate")
    x.add_argument("--out", required=True, metavar="DIR", help="a new or empty folder (or an earlier export)")
    x.add_argument("--variants", default=None, metavar="V1,V2",
                   help="images to export: orig and variant names (default: all)")
    x.add_argument("--split", default=None, metavar="NAME=FRAC,...",
                   help="split by source image, e.g. train=0.9,test=0.1 (default: all in train)")
    x.add_argument("--quiet", action="store_true", help="no progress display")
    h = verb("push", "upload a verified version to a Hugging Face dataset repo (token from HF_TOKEN)",
             "counterfactory push demo@v2 me/demo-counterfactuals --private", cmd_push)
    h.add_argument("dataset", metavar="DATASET@VERSION")
    h.add_argument("repo_id", metavar="REPO_ID", help="the dataset repo, e.g. user/name")
    root(h)
    h.add_argument("--private", action="store_true", help="create the repo private")
    h.add_argument("--revision", default=None, help="branch to commit to (default: main)")
    h.add_argument("--large", action="store_true", help="use upload_large_folder (resumable, many commits)")
    h.add_argument("--quiet", action="store_true", help="no progress display")
    t = verb("tag", "give a version a name that loads like a label (DATASET@NAME); never moved",
             "counterfactory tag demo@v2 paper-2025", cmd_tag)
    t.add_argument("dataset", metavar="DATASET@VERSION")
    t.add_argument("name", metavar="NAME")
    root(t)

    def address(sp: argparse.ArgumentParser, required: bool = True) -> None:
        sp.add_argument("--address", required=required and not os.environ.get("RAY_API_SERVER_ADDRESS"),
                        default=os.environ.get("RAY_API_SERVER_ADDRESS"),
                        help="Ray dashboard (job server) address, e.g. http://HEAD:8265")

    pl = verb("plan", "compare the stages' resources with a cluster's (or this machine's)",
              "counterfactory plan configs/gpu.yaml --address http://HEAD:8265", cmd_plan)
    overrides(pl)
    address(pl, required=False)
    sb = verb("submit", "run a config as a Ray job on a cluster; prints the job id",
              "counterfactory submit configs/gpu.yaml --address http://HEAD:8265 output.root=/shared/datasets",
              cmd_submit)
    overrides(sb)
    address(sb)
    sb.add_argument("--limit", type=_count, default=None, help="process only the first N inputs")
    sb.add_argument("--pip", action="append", default=None, metavar="REQ",
                    help="runtime_env pip requirement for the job (repeatable), e.g. counterfactory==0.1.0")
    sb.add_argument("--env", action="append", default=None, metavar="NAME[=VALUE]",
                    help="environment variable for the job (repeatable); NAME alone copies this "
                         "shell's value, e.g. --env AWS_PROFILE for an s3:// output root")
    sb.add_argument("--ship-package", action="store_true",
                    help="ship this counterfactory package with the job (runtime_env py_modules)")
    sb.add_argument("--wait", type=float, default=None, metavar="SECONDS",
                    help="wait up to SECONDS for the job to end; exit 0 only if it succeeded")
    for name, what in (("status", "a job's status (exit 0 succeeded, 1 failed/stopped, 3 pending/running)"),
                       ("logs", "a job's logs"), ("stop", "stop a job")):
        j = verb(name, what, f"counterfactory {name} raysubmit_XXXX --address http://HEAD:8265", cmd_job)
        j.add_argument("job")
        address(j)
        if name == "status":
            j.add_argument("--wait", type=float, default=None, metavar="SECONDS",
                           help="wait up to SECONDS for the job to end")
            j.add_argument("--json", action="store_true", help="print the job's status as JSON")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Overrides may follow flags (``run CFG --dry-run key=val``): argparse stops filling a
    positional list at the first flag, so words left over that look like ``key=value`` are
    the verb's overrides; anything else is the usual one-line usage error (exit 2)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if args.command in OVERRIDE_VERBS and all("=" in w and not w.startswith("-") for w in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    from counterfactory.export import ExportError
    from counterfactory.hub import HubError
    from counterfactory.storage import StorageError
    from counterfactory.versions import VersionError

    args = parse_args(argv)
    args.command_line = _command_line(argv)
    try:
        return args.func(args)
    except (ConfigError, VersionError, StorageError, ExportError) as exc:  # StorageError: a store failed mid-command
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except HubError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except FailureBudgetExceeded as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except OSError as exc:  # a file or an object store that failed mid-command
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        why = _stage_start_error(exc)
        if why is None:
            raise
        print(f"error: {why}", file=sys.stderr)  # the worker's traceback is in Ray's logs
        return 1


def _stage_start_error(exc: BaseException) -> str | None:
    """The one line of a stage that could not start on a worker, however Ray wrapped it (an
    actor that died in its constructor, a task error, the error as text in another)."""
    import re

    from counterfactory.sample import StageStartError

    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, StageStartError):
            return str(e).strip().splitlines()[-1]
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__
    m = re.search(r"StageStartError: (stage .*? could not start: .*)", str(exc))
    return m.group(1) if m else None


if __name__ == "__main__":
    sys.exit(main())
