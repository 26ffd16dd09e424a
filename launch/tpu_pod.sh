#!/usr/bin/env bash
# Train on every host of a Cloud TPU pod slice: create the TPU VM, copy this repo to every worker, install it,
# run the same command on all workers (jax.distributed over the pod), copy results.json back.
#
# Usage: launch/tpu_pod.sh create|setup|run|fetch|delete|all  [--config.KEY=VALUE ...]   (extra args: 'run'/'all')
# Env (required): TPU_NAME, ZONE, CONFIG (e.g. configs/sop.py:ms,feature), WORKDIR (gs://bucket/run or a path
#   on each worker; a gs:// workdir keeps checkpoints and results in one place for every host).
# Env (optional): ACCELERATOR=v4-32, VERSION=tpu-ubuntu2204-base, PROJECT=(gcloud default), DATA_DIR=gs://...
#   (built data sets, passed as --config.dataset.data_dir), DRY_RUN=1 (print the gcloud commands only).
# Example: TPU_NAME=metrix ZONE=us-central2-b CONFIG=configs/sop.py:ms,feature WORKDIR=gs://b/sop \
#          DATA_DIR=gs://b/tfds launch/tpu_pod.sh all --config.train.batch_size=128
set -euo pipefail

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; }
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
  create) create ;;
  setup) setup ;;
  run) train "$@" ;;
  fetch) fetch ;;
  delete) delete ;;
  all) create; setup; train "$@"; fetch ;;
  *) echo "unknown action '$action'"; usage; exit 2 ;;
esac
