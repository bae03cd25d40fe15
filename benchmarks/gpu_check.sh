#!/usr/bin/env bash
# One-call GPU performance check (issue 11): ViT-B/16 at 224 px, random weights, synthetic data, every built-in
# method through clbench's real loop; prints training and evaluation img/s, MFU and peak memory as name=value lines.
# Needs an NVIDIA GPU and no network; at most ~8 minutes (a hard limit per method and for the whole call).
#   benchmarks/gpu_check.sh                 # the check (exit 2 with a message when CUDA is missing)
#   benchmarks/gpu_check.sh --smoke         # CPU code-path test with a micro ViT (seconds)
#   benchmarks/gpu_check.sh --compile --methods lora --budget 300   # runtime.compile (torch.compile of the backbone;
#                                           # compilation falls in the 85 s default budget per method, so raise it)
# Any other option goes to benchmarks/gpu_check.py (--help lists them). Environment: PYTHON (interpreter; default
# the repository's .venv, else python3), GPU_CHECK_TIMEOUT (seconds for the whole call, default 470).
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
# nothing may go online: weights are random, data synthetic
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
case " $* " in
  *" --smoke "*) ;;
  *) if command -v nvidia-smi >/dev/null 2>&1; then
       nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null \
         | sed 's/^/gpu: /'
     fi ;;
esac
echo "loadavg=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo n/a)"
timeout -k 10 "${GPU_CHECK_TIMEOUT:-470}" "$PY" benchmarks/gpu_check.py "$@"
rc=$?
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
  echo "gpu_check: stopped after ${GPU_CHECK_TIMEOUT:-470} s (lower --steps or --methods, or raise GPU_CHECK_TIMEOUT)"
fi
exit "$rc"
