#!/usr/bin/env bash
# Train on every host of a Cloud TPU pod slice: create the TPU VM, copy this repo to every worker, install it,
# run the same command on all workers (jax.distributed over the pod), copy results.json back.
#
# Usage: launch/tpu_pod.sh create|setup|run|fetch|delete|all  [--config.KEY=VALUE ...]   (extra args: run/all; create: preflight)
# Env (required): TPU_NAME, ZONE, CONFIG (e.g. configs/sop.py:ms,feature), WORKDIR (gs://bucket/run or a path
#   on each worker; a gs:// workdir keeps checkpoints and results in one place for every host).
# Env (optional): ACCELERATOR=v4-32, VERSION=tpu-ubuntu2204-base, PROJECT=(gcloud default), DATA_DIR=gs://...
#   (built data sets, passed as --config.dataset.data_dir), DRY_RUN=1 (print the gcloud commands only).
# ACCELERATOR (gcloud --accelerator-type; topology in brackets): v4-8 v4-16 v4-32 v4-64 v4-128 v4-256 v4-512
#   v4-1024 (2 TensorCores per chip: v4-128 = 64 chips [4x4x4]), v5p-8 ... v5p-1024 (same shapes), v5litepod-1 4 8
#   16 32 64 128 256 (= v5e-N, N chips [v5e-256: 16x16]), v6e-1 4 8 16 32 64 128 256.
# Preflight (create/all, before anything is created): benchmarks/tpu_aot.py --preflight prints the per-chip memory
#   of CONFIG + the extra args on ACCELERATOR (compiled ahead of time here when libtpu is installed, else the
#   recorded AOT table) and stops when the step does not fit the chip's HBM (exit 3) or the global batch does not
#   split over the chips / the config is invalid (exit 2). PREFLIGHT=0 skips it; PYTHON=python3 (needs metrix_jax;
#   with jax[tpu] it compiles: minutes), AOT_COMPILE=auto|yes|no.
# Example: TPU_NAME=metrix ZONE=us-central2-b CONFIG=configs/sop.py:ms,feature WORKDIR=gs://b/sop \
#          DATA_DIR=gs://b/tfds launch/tpu_pod.sh all --config.train.batch_size=160 \
#          --config.dataset.classes_per_batch=32
set -euo pipefail

usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; }
if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then usage; [[ $# -ge 1 ]] && exit 0 || exit 2; fi
action="$1"; shift
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
ACCELERATOR="${ACCELERATOR:-v4-32}"; VERSION="${VERSION:-tpu-ubuntu2204-base}"
project_flag=(); [[ -n "${PROJECT:-}" ]] && project_flag=(--project="$PROJECT")
repo="$(cd "$(dirname "$0")/.." && pwd)"

q() { local s=${1//\'/\'\\\'\'}; printf "'%s'" "$s"; }  # single-quoted for the remote shell
run() { echo "+ $*"; if [[ "${DRY_RUN:-0}" != "1" ]]; then "$@"; fi; }
ssh_all() { run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" "${project_flag[@]}" --worker=all \
              --command="$1"; }

preflight() {  # the AOT memory row of this slice and config; stops a run that cannot fit before it costs money
  if [[ "${PREFLIGHT:-1}" == "0" ]]; then echo "preflight: skipped (PREFLIGHT=0)"; return 0; fi
  if [[ -z "${CONFIG:-}" ]]; then echo "preflight: skipped (set CONFIG to check the memory of the run)"; return 0; fi
  local rc=0
  (cd "$repo" && "${PYTHON:-python3}" benchmarks/tpu_aot.py --preflight --accelerator="$ACCELERATOR" \
     --config="$CONFIG" --compile="${AOT_COMPILE:-auto}" "$@") || rc=$?
  if [[ $rc -ne 0 ]]; then
    if [[ $rc -ne 2 && $rc -ne 3 ]]; then
      echo "preflight: '${PYTHON:-python3} benchmarks/tpu_aot.py' failed (exit $rc; metrix_jax installed? pip install -e .)."
    fi
    echo "preflight: nothing was created. PREFLIGHT=0 skips this check." >&2
    exit "$rc"
  fi
}
create() {
  run gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" "${project_flag[@]}" \
      --accelerator-type="$ACCELERATOR" --version="$VERSION"
}
setup() {  # the working tree (no workdirs/ or .venv) to every worker, then an editable install with jax[tpu]
  local tarball=/tmp/metrix_jax_src.tgz
  run tar -C "$repo" --exclude=.git --exclude=.venv --exclude=workdirs -czf "$tarball" .
  run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:~/metrix_jax_src.tgz" --zone="$ZONE" \
      "${project_flag[@]}" --worker=all
  ssh_all "mkdir -p ~/metrix_jax && tar -C ~/metrix_jax -xzf ~/metrix_jax_src.tgz && cd ~/metrix_jax && \
python3 -m pip install -q -e '.[tpu]'"
}
train() {  # the same command on every worker; METRIX_DISTRIBUTED=1: jax.distributed.initialize() (auto on TPU)
  : "${CONFIG:?set CONFIG}" "${WORKDIR:?set WORKDIR}"
  local extra="" a
  for a in "$@"; do extra+=" $(q "$a")"; done
  if [[ -n "${DATA_DIR:-}" ]]; then extra+=" $(q "--config.dataset.data_dir=$DATA_DIR")"; fi
  ssh_all "cd ~/metrix_jax && METRIX_DISTRIBUTED=1 python3 -m metrix_jax.main \
$(q "--config=$CONFIG") $(q "--workdir=$WORKDIR")$extra 2>&1 | tee -a ~/train.log"
}
fetch() {  # results.json (written by process 0 = worker 0) and worker 0's log
  : "${WORKDIR:?set WORKDIR}"
  run mkdir -p "results/$TPU_NAME"
  if [[ "$WORKDIR" == gs://* ]]; then
    run gcloud storage cp "$WORKDIR/results.json" "results/$TPU_NAME/"
  else
    run gcloud compute tpus tpu-vm scp "$TPU_NAME:$WORKDIR/results.json" "results/$TPU_NAME/" --zone="$ZONE" \
        "${project_flag[@]}" --worker=0
  fi
  run gcloud compute tpus tpu-vm scp "$TPU_NAME:~/train.log" "results/$TPU_NAME/" --zone="$ZONE" \
      "${project_flag[@]}" --worker=0
}
delete() { run gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" "${project_flag[@]}" --quiet; }

case "$action" in
  create) preflight "$@"; create ;;
  setup) setup ;;
  run) train "$@" ;;
  fetch) fetch ;;
  delete) delete ;;
  all) preflight "$@"; create; setup; train "$@"; fetch ;;
  *) echo "unknown action '$action'"; usage; exit 2 ;;
esac
