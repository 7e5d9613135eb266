#!/usr/bin/env bash
# Entry point of llmstack's XPU serving image: `python -m llmstack` with a profile and a model you choose.
# Nothing is assumed: with no profile or no model it prints this usage and exits 2, instead of starting with
# placeholder values that fail later (ipex-llm #12953: MODEL_PATH="default_model_path").
#
#   docker run ... IMAGE profile=arc_a770x2 model=qwen14b [key=value ...]
#   docker run ... -e LLMSTACK_PROFILE=arc_a770x2 -e LLMSTACK_MODEL=qwen14b IMAGE [key=value ...]
#   docker run ... IMAGE doctor            devices, drivers, versions, which profiles fit
#   docker run ... IMAGE bash              a shell (no need for --entrypoint)
#   docker run ... IMAGE help              this text, the profiles and the models
#
# LLMSTACK_MODEL (or model=) is a configs/model option, or a model directory: a name under /llm/models or an
# absolute path, served as model=local. Arguments win over the environment. Unless given, the server listens
# on 0.0.0.0 (reachable from outside the container), runs in the foreground without a benchmark
# (benchmark=none) and writes its results to /workspace/results. dry_run=true prints the plan and stops.
set -euo pipefail

python=${LLMSTACK_PYTHON:-python}
config_dir=${LLMSTACK_CONFIG_DIR:-/opt/llmstack/configs}
models_dir=${LLMSTACK_MODELS:-/llm/models}

usage() {
  sed -n '2,15s/^# \{0,1\}//p' "$0"
  echo
  echo "profiles: $(options profile)"
  echo "models:   $(options model)"
}

options() {
  local names=() file
  for file in "$config_dir/$1"/*.yaml; do
    [ -e "$file" ] && names+=("$(basename "$file" .yaml)")
  done
  echo "${names[*]:-(none found in $config_dir/$1)}"
}

case "${1:-}" in
  help | -h | --help)
    usage
    exit 0
    ;;
  doctor)
    shift
    exec "$python" -m llmstack.doctor "$@"
    ;;
  bash | sh)
    exec "$@"
    ;;
esac

args=("$@")

given() {
  local key=$1 arg
  for arg in "${args[@]}"; do
    case "$arg" in "$key="* | "+$key="* | "++$key="*) return 0 ;; esac
  done
  return 1
}

if ! given profile && [ -n "${LLMSTACK_PROFILE:-}" ]; then
  args+=("profile=$LLMSTACK_PROFILE")
fi
if ! given model && [ -n "${LLMSTACK_MODEL:-}" ]; then
  model=$LLMSTACK_MODEL
  if [ -f "$config_dir/model/$model.yaml" ]; then
    args+=("model=$model")
  else
    case "$model" in
      /*) path=$model ;;
      *) path="$models_dir/$model" ;;
    esac
    if [ ! -d "$path" ]; then
      echo "llmstack-entrypoint: LLMSTACK_MODEL=$model is neither a model option ($(options model))" \
        "nor a model directory ($path does not exist)." >&2
      exit 2
    fi
    args+=("model=local" "model.path=$path" "model.served_name=$(basename "$path")")
  fi
fi

if ! given profile || ! given model; then
  usage >&2
  echo >&2
  echo "llmstack-entrypoint: choose a profile and a model (arguments profile=... model=..., or the" \
    "environment variables LLMSTACK_PROFILE and LLMSTACK_MODEL); nothing was started." >&2
  exit 2
fi

given engine.host || args+=("engine.host=0.0.0.0")
given benchmark || args+=("benchmark=none")
given results_dir || args+=("results_dir=${LLMSTACK_RESULTS:-/workspace/results}")

# The oneAPI and oneCCL environment that the base images' interactive shells set up. An overridden entrypoint
# must set it itself, or runs lose performance or run out of memory (llm-scaler KNOWN_ISSUES #03); the
# ipex-llm image's start-vllm-service.sh sources its oneCCL build the same way.
if [ -z "${LLMSTACK_NO_SETVARS:-}" ]; then
  set +u
  for script in /opt/intel/oneapi/setvars.sh /opt/intel/oneapi/ccl/2021.15/env/vars.sh \
    /opt/intel/1ccl-wks/setvars.sh; do
    if [ -f "$script" ]; then
      # shellcheck disable=SC1090
      source "$script" --force >/dev/null 2>&1 || echo "llmstack-entrypoint: $script failed" >&2
    fi
  done
  set -u
fi

exec "$python" -m llmstack "${args[@]}"
