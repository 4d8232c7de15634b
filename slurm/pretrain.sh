#!/usr/bin/env bash
# Pretraining: one training process per GPU across all nodes of the allocation (srun).
#
#   sbatch [--nodes=2 --gpus-per-node=8 --ntasks-per-node=8 --partition=P --account=A --time=T --qos=Q] \
#       slurm/pretrain.sh --config configs/pretrain.yaml --run-dir runs/pretrain [dotted.key=value ...]
#
# The #SBATCH lines are defaults that command-line options override; hyper-parameters live in the config. Near the
# time limit or on preemption the job checkpoints and requeues itself, and resumes with no flag (slurm/lib.sh).
#SBATCH --job-name=relret-pretrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.log
set -euo pipefail
# sbatch runs a copy of this script from its spool directory; the job record still names the submitted path.
RELRET_ROOT=${RELRET_ROOT:-$(scontrol show job -o "$SLURM_JOB_ID" | sed -n 's|.*Command=\([^ ]*\)/slurm/[^/ ]*.*|\1|p')}
# shellcheck source=slurm/lib.sh
source "$RELRET_ROOT/slurm/lib.sh" || { echo "cannot read slurm/lib.sh under '$RELRET_ROOT'; set RELRET_ROOT" >&2; exit 2; }
relret_train "$@"
