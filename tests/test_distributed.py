import pytest

from relret.distributed import DistInfo, read_world


def test_no_launcher_is_a_world_of_one():
    """No RANK/WORLD_SIZE and no srun step: one process, no process group."""
    assert read_world({"PATH": "/bin", "SLURM_JOB_ID": "5", "SLURM_PROCID": "0"}) == DistInfo()


def test_torch_launcher_variables():
    """deepspeed/torchrun variables give rank, local rank and world size."""
    assert read_world({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == DistInfo(3, 1, 4, "torch")


def test_srun_step_variables():
    """Inside an srun step the SLURM task variables describe the world; launcher variables take precedence."""
    env = {"SLURM_PROCID": "2", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "9"}
    assert read_world(env) == DistInfo(2, 0, 4, "slurm")
    assert read_world(env | {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}).source == "torch"


@pytest.mark.parametrize(
    "env, match",
    [
        ({"RANK": "0"}, "half-set distributed environment: RANK set but WORLD_SIZE, LOCAL_RANK missing"),
        ({"WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK missing"),
        ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "inconsistent"),
        ({"RANK": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK='x' is not an integer"),
        ({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2"}, "lacks SLURM_LOCALID"),
    ],
)
def test_half_set_environment_is_refused(env, match):
    """A half-set or inconsistent environment raises instead of silently training on a subset."""
    with pytest.raises(RuntimeError, match=match):
        read_world(env)
