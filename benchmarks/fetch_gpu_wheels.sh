#!/usr/bin/env bash
# Fetch the wheels a bare GPU machine lacks into gpu-wheels/ (git-ignored), for docs/gpu.md's one command.
#
# Such a machine has torch, transformers (and with it pyyaml, numpy, safetensors, tqdm), peft and accelerate,
# Python 3.12 on x86_64, and no network. lisatune also needs pydantic (and its parts); the 8-bit and nf4 cases
# need bitsandbytes, whose one wheel carries its CUDA 11.8 - 13.x libraries. Versions are those of this
# checkout's .venv (what the test suite runs with), or the newest where a package is not installed there.
#
#   bash benchmarks/fetch_gpu_wheels.sh                    # -> gpu-wheels/*.whl, about 46 MB
#   GPU_PYTHON=3.11 bash benchmarks/fetch_gpu_wheels.sh    # for a machine with another Python
set -euo pipefail
cd "$(dirname "$0")/.."

DEST=gpu-wheels
PY=${PYTHON:-.venv/bin/python}
GPU_PYTHON=${GPU_PYTHON:-3.12}
LIMIT_MB=50
PACKAGES=(pydantic pydantic-core annotated-types typing-inspection typing-extensions bitsandbytes)

[ -x "$PY" ] || PY=python3
pinned() {  # name==version as installed here, else the bare name
  local v
  v=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1" 2>/dev/null) || true
  echo "$1${v:+==$v}"
}
specs=()
for p in "${PACKAGES[@]}"; do specs+=("$(pinned "$p")"); done

# Into a fresh folder first: a failed download never leaves a half set behind.
tmp=$(mktemp -d "${DEST}.XXXX")
trap 'rm -rf "$tmp"' EXIT
# Both manylinux tags: recent pip no longer widens manylinux_2_24 to the 2_17 wheels (pydantic-core's).
"$PY" -m pip download --quiet --only-binary=:all: --no-deps --implementation cp --python-version "$GPU_PYTHON" \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --dest "$tmp" "${specs[@]}"

n=$(find "$tmp" -name '*.whl' | wc -l)
if [ "$n" -ne "${#PACKAGES[@]}" ]; then
  echo "fetch_gpu_wheels: got $n wheels for ${#PACKAGES[@]} packages (${specs[*]})" >&2
  exit 1
fi
size_mb=$(du -sm "$tmp" | cut -f1)
if [ "$size_mb" -gt "$LIMIT_MB" ]; then
  echo "fetch_gpu_wheels: the wheels take $size_mb MB, over the $LIMIT_MB MB the device tool carries for them" >&2
  exit 1
fi
rm -rf "$DEST"
mv "$tmp" "$DEST"
trap - EXIT
ls -1 "$DEST"
echo "$DEST: $(du -sh "$DEST" | cut -f1) (${specs[*]}, Python $GPU_PYTHON, manylinux x86_64)"
