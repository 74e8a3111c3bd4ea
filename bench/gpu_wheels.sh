#!/usr/bin/env bash
# The wheels the device image lacks (device KINDS.md package list: it has torch, transformers,
# numpy, opencv, pyarrow, pandas, pyyaml, safetensors, ... but no diffusers, pydantic, ray,
# webdataset), at the versions this venv runs, into .whl/ (git-ignored; the run call carries it).
# Ray's wheel (79 MB) is slimmed to fit the 64 MiB a call carries: its Java jar and the
# dashboard's web client go (a local Ray with include_dashboard=False uses neither).
#   bash bench/gpu_wheels.sh            (then: run with carry [".whl"], command bash bench/gpu_session.sh $OUT)
#   WHEEL_PY=3.11 WHL=/tmp/whl311 bash bench/gpu_wheels.sh     (wheels for this machine: the CPU smoke run)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=/work/main/.venv/bin/python
WHL=${WHL:-.whl}
WHEEL_PY=${WHEEL_PY:-3.12}  # the device's python3
PKGS="diffusers pydantic pydantic_core annotated-types typing-inspection webdataset braceexpand ray
      jsonschema jsonschema-specifications referencing rpds-py"
pins=$("$PY" -c "import sys, importlib.metadata as m; print(' '.join(f'{p}=={m.version(p)}' for p in sys.argv[1:]))" $PKGS)
rm -rf "$WHL" && mkdir -p "$WHL"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$WHEEL_PY" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_34_x86_64 -d "$WHL" $pins
"$PY" - "$WHL" <<'PY'
import pathlib, sys, zipfile
whl = next(pathlib.Path(sys.argv[1]).glob("ray-*.whl"))
drop = ("ray/jars/", "ray/dashboard/client/build/")
slim = whl.with_suffix(".slim")
with zipfile.ZipFile(whl) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
    for info in src.infolist():
        if info.filename.startswith(drop):
            continue
        data = src.read(info)
        if info.filename.endswith(".dist-info/RECORD"):  # the dropped files leave the record too
            data = b"\n".join(l for l in data.split(b"\n") if not l.startswith(tuple(d.encode() for d in drop)))
        dst.writestr(info, data)
slim.replace(whl)
PY
du -ch "$WHL"/*.whl | tail -1
