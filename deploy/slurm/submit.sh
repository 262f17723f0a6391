#!/bin/bash
# Submit deploy/slurm/run_kompot.sbatch for one atlas:
#   deploy/slurm/submit.sh /data/atlas.zarr /data/results.zarr [extra sbatch options]
set -euo pipefail
ATLAS="${1:?usage: submit.sh ATLAS OUTPUT [sbatch options]}"
OUTPUT="${2:?usage: submit.sh ATLAS OUTPUT [sbatch options]}"
shift 2
HERE="$(cd "$(dirname "$0")" && pwd)"
exec sbatch --export="ALL,ATLAS=$ATLAS,OUTPUT=$OUTPUT" "$@" "$HERE/run_kompot.sbatch"
