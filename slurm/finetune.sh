#!/usr/bin/env bash
# Fine-tuning from a pretraining run: like slurm/pretrain.sh, with --init-from naming the pretraining run directory
# (its best checkpoint, else its latest, gives the weights; optimizer and schedule start fresh).
#
#   sbatch [--nodes=1 --gpus-per-node=8 --ntasks-per-node=8 --partition=P --account=A --time=T --qos=Q] \
#       slurm/finetune.sh --config configs/finetune_clotho.yaml --run-dir runs/finetune_clotho \
#       --init-from runs/pretrain [dotted.key=value ...]
#
# A requeued or resubmitted fine-tuning resumes from its own checkpoint, not from --init-from again.
#SBATCH --job-name=relret-finetune
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
[[ -n $(relret_option --init-from "$@") ]] || relret_die "fine-tuning needs --init-from PRETRAIN_RUN_DIR"
relret_train "$@"
