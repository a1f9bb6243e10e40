#!/usr/bin/env bash
# A TPU VM pod (or slice): the same command on every worker through gcloud --worker=all;
# jax.distributed reads the pod's topology from the TPU metadata (config.distributed=True).
# Data and workdir live on a bucket that every worker reads and writes.
#   bash launch/tpu_pod.sh [--dry-run] CONFIG WORKDIR [--config.FIELD=VALUE ...]
#   TPU=my-v5e-32 ZONE=us-west4-a bash launch/tpu_pod.sh configs/rrsisd.py \
#       gs://my-bucket/runs/rrsisd --config.data_dir=gs://my-bucket/tfds
# Edit or set: TPU (the pod's name), ZONE, PROJECT (default: gcloud's), REPO_DIR (where
# the project is installed on every worker, default ~/S4ECA-JAX; e.g. run
# `bash launch/setup.sh tpu` there once with the same gcloud --worker=all command).
# Multi-slice: add entries' slice counts to config.mesh (see s4eca_jax/sharding.py).
set -euo pipefail
dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then dry_run=1; shift; fi
if (( $# < 2 )); then
  echo "usage: bash launch/tpu_pod.sh [--dry-run] CONFIG WORKDIR [--config.FIELD=VALUE ...]" >&2
  exit 2
fi
config=$1 workdir=$2; shift 2
tpu=${TPU:-my-tpu-pod} zone=${ZONE:-us-central2-b} repo_dir=${REPO_DIR:-'~/S4ECA-JAX'}
train=(.venv/bin/python -m s4eca_jax.train "--config=$config" "--workdir=$workdir"
       --config.distributed=True "$@")
remote="cd $repo_dir && $(printf '%q ' "${train[@]}")"
command=(gcloud compute tpus tpu-vm ssh "$tpu" "--zone=$zone" --worker=all
         "--command=$remote")
if [[ -n "${PROJECT:-}" ]]; then command+=("--project=$PROJECT"); fi
if (( dry_run )); then printf '%q ' "${command[@]}"; echo; exit 0; fi
exec "${command[@]}"
