#!/usr/bin/env bash
# The GPU path end to end through the real service (benchmarks/gpu_check.py says what runs and how it counts).
#
#   benchmarks/gpu_check.sh [--wheels DIR] [--smoke] [--work-dir DIR] [--peak-tflops N]
#       Run from anywhere. Uses $PYTHON if set, else the first of python3 and .venv/bin/python whose torch sees a
#       CUDA GPU (else the first with torch, for --smoke). The project runs from this checkout through PYTHONPATH,
#       nothing is installed into that Python: service packages it lacks (FastAPI, pydantic, SQLAlchemy, Celery...)
#       are installed from the wheels in DIR (default: .whl/ in the checkout, if present) into a separate folder
#       ($GPU_CHECK_SITE, default /tmp/gpu_check_site), with no index and no dependency resolution.
#   benchmarks/gpu_check.sh --download-wheels DIR
#       On a machine that reaches PyPI: download those packages' wheels, at the versions of the local .venv, for
#       CPython $GPU_CHECK_PYTHON_VERSION (default 3.12) on x86-64 Linux, into DIR, to carry to a GPU machine.
#
# The last line of output is the figures, `name=value` pairs separated by spaces.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# The service's own packages that a GPU machine's Python (torch, transformers, peft, numpy, safetensors, jinja2,
# httpx already there) may lack. Installed only where missing or older than the carried wheel.
SERVICE_DISTS="fastapi starlette uvicorn pydantic pydantic-core pydantic-settings python-dotenv typing-inspection
annotated-types annotated-doc python-multipart sqlalchemy alembic mako celery kombu billiard vine amqp click
click-didyoumean click-repl click-plugins prompt-toolkit wcwidth orjson typing-extensions anyio sniffio h11 httpx
httpcore idna certifi python-dateutil six opentelemetry-api tzlocal"

download_wheels() {
    local dir="$1" py="${PYTHON:-$ROOT/.venv/bin/python}" target="${GPU_CHECK_PYTHON_VERSION:-3.12}"
    mkdir -p "$dir"
    # shellcheck disable=SC2086
    local pins
    pins=$("$py" - $SERVICE_DISTS <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version

for dist in sys.argv[1:]:
    try:
        print(f"{dist}=={version(dist)}")
    except PackageNotFoundError:
        print(f"gpu_check: {dist} is not installed in {sys.executable}; skipped", file=sys.stderr)
EOF
)
    # shellcheck disable=SC2086
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$target" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 -d "$dir" $pins
    echo "gpu_check: $(find "$dir" -name '*.whl' | wc -l) wheels, $(du -sh "$dir" | cut -f1), in $dir"
}

if [[ "${1:-}" == "--download-wheels" ]]; then
    download_wheels "${2:?--download-wheels needs a directory}"
    exit 0
fi

WHEELS=""
[[ -d "$ROOT/.whl" ]] && WHEELS="$ROOT/.whl"
ARGS=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --wheels) WHEELS="${2:?--wheels needs a directory}"; shift 2 ;;
        *) ARGS+=("$1"); shift ;;
    esac
done

pick_python() {
    local candidate fallback=""
    for candidate in ${PYTHON:-} python3 "$ROOT/.venv/bin/python"; do
        command -v "$candidate" >/dev/null 2>&1 || continue
        if "$candidate" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
            echo "$candidate"; return
        fi
        if [[ -z "$fallback" ]] && "$candidate" -c 'import torch' 2>/dev/null; then
            fallback="$candidate"
        fi
    done
    [[ -n "$fallback" ]] && { echo "$fallback"; return; }
    echo "gpu_check: no Python with torch found (set PYTHON)" >&2
    exit 1
}

PY="$(pick_python)"
echo "gpu_check: python $(command -v "$PY") ($("$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available())'))"

# Which service packages to install from the wheels: missing here, or older than the wheel carried.
if [[ -n "$WHEELS" ]]; then
    SITE="${GPU_CHECK_SITE:-/tmp/gpu_check_site}"
    # shellcheck disable=SC2086
    mapfile -t NEEDED < <("$PY" - "$WHEELS" $SERVICE_DISTS <<'EOF'
import re
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def key(v):
    try:
        from packaging.version import Version

        return Version(v)
    except Exception:
        return tuple(int(p) if p.isdigit() else 0 for p in re.split(r"[.+-]", v))


wheels = {norm(w.name.split("-")[0]): w for w in Path(sys.argv[1]).glob("*.whl")}
for dist in sys.argv[2:]:
    wheel = wheels.get(norm(dist))
    try:
        have = version(dist)
    except PackageNotFoundError:
        have = None
    if wheel is not None and (have is None or key(have) < key(wheel.name.split("-")[1])):
        print(wheel)
    elif wheel is None and have is None:
        print(f"gpu_check: {dist} is missing and no wheel for it is in {sys.argv[1]}", file=sys.stderr)
EOF
)
    if [[ ${#NEEDED[@]} -gt 0 ]]; then
        echo "gpu_check: installing ${#NEEDED[@]} carried wheels into $SITE: $(for w in "${NEEDED[@]}"; do basename "$w" | cut -d- -f1-2; done | tr '\n' ' ')"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${NEEDED[@]}"
    fi
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

IMPORT_ERRORS="$(mktemp)"
if ! "$PY" -c 'import app.main, worker.tasks' 2>"$IMPORT_ERRORS"; then
    echo "gpu_check: the service does not import with $PY:" >&2
    tail -5 "$IMPORT_ERRORS" >&2
    echo "gpu_check: carry its missing packages as wheels (see --download-wheels) and pass --wheels DIR" >&2
    exit 1
fi
rm -f "$IMPORT_ERRORS"
exec "$PY" "$ROOT/benchmarks/gpu_check.py" ${ARGS[@]+"${ARGS[@]}"}
