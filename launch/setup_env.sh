#!/usr/bin/env bash
# Create ./.venv with locmoe-plugin and its test/framework extras (CPU): torch 2.13.0 (the CPU build;
# pinned first so no dependency pulls a multi-GB CUDA build), megatron-core 0.16.1, deepspeed 0.19.8
# (pure Python, DS_BUILD_OPS=0), pytest, hypothesis, matplotlib (the demo's plot), and the demo's corpus
# (Debian's Python documentation sources, via apt-get download; see locmoe_plugin/demo/corpus.py).
# Idempotent; re-running only checks versions.
# Override: PYTHON=python3.12 VENV=/path TORCH_SPEC="torch==2.13.0" bash launch/setup_env.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip
"${PIP[@]}" install "$TORCH_SPEC"
DS_BUILD_OPS=0 "${PIP[@]}" install -e ".[test,demo,megatron,deepspeed]" "megatron-core==0.16.1" "deepspeed==0.19.8"
"$VENV/bin/python" -c "import torch, megatron.core, deepspeed, locmoe_plugin as l; print('locmoe-plugin', l.__version__, '| torch', torch.__version__, '| megatron-core', megatron.core.__version__, '| deepspeed', deepspeed.__version__)" 2>/dev/null | tail -1
"$VENV/bin/python" -c "from locmoe_plugin.demo.corpus import fetch_corpus; fetch_corpus()" \
  || echo "setup_env: the demo corpus could not be fetched; pass --corpus PATH to locmoe demo" >&2
