"""SLURM orchestration: submits, chains and resumes the stages; it does not import training internals."""
