#!/usr/bin/env bash
# Sharding: runs one command (given as arguments) on the first node, records status.json in $RELRET_STATUS_DIR.
#
#   sbatch [--partition=P --account=A --time=T] slurm/shard.sh python -m shards ...
#
# The command is the pipeline config's shard.command (it may start a Ray cluster over the allocation itself).
#SBATCH --job-name=relret-shard
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --time=12:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.log
set -euo pipefail
# sbatch runs a copy of this script from its spool directory; the job record still names the submitted path.
RELRET_ROOT=${RELRET_ROOT:-$(scontrol show job -o "$SLURM_JOB_ID" | sed -n 's|.*Command=\([^ ]*\)/slurm/[^/ ]*.*|\1|p')}
# shellcheck source=slurm/lib.sh
source "$RELRET_ROOT/slurm/lib.sh" || { echo "cannot read slurm/lib.sh under '$RELRET_ROOT'; set RELRET_ROOT" >&2; exit 2; }
relret_command "$@"
