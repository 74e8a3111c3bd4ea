"""A static HTML viewer for one dataset version: no server needed (open ``index.html``), or
``counterfactory card DATASET --serve`` on 127.0.0.1.

Shows each sample's original and variants side by side with the evidence mask outlined (SVG
over the image; the control region outlined on ``random_mask``), the questions with the answer
per variant, filters by variant and question kind, and the rejects with thumbnails and reasons.

Images are read from the shards in memory (tar members are streamed, never extracted) and
written as small JPEG thumbnails into ``viewer/img/`` beside the page; the page itself is one
file with the sample data embedded as JSON and rendered by a few lines of JavaScript (text is
inserted with ``textContent``, never as HTML).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import html
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
import urllib.parse
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from counterfactory.index import source_uri
from counterfactory.layout import CONFIG, INDEX, MANIFEST, REJECTS, tar_samples
from counterfactory.sample import ABSTAIN_ANSWER
from counterfactory.storage import read_parquet
from counterfactory.versions import VersionError

THUMB = 240
MAX_SOURCE_PIXELS = 40_000_000  # a rejected "too_large" source is not decoded for a thumbnail


def _iter_samples(shard: Any, wanted: set[str]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {part: bytes}) for the wanted keys of one shard; members of a sample are contiguous."""
    for key, parts in tar_samples(shard, want=lambda name: name.partition(".")[0] in wanted):
        if key in wanted:
            yield key, parts


def _thumb(img: Image.Image, size: int) -> Image.Image:
    img = img.convert("RGB")
    img.thumbnail((size, size), Image.Resampling.LANCZOS)
    return img


def _first_frame(mp4: bytes) -> Image.Image:
    import av

    with av.open(io.BytesIO(mp4)) as c:
        return next(c.decode(c.streams.video[0])).to_image()


def _save_jpeg(img: Image.Image, path: Path) -> None:
    img.save(path, "JPEG", quality=82, optimize=True)


def _outline(mask: bytes | np.ndarray, w: int, h: int) -> list[list[list[int]]]:
    """Outer contours of a mask (PNG bytes or an array), at thumbnail size, as SVG polygon
    point lists."""
    import cv2

    m = Image.open(io.BytesIO(mask)) if isinstance(mask, bytes) else Image.fromarray((mask > 0).astype(np.uint8) * 255)
    m = m.convert("L").resize((w, h), Image.Resampling.NEAREST)
    arr = (np.asarray(m) > 127).astype(np.uint8)
    contours, _ = cv2.findContours(arr, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return [c.reshape(-1, 2).tolist() for c in contours if len(c) >= 2]


def _inside(path: str | Path, folder: Path) -> bool:
    """``path``, links followed, is a regular file inside ``folder`` (links followed too)."""
    try:
        root, real = os.path.realpath(folder), os.path.realpath(path)
        return real.startswith(root + os.sep) and os.path.isfile(real)
    except (OSError, ValueError):  # a NUL byte, a name too long
        return False


def _ledger_trusted(version: Any) -> bool:
    """The rejects ledger is the one the run wrote: ``manifest.json`` is the content id and
    ``rejects.parquet`` has the manifest's sha256 (what ``verify`` checks, for these two files)."""
    from counterfactory.layout import sha256_bytes, sha256_file

    try:
        raw = (version.path / MANIFEST).read_bytes()
        want = json.loads(raw)["files"][REJECTS]["sha256"]
        return (sha256_bytes(raw) == version.info.get("content_id")
                and sha256_file(version.path / REJECTS) == want)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _source_thumb(ref: str, size: int, vdir: Path) -> Image.Image | None:
    """Thumbnail of a rejected input's source, when it can be read at all: a procedural scene
    (drawn from its URI), or an image file inside the version folder. ``rejects.parquet`` may
    name any path, so a file elsewhere (``/home/me/secret.png``, a package's data) is never
    read: the viewer, and ``--serve``, show only what the version holds."""
    try:
        if ref.startswith("procedural://"):
            from counterfactory import scenes

            seed, index, wh = scenes.parse_procedural_uri(ref)
            return _thumb(Image.fromarray(scenes.render_scene(scenes.scene_spec(seed, index, wh))), size)
        path = Path(ref)
        if "://" in ref or ref.startswith("pkg:") or not _inside(path, vdir):
            return None
        with Image.open(path) as im:
            if im.width * im.height > MAX_SOURCE_PIXELS:
                return None
            im.draft("RGB", (size * 2, size * 2))
            from PIL import ImageOps

            return _thumb(ImageOps.exif_transpose(im), size)
    except Exception:  # noqa: BLE001 - a broken source is exactly why it was rejected
        return None


def collect(version: Any, img_dir: Path, *, max_samples: int = 300, max_rejects: int = 300,
            thumb: int = THUMB) -> dict[str, Any]:
    """Read index, rejects and shards of a version; write thumbnails; return the page data."""
    vdir: Path = version.path
    manifest = json.loads((vdir / MANIFEST).read_text())
    index = read_parquet(vdir / INDEX).to_pylist()
    rejects = read_parquet(vdir / REJECTS).to_pylist()
    shown = index[:max_samples]
    rej_shown = rejects[:max_rejects]
    wanted = {r["key"] for r in shown} | {r["key"] for r in rej_shown if r["variant"] is not None}
    by_key: dict[str, dict[str, Any]] = {}
    for s in manifest["shards"]:
        if not wanted:
            break
        with version.open(s["name"]) as shard:
            samples = list(_iter_samples(shard, wanted))
        for key, parts in samples:
            wanted.discard(key)
            doc = json.loads(parts.get("json", b"{}"))
            frames, posters = {}, {}
            size = None
            for name in ["orig", *doc.get("variants", [])]:
                part = next((p for p in parts if p.split(".")[0] == name and p != "json"), None)
                if part is None:
                    continue
                data = parts[part]
                video = part.endswith(".mp4")
                # a clip plays from a copy next to the page; its first frame is the poster
                t = _thumb(_first_frame(data) if video else Image.open(io.BytesIO(data)), thumb)
                size = t.size
                fname = f"{key}.{name}.jpg"
                _save_jpeg(t, img_dir / fname)
                posters[name] = frames[name] = f"img/{fname}"
                if video:
                    (img_dir / f"{key}.{name}.mp4").write_bytes(data)
                    frames[name] = f"img/{key}.{name}.mp4"
            w, h = size or (thumb, thumb)
            if "mask.png" in parts:
                evidence: bytes | np.ndarray | None = parts["mask.png"]
            elif "masks.npz" in parts:  # a clip: where the evidence was in any frame
                evidence = np.load(io.BytesIO(parts["masks.npz"]))["masks"].max(axis=0)
            else:
                evidence = None
            by_key[key] = {
                "key": key, "w": w, "h": h, "frames": frames, "posters": posters,
                "outline": _outline(evidence, w, h) if evidence is not None else [],
                "control": _outline(parts["control_mask.png"], w, h) if "control_mask.png" in parts else [],
                # edits with a region of their own (attribute, count, insert, swap): outline that
                "vout": {n.removesuffix("_mask.png"): _outline(parts[n], w, h) for n in parts
                         if n.endswith("_mask.png") and n != "control_mask.png"},
                "doc": doc,
            }
    samples = []
    for row in shown:
        s = by_key.get(row["key"])
        if s is None:
            continue
        doc = s["doc"]
        samples.append({
            "key": s["key"], "w": s["w"], "h": s["h"], "frames": s["frames"], "posters": s["posters"],
            "outline": s["outline"], "control": s["control"], "vout": s["vout"],
            "variants": doc.get("variants", []),
            "source": source_uri(doc.get("source", {})),
            "origin": doc.get("source", {}).get("origin", ""),
            "targets": doc.get("targets", []),
            "qa": [{"question": q["question"], "kind": q["kind"], "answers": q["answers"]} for q in doc.get("qa", [])],
            "mask_area": doc.get("mask", {}).get("area_frac"),
            "variant_rejects": doc.get("variant_rejects", []),
        })
    rej_out = []
    trusted = _ledger_trusted(version)  # a ledger edited after the run names no file to read
    for i, r in enumerate(rej_shown):
        img = None
        if r["variant"] is not None and r["key"] in by_key:
            img = by_key[r["key"]]["posters"].get("orig")
        elif r["variant"] is None and trusted:
            t = _source_thumb(r["source"] or "", thumb // 2 * 1, vdir)
            if t is not None:
                fname = f"reject-{i:05d}.jpg"
                _save_jpeg(t, img_dir / fname)
                img = f"img/{fname}"
        rej_out.append({"stage": r["stage"], "reason": r["reason"], "detail": r["detail"] or "",
                        "variant": r["variant"], "source": r["source"] or "", "origin": r["origin"] or "",
                        "key": r["key"] or "", "img": img})
    kinds = sorted({q["kind"] for s in samples for q in s["qa"]})
    variants = [v for v in ("remove", "blackout", "random_mask") if any(v in s["variants"] for s in samples)]
    variants += sorted({v for s in samples for v in s["variants"]} - set(variants))
    return {
        "dataset": manifest["dataset"], "version": version.label,
        "spec_id": version.info.get("spec_id"), "content_id": version.info.get("content_id"),
        "counts": manifest["counts"], "n_index": len(index), "n_rejects": len(rejects),
        "samples": samples, "rejects": rej_out, "kinds": kinds, "variants": variants,
    }


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="__CSP__">
<title>__TITLE__</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f4f5f7;color:#222}
header{background:#1f2933;color:#fff;padding:12px 20px}
header h1{margin:0;font-size:20px} header .ids{font:12px monospace;opacity:.8}
.bar{position:sticky;top:0;background:#fff;border-bottom:1px solid #ddd;padding:8px 20px;z-index:2}
.bar label{margin-right:16px}
main{padding:12px 20px}
.sample{background:#fff;border:1px solid #ddd;border-radius:6px;margin:0 0 14px;padding:10px}
.sample h3{margin:0 0 6px;font:600 13px monospace}
.sample .meta{color:#555;font-size:12px;margin-bottom:6px}
.frames{display:flex;gap:8px;flex-wrap:wrap}
figure{margin:0;position:relative}
figure img,figure video{display:block;border-radius:3px}
figure svg{position:absolute;left:0;top:0;pointer-events:none}
figure figcaption{text-align:center;font-size:12px;color:#333}
svg polygon.ev{fill:none;stroke:#ffd400;stroke-width:2}
svg polygon.ctl{fill:none;stroke:#00e5ff;stroke-width:2;stroke-dasharray:4 2}
body.no-outline svg{display:none}
table{border-collapse:collapse;margin-top:8px;font-size:13px}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
th{background:#f0f2f5}
td.abstain{color:#999;font-style:italic} td.changed{font-weight:700;color:#b00020}
.rejects{display:grid;grid-template-columns:repeat(auto-fill,minmax(260px,1fr));gap:10px}
.reject{background:#fff;border:1px solid #e0b4b4;border-radius:6px;padding:8px;font-size:12px}
.reject img{max-width:120px;display:block;margin-bottom:4px}
.reject .noimg{width:120px;height:60px;background:#eee;color:#888;display:flex;align-items:center;justify-content:center}
.reject b{color:#b00020}
.hidden{display:none!important}
header a{color:#9cf}
</style></head>
<body>
<header><h1>__TITLE__</h1><div class="ids">__IDS__</div>
<div>__COUNTS__ &middot; <a href="__CARD__README.md">card</a>
 &middot; <a href="__CARD__card.json">card.json</a></div></header>
<div class="bar">
<label>variant <select id="variant-filter"><option value="">all</option></select></label>
<label>question kind <select id="kind-filter"><option value="">all</option></select></label>
<label><input type="checkbox" id="outline-toggle" checked> outline mask</label>
<span id="shown-count"></span>
</div>
<main>
__AUDIT__
<section id="samples"></section>
<h2 id="rejects-title">Rejects</h2>
<section id="rejects" class="rejects"></section>
</main>
<script type="application/json" id="cf-data">__DATA__</script>
<script>
(function(){
const D = JSON.parse(document.getElementById('cf-data').textContent);
const NS = 'http://www.w3.org/2000/svg';
const ABSTAIN = D.abstain;
function el(tag, attrs, text){const e=document.createElement(tag);
  for(const k in (attrs||{})) e.setAttribute(k, attrs[k]); if(text!==undefined) e.textContent=text; return e;}
function svgFor(s, name){
  const svg=document.createElementNS(NS,'svg');
  svg.setAttribute('width',s.w); svg.setAttribute('height',s.h); svg.setAttribute('viewBox','0 0 '+s.w+' '+s.h);
  // a variant's own region when it has one; a mirror image gets the mirrored evidence outline
  let ev = (s.vout && s.vout[name]) || s.outline;
  if(name==='flip') ev = ev.map(pts=>pts.map(q=>[s.w-1-q[0], q[1]]));
  const polys=[[ev,'ev']]; if(name==='random_mask') polys.push([s.control,'ctl']);
  for(const [list,cls] of polys){ for(const pts of list){
    const p=document.createElementNS(NS,'polygon'); p.setAttribute('class',cls);
    p.setAttribute('points', pts.map(q=>q[0]+','+q[1]).join(' ')); svg.appendChild(p);}}
  return svg;}
const vf=document.getElementById('variant-filter'), kf=document.getElementById('kind-filter');
for(const v of D.variants) vf.appendChild(el('option',{value:v},v));
for(const k of D.kinds) kf.appendChild(el('option',{value:k},k));
const root=document.getElementById('samples');
for(const s of D.samples){
  const card=el('div',{'class':'sample','data-key':s.key,'data-variants':s.variants.join(' '),
    'data-kinds':[...new Set(s.qa.map(q=>q.kind))].join(' ')});
  card.appendChild(el('h3',{},s.key));
  card.appendChild(el('div',{'class':'meta'}, s.source+'  ('+s.origin+')  targets: '+s.targets.join(', ')+
    '  mask area: '+(s.mask_area===null?'-':(100*s.mask_area).toFixed(1)+'%')));
  const frames=el('div',{'class':'frames'});
  for(const name of ['orig'].concat(s.variants)){
    if(!s.frames[name]) continue;
    const f=el('figure',{'data-variant':name});
    const src=s.frames[name];
    f.appendChild(src.endsWith('.mp4')
      ? el('video',{src:src,poster:s.posters[name],width:s.w,height:s.h,controls:'',loop:'',muted:'',playsinline:'',preload:'none'})
      : el('img',{src:src,width:s.w,height:s.h,alt:s.key+' '+name,loading:'eager'}));
    f.appendChild(svgFor(s,name)); f.appendChild(el('figcaption',{},name)); frames.appendChild(f);}
  card.appendChild(frames);
  const cols=['orig'].concat(s.variants);
  const t=el('table'); const hr=el('tr'); hr.appendChild(el('th',{},'question')); hr.appendChild(el('th',{},'kind'));
  for(const c of cols) hr.appendChild(el('th',{'data-variant':c},c)); t.appendChild(hr);
  for(const q of s.qa){
    const tr=el('tr',{'class':'qa','data-kind':q.kind}); tr.appendChild(el('td',{},q.question)); tr.appendChild(el('td',{},q.kind));
    for(const c of cols){ const a=q.answers[c]; let cls='';
      if(a===ABSTAIN) cls='abstain'; else if(c!=='orig' && a!==q.answers.orig) cls='changed';
      tr.appendChild(el('td',{'data-variant':c,'class':cls}, a===undefined?'-':a));}
    t.appendChild(tr);}
  card.appendChild(t);
  for(const r of s.variant_rejects) card.appendChild(el('div',{'class':'meta'},
    'variant '+r.variant+' dropped at '+r.stage+': '+r.reason+(r.detail?' ('+r.detail+')':'')));
  root.appendChild(card);}
const rj=document.getElementById('rejects');
document.getElementById('rejects-title').textContent='Rejects ('+D.rejects.length+(D.n_rejects>D.rejects.length?' of '+D.n_rejects:'')+')';
for(const r of D.rejects){
  const c=el('div',{'class':'reject','data-stage':r.stage,'data-variant':r.variant||''});
  if(r.img) c.appendChild(el('img',{src:r.img,alt:r.reason})); else c.appendChild(el('div',{'class':'noimg'},'no image'));
  const head=el('div'); head.appendChild(el('b',{},r.stage+' / '+r.reason));
  head.appendChild(document.createTextNode(r.variant?'  (variant '+r.variant+')':'  (whole input)')); c.appendChild(head);
  if(r.detail) c.appendChild(el('div',{},r.detail));
  c.appendChild(el('div',{'class':'meta'}, (r.origin||'')+' '+(r.source||'')));
  rj.appendChild(c);}
function apply(){
  const v=vf.value, k=kf.value; let n=0;
  for(const card of root.children){
    const ok=(!v || card.dataset.variants.split(' ').includes(v)) && (!k || card.dataset.kinds.split(' ').includes(k));
    card.classList.toggle('hidden',!ok); if(ok) n++;
    for(const e of card.querySelectorAll('[data-variant]')){const d=e.dataset.variant;
      e.classList.toggle('hidden', !!v && d!=='orig' && d!==v);}
    for(const tr of card.querySelectorAll('tr.qa')) tr.classList.toggle('hidden', !!k && tr.dataset.kind!==k);}
  for(const c of rj.children) c.classList.toggle('hidden', !!v && c.dataset.variant!=='' && c.dataset.variant!==v);
  document.getElementById('shown-count').textContent='showing '+n+' of '+D.samples.length+' samples'+
    (D.n_index>D.samples.length?' (first '+D.samples.length+' of '+D.n_index+')':'');}
vf.addEventListener('change',apply); kf.addEventListener('change',apply);
document.getElementById('outline-toggle').addEventListener('change',e=>document.body.classList.toggle('no-outline',!e.target.checked));
apply();
})();
</script>
</body></html>
"""


def audit_html(a: dict[str, Any] | None) -> str:
    """The card's shortcut audit (``counterfactory.audit``) as a static, escaped HTML block."""
    if not a:
        return ""
    e = html.escape
    if a.get("error"):
        return f'<section id="audit"><h2>Shortcut audit</h2><p>could not be computed: {e(a["error"])}</p></section>'
    pct = lambda x: "-" if x is None else f"{100 * x:.0f}%"  # noqa: E731
    rows = []
    for v in ["orig", *sorted((set(a.get("detectability", {})) | set(a.get("blind", {}))) - {"orig"})]:
        d, b = a.get("detectability", {}).get(v, {}), a.get("blind", {}).get(v, {})
        h = d.get("heatmap") or {}
        cells = [v, "-" if d.get("auc") is None else f"{d['auc']:.2f}",
                 f"{pct(h.get('top_window_hit_rate'))} ({pct(h.get('chance_hit_rate'))})" if h else "-",
                 pct(b.get("original_answer")), pct(b.get("majority_per_kind")), pct(b.get("text_only")),
                 pct(a.get("balance", {}).get(v, {}).get("abstain_share"))]
        rows.append("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in cells) + "</tr>")
    head = "".join(f"<th>{e(h)}</th>" for h in ("variant", "probe AUC", "heat map hit (chance)",
                                                 "blind: orig answer", "blind: majority/kind", "blind: text only",
                                                 "abstain share"))
    warn = "".join(f"<li>{e(w)}</li>" for w in a.get("warnings", []))
    p = a.get("presupposition", {})
    pres = e(f"presupposing questions: {p.get('on_original', 0)} on originals, "
             f"{p.get('answered_on_absent', 0)} answered on variants without their object")
    return ('<section id="audit"><h2>Shortcut audit</h2>'
            + (f'<ul class="warnings">{warn}</ul>' if warn else "<p>under every threshold</p>")
            + f"<table><tr>{head}</tr>{''.join(rows)}</table><p>{pres}</p></section>")


# JSON inside a <script> element: "</script>", "<!--" and "<script" cannot be written with
# these escaped, and U+2028/9 (line terminators to older JavaScript parsers) cannot break a line.
_SCRIPT_ESCAPES = {ord("<"): "\\u003c", ord(">"): "\\u003e", ord("&"): "\\u0026",
                   0x2028: "\\u2028", 0x2029: "\\u2029"}
_PLACEHOLDER = re.compile(r"__(CSP|TITLE|IDS|COUNTS|CARD|AUDIT|DATA)__")
MARKER = ".counterfactory-viewer"  # in every viewer folder this module made: the only kind it replaces


class ViewerError(VersionError):
    """A viewer that cannot be written where asked (one line, exit 2, nothing touched)."""


def script_json(data: Any) -> str:
    """``data`` as JSON that is safe as the text of a ``<script>`` element."""
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).translate(_SCRIPT_ESCAPES)


def _inline(tag: str) -> str:
    body = PAGE.split(f"<{tag}>", 1)[1].split(f"</{tag}>", 1)[0]
    return "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"


# Only the page's own script and style run; images and clips come from beside the page. The
# script and style contain no placeholder, so their hashes are fixed and no data can change them.
CSP = ("default-src 'none'; script-src " + _inline("script") + "; style-src " + _inline("style")
       + "; img-src 'self' file: data:; media-src 'self' file:; base-uri 'none'; form-action 'none'")


def render_page(data: dict[str, Any], abstain: str = ABSTAIN_ANSWER, card_href: str = "../",
                audit: dict[str, Any] | None = None) -> str:
    """The page: every embedded string escaped for where it goes (HTML text, an attribute, JSON
    in a script), substituted in one pass so that data can never forge a placeholder."""
    c = data["counts"]
    values = {
        "CSP": html.escape(CSP, quote=True),
        "TITLE": html.escape(f"{data['dataset']} {data['version']}"),
        "IDS": html.escape(f"spec id {(data['spec_id'] or '-')[:12]}  content id {(data['content_id'] or '-')[:12]}"),
        "COUNTS": html.escape(f"{c['samples']} samples, {c['rejected_inputs']} rejected inputs, "
                              f"{c['rejected_variants']} rejected variants"),
        "CARD": html.escape(card_href, quote=True),
        "AUDIT": audit_html(audit),  # built from escaped parts
        "DATA": script_json({**data, "abstain": str(abstain)}),
    }
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], PAGE)


def _check_out(out: Path, default: bool) -> None:
    """Refuse to replace anything this module did not make: ``--out`` may name a new folder, an
    empty one, or a viewer folder written before (it holds ``MARKER``)."""
    if out.is_symlink():
        raise ViewerError(f"{out}: is a symbolic link; the viewer is written to a real folder only")
    if not out.exists():
        return
    where = "move it away, or give --out a new or empty folder" if default else \
        "choose a new or empty folder for --out"
    if not out.is_dir():
        raise ViewerError(f"{out}: exists and is not a folder; {where}")
    # the default VERSION/viewer too: a user's notes kept there are not ours to delete
    if (out / MARKER).is_file() or not any(out.iterdir()):
        return
    raise ViewerError(f"{out}: a folder that counterfactory did not create (not empty, no {MARKER}); "
                      f"nothing was changed: {where}")


def build_viewer(version: Any, out_dir: Path | None = None, *, max_samples: int = 300,
                 max_rejects: int = 300, thumb: int = THUMB) -> Path:
    """Write ``index.html`` and ``img/`` (default: ``VERSION/viewer/``); returns the page path.
    Built in a temporary folder and swapped in, so a reader never sees half a viewer. Only a
    folder this module made (or an empty one) is ever replaced: a user's folder is refused."""
    import yaml

    out = Path(out_dir) if out_dir else version.path / "viewer"
    _check_out(out, default=out_dir is None)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        (tmp / "img").mkdir()
        try:
            data = collect(version, tmp / "img", max_samples=max_samples, max_rejects=max_rejects, thumb=thumb)
        except (KeyError, TypeError, ValueError, RecursionError, tarfile.TarError) as exc:
            # a hand-edited or damaged version: one line pointing at verify, not a traceback
            why = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
            raise ViewerError(f"{version.path}: cannot read this version for the viewer ({why}); "
                              "run `counterfactory verify` on it") from None
        cfg = yaml.safe_load((version.path / CONFIG).read_text()) or {}
        card_path = version.path / "card.json"
        audit = json.loads(card_path.read_text()).get("audit") if card_path.exists() else None
        abstain = cfg.get("abstain_answer", ABSTAIN_ANSWER) if isinstance(cfg, dict) else ABSTAIN_ANSWER
        card = "../"
        if out_dir:  # the card links are relative to VERSION/viewer; point them at the version
            card = urllib.parse.quote(os.path.relpath(version.path, out.resolve())) + "/"
        page = render_page(data, abstain, card, audit)
        (tmp / "index.html").write_text(page, encoding="utf-8")
        (tmp / MARKER).write_text("made by counterfactory card --html; replaced on the next build\n")
        os.chmod(tmp, 0o755)
        _check_out(out, default=out_dir is None)  # again: it may have appeared meanwhile
        if out.exists():
            # a fresh name for the old copy: a same-named folder of the user's is never touched
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / "index.html"


class _VersionFilesHandler(SimpleHTTPRequestHandler):
    """Regular files inside the served folder only: a symbolic link is resolved and refused
    when it leads outside, devices and FIFOs are refused, and no folder is ever listed."""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base signature
        pass

    def translate_path(self, path: str) -> str:
        root = os.path.realpath(self.directory)
        refused = os.path.join(root, ".refused", "missing")  # does not exist: answered 404
        try:
            real = os.path.realpath(super().translate_path(path))
            if os.path.isdir(real):
                real = os.path.realpath(os.path.join(real, "index.html"))
        except (ValueError, OSError):  # /index.html%00.txt: "embedded null byte"; a name too long
            return refused
        inside = real == root or real.startswith(root + os.sep)
        if inside and os.path.isfile(real):  # isfile: a regular file (after the links)
            return real
        return refused

    def list_directory(self, path: Any) -> None:
        self.send_error(404, "File not found")
        return None

    def end_headers(self) -> None:
        self.send_header("X-Content-Type-Options", "nosniff")
        super().end_headers()


def serve(directory: Path, port: int = 0, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    """An HTTP server for the viewer folder on localhost only (``port=0``: any free port).
    The caller runs ``serve_forever`` (in a thread for tests)."""
    handler = functools.partial(_VersionFilesHandler, directory=str(directory))
    return ThreadingHTTPServer((host, port), handler)
