#!/usr/bin/env bash
# Train on one machine with N processes through torchrun (c10d rendezvous on localhost).
#
#   launch/local.sh --gin_file=gin/tiny.gin --workdir=runs/tiny            # one process per GPU (1 on CPU)
#   NPROC=8 launch/local.sh --gin_file=gin/gla.gin --workdir=runs/gla --gin.LR=3e-4
#
# Every argument goes to `python -m flame_gin.train`. Environment:
#   NPROC             processes (default: number of visible GPUs, or 1 without one)
#   FLAME_GIN_PYTHON  interpreter with flame_gin installed (default: python3 on PATH, or python)
#   RDZV_PORT         rendezvous port (default 0: torchrun picks a free one)
# SIGTERM and SIGUSR2 reach the trainer, which saves and exits 42; rerunning with the same --workdir resumes.
set -euo pipefail

PYTHON="${FLAME_GIN_PYTHON:-$(command -v python3 || command -v python)}"

gpu_count() {
  if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    local IFS=,; set -- $CUDA_VISIBLE_DEVICES; echo "$#"; return
  fi
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --list-gpus 2>/dev/null | grep -c '^GPU' || true
    return
  fi
  echo 0
}

NPROC="${NPROC:-}"
if [[ -z "$NPROC" ]]; then
  NPROC="$(gpu_count)"
  [[ "$NPROC" =~ ^[0-9]+$ && "$NPROC" -gt 0 ]] || NPROC=1
fi
if ! [[ "$NPROC" =~ ^[1-9][0-9]*$ ]]; then
  echo "launch/local.sh: NPROC must be a positive integer, got '$NPROC'" >&2
  exit 2
fi

# torchrun forwards the signals it handles to the trainer processes; SIGUSR2 is added where torchrun supports it.
SIGNAL_ARGS=()
if "$PYTHON" -m torch.distributed.run --help 2>/dev/null | grep -q -- '--signals[-_]to[-_]handle'; then
  SIGNAL_ARGS=(--signals_to_handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR2)
fi

exec "$PYTHON" -m torch.distributed.run \
  --nnodes=1 --nproc_per_node="$NPROC" \
  --rdzv_backend=c10d --rdzv_endpoint="localhost:${RDZV_PORT:-0}" --rdzv_id="local-$$" \
  "${SIGNAL_ARGS[@]}" \
  -m flame_gin.train "$@"
