"""``counterfactory regenerate``: re-run a version's stored spec into a scratch root and compare
byte for byte. A command above the runner (it imports ``run_pipeline``): nothing below the
pipeline imports it."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from counterfactory.diff import spec_changes, version_config
from counterfactory.layout import CONFIG, tar_members
from counterfactory.pipeline.config import validate_config
from counterfactory.pipeline.runner import run_pipeline
from counterfactory.spec import with_placement
from counterfactory.verify import verify
from counterfactory.versions import Version, content_id, read_version


def tar_sample_digests(f: Any) -> dict[str, str]:
    """key -> sha256 over the sample's member names and bytes, read in memory, never extracted."""
    acc: dict[str, Any] = {}
    for m, data in tar_members(f):
        acc.setdefault(m.name.split(".", 1)[0], hashlib.sha256()).update(m.name.encode() + b"\0" + data)
    return {k: h.hexdigest() for k, h in acc.items()}


def compare_versions(a: Version, b: Version) -> dict[str, Any]:
    """Which shards and samples differ between two versions (content ids differ)."""
    ma, mb = a.manifest(), b.manifest()
    sa = {s["name"]: s for s in ma["shards"]}
    sb = {s["name"]: s for s in mb["shards"]}
    shards = sorted(n for n in set(sa) | set(sb) if sa.get(n, {}).get("sha256") != sb.get(n, {}).get("sha256"))

    def digests(v: Version, names: dict[str, Any], n: str) -> dict[str, str]:
        if n not in names or v.sizes([n])[n] is None:
            return {}
        with v.open(n) as f:
            return tar_sample_digests(f)

    samples: set[str] = set()
    for n in shards:
        da, db = digests(a, sa, n), digests(b, sb, n)
        samples |= {k for k in set(da) | set(db) if da.get(k) != db.get(k)}
    files = sorted(n for n in set(ma.get("files", {})) | set(mb.get("files", {}))
                   if ma.get("files", {}).get(n) != mb.get("files", {}).get(n))
    other = sorted(k for k in set(ma) | set(mb) if k not in ("shards", "files") and ma.get(k) != mb.get(k))
    return {"shards": shards, "samples": sorted(samples), "files": files, "manifest_fields": other}


def regenerate(version: Version, scratch: Path, *, local: bool = False, progress: bool = False,
               verbose: bool = True) -> dict[str, Any]:
    """Re-run the stored spec into ``scratch`` and compare content ids byte for byte; the stored
    copy is verified as well (``stored_failures``)."""
    info = version.info
    data = with_placement(version_config(version.path), info.get("placement"))
    data.setdefault("output", {})["root"] = str(scratch)
    base = info.get("base_dir")
    cfg = validate_config(data, source=str(version.path / CONFIG),
                          base_dir=Path(base) if base else version.path)
    res = run_pipeline(cfg, limit=(info.get("spec") or {}).get("limit"), progress=progress, local=local,
                       verbose=verbose)
    want = info.get("content_id") or version.content_id()
    got = content_id(res.out_dir)
    report: dict[str, Any] = {
        "version": f"{version.dataset}@{version.label}",
        "scratch": str(res.out_dir),
        "content_id": want, "regenerated_content_id": got, "identical": want == got,
        "spec_id": info.get("spec_id"), "regenerated_spec_id": res.spec_id,
        "spec_changes": spec_changes(info, read_version(res.out_dir).info),
    }
    # the content id says what the version should hold; whether the stored copy still holds it
    # is verify's question, asked too, so "identical" is never said of a damaged copy
    report["stored_failures"] = [f"{c.name}: {c.detail}" for c in verify(version) if not c.ok]
    if want != got:
        report.update(compare_versions(version, read_version(res.out_dir)))
    return report
