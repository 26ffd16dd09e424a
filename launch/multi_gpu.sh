#!/usr/bin/env bash
# Train on every GPU of this host: one process, one jitted step over a mesh of all local GPUs (no torchrun,
# no per-GPU processes; the global batch is split over the GPUs and the numbers do not depend on their count).
#
# Usage: launch/multi_gpu.sh CONFIG WORKDIR [--config.KEY=VALUE ...]
#   e.g. launch/multi_gpu.sh configs/cub200.py:ms,feature workdirs/cub_ms_metrix \
#          --config.dataset.manual_dir=/data/cub --config.model.pretrained=resnet50.npz
# Env:   GPUS=0,1,2,3  use only these GPUs (CUDA_VISIBLE_DEVICES); DRY_RUN=1 prints the command only.
# Needs: pip install -e '.[cuda12]'. Rerunning the same command resumes from WORKDIR's latest checkpoint.
set -euo pipefail

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; }
if [[ $# -lt 2 || "$1" == "-h" || "$1" == "--help" ]]; then usage; [[ $# -ge 1 ]] && exit 0 || exit 2; fi

config="$1"; workdir="$2"; shift 2
cd "$(dirname "$0")/.."
if [[ -n "${GPUS:-}" ]]; then export CUDA_VISIBLE_DEVICES="$GPUS"; fi
# Let XLA take most of GPU memory up front (the default 75% leaves room for nothing else anyway).
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
cmd=(python -m metrix_jax.main "--config=$config" "--workdir=$workdir" "$@")
echo "${cmd[*]}"
if [[ "${DRY_RUN:-0}" == "1" ]]; then exit 0; fi
mkdir -p "$workdir"
"${cmd[@]}" 2>&1 | tee -a "$workdir/train.log"
