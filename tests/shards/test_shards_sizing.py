"""How many CPU SBERT actors the shard job starts, and the audio tasks' scheduling priority."""

import os

import pytest

from shards.job import AUDIO_TASK_NICENESS, SBERT_TO_AUDIO_CPU, _audio_task, cpu_sbert_actors


def _by_hand(cpus: int, captions: float, threads: int = 1) -> int:
    # Embedding CPU per clip r*c against audio CPU 1: the embeddings need cpus * r*c / (1 + r*c) CPUs of the cluster.
    embed_cpu, audio_cpu = SBERT_TO_AUDIO_CPU * captions, 1.0
    wanted = cpus * embed_cpu / (embed_cpu + audio_cpu) / threads
    return min(cpus, max(1, int(wanted + 0.5)))


@pytest.mark.parametrize("cpus", [1, 2, 4, 16, 32, 96])
@pytest.mark.parametrize("captions", [1, 1.4, 5])
@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_actor_count_matches_the_embedding_share(cpus, captions, threads):
    assert cpu_sbert_actors(cpus, captions, threads) == _by_hand(cpus, captions, threads)


def test_cpu_actor_counts_on_the_documented_machines():
    assert cpu_sbert_actors(2, 5) == 1 and cpu_sbert_actors(2, 1) == 1  # this project's 2-core machines
    assert cpu_sbert_actors(32, 5) == 14 and cpu_sbert_actors(32, 1) == 4


def test_audio_task_lowers_its_own_priority_once():
    """In a fresh process (as a Ray worker is), the first audio task adds AUDIO_TASK_NICENESS; later ones add none."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        before, after_one, after_two = pool.apply(_nice_after_tasks)
    assert after_one == min(before + AUDIO_TASK_NICENESS, 19)
    assert after_two == after_one


def _nice_after_tasks():
    before = os.getpriority(os.PRIO_PROCESS, 0)
    _audio_task([], "/nonexistent", "clotho", "x", 30.0)
    one = os.getpriority(os.PRIO_PROCESS, 0)
    _audio_task([], "/nonexistent", "clotho", "x", 30.0)
    return before, one, os.getpriority(os.PRIO_PROCESS, 0)
