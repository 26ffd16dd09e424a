#!/usr/bin/env bash
# The GPU verdict of issue 17 in one call (at most 8 minutes of wall time, staging included): stages the wheels the
# GPU host lacks (.whl/, from `bash ../shared/gpu/stage.sh` here), then runs benchmarks/gpu_verdict.py, which writes
# each row to $OUT as soon as it exists (verdict.json, verdict.md, profile.tar.gz; this script adds verdict.log).
#
#   bash benchmarks/gpu_verdict.sh            # on the GPU host (python3 there holds jax, torch, flax, optax)
#   bash benchmarks/gpu_verdict.sh --smoke    # CPU rehearsal (CI): ResNet-18, 32 px, same rows, code and files
#
# Any other argument goes to gpu_verdict.py (e.g. --rows=jax_clean,jax_feature --budget_s=300). Environment:
# OUT (output folder; default .verdict_out/), PYTHON (default python3), SITE (where the wheels go; /tmp/metrix_site).
set -uo pipefail
started_at=$(date +%s)
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-$PWD/.verdict_out}
PYTHON=${PYTHON:-python3}
SITE=${SITE:-/tmp/metrix_site}
mkdir -p "$OUT"
smoke=0
for arg in "$@"; do [ "$arg" = --smoke ] && smoke=1; done
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "$smoke" = 0 ]; then
  if compgen -G '.whl/*.whl' > /dev/null; then
    # No package registry on the GPU host: install the staged wheels (no dependencies resolved, nothing compiled).
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
      && export PYTHONPATH="$SITE:$PYTHONPATH" \
      || echo "gpu_verdict.sh: installing .whl/*.whl failed; rows that need grain/tfds/ml_collections will fail" >&2
  else
    echo "gpu_verdict.sh: no .whl/ here (run 'bash ../shared/gpu/stage.sh' in the checkout and carry .whl)" >&2
  fi
fi
export PYTHONUNBUFFERED=1
"$PYTHON" benchmarks/gpu_verdict.py --started_at="$started_at" --out="$OUT" "$@" 2>&1 | tee "$OUT/verdict.log"
exit "${PIPESTATUS[0]}"
