#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py: CPT LoRA tokens/s + MFU on SmolLM2 and Qwen2.5-0.5B, one align epoch, the
# packing bench) on a machine that reaches no registry: install the carried wheels (.whl/, made here by
# bench/gpu_prepare.sh) into /tmp/site, then run the check inside a total time budget (<= 8 minutes on one H100).
# JSON + log to $OUT, else bench/results/. Extra arguments go to gpu_check.py (e.g. --parts cpt:smollm2,align).
#
#   bash bench/gpu_prepare.sh                                              # here, once
#   device tool: run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=560)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-430}   # seconds for all parts; the install and imports come on top (~20 s)
OUTDIR=${OUT:-bench/results}
mkdir -p "$OUTDIR"
# nothing can be fetched there: never let a library wait on the hub
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
       HF_HUB_DISABLE_TELEMETRY=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WHEELS=${GPU_CHECK_WHEELS:-.whl}   # another folder only to test this script on another Python (gpu_prepare.sh PYVER/DEST)
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  SITE=${GPU_CHECK_SITE:-/tmp/site}
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
    || { echo "gpu_check.sh: installing $WHEELS/*.whl failed" >&2; exit 1; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  echo "installed $(ls "$WHEELS"/*.whl | wc -l) carried wheels into $SITE"
else
  echo "gpu_check.sh: no .whl/ here; pydantic, datasets and trl must already be installed (bash bench/gpu_prepare.sh, carry .whl)" >&2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
# a backstop only: gpu_check.py keeps its own budget (and on SIGTERM records the part in flight as killed)
timeout --kill-after=20 "${GPU_CHECK_TIMEOUT_S:-$((${BUDGET%.*} + 60))}" $PY bench/gpu_check.py --budget-s "$BUDGET" --out "$OUTDIR" "$@"
rc=$?
ls -l "$OUTDIR"/gpu_check* 2>/dev/null
exit $rc
