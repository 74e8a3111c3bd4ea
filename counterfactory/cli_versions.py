"""The ``counterfactory`` verbs that read a published version: versions, card, audit, verify,
diff, eval, export, push and tag (the parser and exit codes are in ``cli.py``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from counterfactory import layout


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
    if not v.folder.is_local:
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
    from counterfactory import paper_eval

    if paper_eval.export_of(args.dataset) is not None:  # a paper-layout export: that paper's metric
        return paper_eval.cmd(args)
    ds = E.dataset_dir(args.dataset, args.root)
    if args.export:
        out = Path(args.export)
        if out.is_dir():
            print(f"error: --export {out}: is a folder; give a file name such as questions.jsonl", file=sys.stderr)
            return 2
        n = E.export_questions(ds, out)
        root = f" --root {args.root}" if args.root else ""
        print(f"{n} questions to ask written to {out}; answer each row with an 'answer' field and run "
              f"counterfactory eval {args.dataset}{root} --predictions FILE")
        return 0
    if not args.predictions:
        print("error: give --predictions FILE.jsonl (or --export FILE.jsonl)", file=sys.stderr)
        return 2
    problem = _predictions_problem(Path(args.predictions))
    if problem:
        print(f"error: --predictions {args.predictions}: {problem}", file=sys.stderr)
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


MAX_PREDICTIONS_BYTES = 4 << 30  # ~30 M answer lines; more is not a predictions file


def _predictions_problem(path: Path) -> str | None:
    """A predictions file must be a regular file of bounded size: /dev/zero never ends, a FIFO
    blocks, and neither is "not found"."""
    import stat

    try:
        st = path.stat()
    except FileNotFoundError:
        return "file not found"
    except OSError as exc:
        return exc.strerror or str(exc)
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file (a folder, FIFO or device); give a JSONL file"
    if st.st_size > MAX_PREDICTIONS_BYTES:
        return f"{st.st_size} bytes; a predictions file is at most {MAX_PREDICTIONS_BYTES} bytes"
    return None


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
