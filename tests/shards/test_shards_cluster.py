"""`ray up` / `ray submit configs/ray/local.yaml shards/build.py` / stop, end to end on 127.0.0.1.

The cluster is reached through a private sshd run in inetd mode (`sshd -i` as the SSH ProxyCommand): key-only login,
nothing listening, its own host key, and a private HOME (so ~/.bashrc, ~/build.py and Ray's bootstrap files never
touch the real home). Every process the test starts is found by the test's own directory or ports and stopped by
PID; `ray down` is not used because it runs `ray stop`, which ends every Ray process on the machine.
"""

import getpass
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from kit import REPO
from kit.procs import descendants, free_port, pids_mentioning, stop_pids

from relret.shard_format import read_manifest

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.distributed]

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
LOCAL_YAML = REPO / "configs/ray/local.yaml"
# The fixed ports and temp dir in configs/ray/local.yaml, replaced by free ones and a private directory here.
FIXED_PORTS = (6380, 10011, 52366, 8266)
FIXED_TEMP_DIR = "/tmp/relret-ray-cluster"


def _require_tools() -> None:
    missing = [tool for tool in (SSHD, "ssh", "rsync", "ssh-keygen") if shutil.which(tool) is None]
    if missing:
        message = f"{', '.join(missing)} not installed (apt-get install openssh-server rsync; .ci/run does this)"
        if os.environ.get("RELRET_CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture()
def private_sshd():
    """Key pair, sshd config and private HOME under a short temporary directory; yields (root, key, proxy command)."""
    _require_tools()
    root = Path(tempfile.mkdtemp(prefix="rrc-", dir="/tmp"))
    home, tmp = root / "home", root / "tmp"
    home.mkdir()
    tmp.mkdir()
    for name in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / name)], check=True)
    shutil.copy(root / "user_key.pub", root / "authorized_keys")
    (root / "sshd_config").write_text(
        f"HostKey {root}/host_key\n"
        f"AuthorizedKeysFile {root}/authorized_keys\n"
        "PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PermitRootLogin prohibit-password\nUsePAM no\nStrictModes no\nPidFile none\n"
        f"SetEnv HOME={home} TMPDIR={tmp} RAY_USAGE_STATS_ENABLED=0\n"
    )
    # What a user of configs/ray/local.yaml sets up once: the login shell finds the project's environment first.
    (home / ".bash_profile").write_text(f"export PATH={Path(sys.executable).parent}:$PATH\n")
    (home / ".bashrc").write_text("")
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd refuses to start without its privilege-separation directory
    try:
        yield root, root / "user_key", f"{SSHD} -i -f {root}/sshd_config"
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_ray_up_submit_and_stop_on_loopback(private_sshd, synth_corpus, tmp_path):
    """The committed local cluster config comes up, runs shards/build.py submitted to it (the job joins that cluster
    rather than starting its own Ray), and every process it started is stopped by PID afterwards."""
    root, key, proxy = private_sshd
    cluster_name = f"relret-test-{root.name[4:]}"
    text = LOCAL_YAML.read_text()
    ports = {fixed: free_port() for fixed in FIXED_PORTS}
    for fixed, port in ports.items():
        assert str(fixed) in text, f"{LOCAL_YAML} no longer uses port {fixed}; update this test"
        text = text.replace(str(fixed), str(port))
    ray_temp = str(root / "ray")
    text = text.replace(FIXED_TEMP_DIR, ray_temp)
    config = yaml.safe_load(text)
    config["cluster_name"] = cluster_name
    config["auth"] = {"ssh_user": getpass.getuser(), "ssh_private_key": str(key), "ssh_proxy_command": proxy}
    cluster_yaml = tmp_path / "cluster.yaml"
    cluster_yaml.write_text(yaml.safe_dump(config))
    gcs = f"127.0.0.1:{ports[6380]}"

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        TMPDIR=str(root / "tmp"), RAY_USAGE_STATS_ENABLED="0", PATH=f"{Path(sys.executable).parent}:{env['PATH']}"
    )
    ray = str(Path(sys.executable).parent / "ray")
    started: list[int] = []
    try:
        up = subprocess.run([ray, "up", "-y", "--no-config-cache", str(cluster_yaml)], env=env, capture_output=True,
                            text=True, timeout=300)  # fmt: skip
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        started = pids_mentioning(ray_temp)
        assert started, "ray up returned but no Ray process runs with the test's temp dir"
        out = tmp_path / "out"
        submit = subprocess.run(
            [ray, "submit", str(cluster_yaml), str(REPO / "shards/build.py"), "--", "--dataset", "clotho",
             "--captions", str(synth_corpus / "clotho_captions_development.csv"),
             "--audio-dir", str(synth_corpus / "development"), "--out", str(out), "--samples-per-shard", "50",
             "--no-progress-bar"],
            env=env, capture_output=True, text=True, timeout=400,
        )  # fmt: skip
        log = submit.stdout[-4000:] + submit.stderr[-4000:]
        assert submit.returncode == 0, log
        assert f"Ray: {gcs}" in submit.stdout, log  # joined the cluster (a private Ray would say "Ray: local")
        manifest = read_manifest(str(out / "clotho" / "development"))
        assert manifest.config["ray_cluster"] == gcs
        assert [s.samples for s in manifest.shards] == [50, 50, 20]
    finally:
        # Everything started for this cluster names the test's directory or GCS port on its command line; their
        # children (Ray workers, agents) are found through /proc.
        pids = pids_mentioning(str(root)) + pids_mentioning(gcs) + started
        stop_pids(pids + [c for p in pids for c in descendants(p)])
        control = Path(f"/tmp/ray_ssh_{hashlib.sha256(getpass.getuser().encode()).hexdigest()[:10]}")
        shutil.rmtree(control / hashlib.sha256(cluster_name.encode()).hexdigest()[:10], True)  # Ray's SSH sockets
        if control.is_dir() and not any(control.iterdir()):
            control.rmdir()
    assert pids_mentioning(str(root)) == [] and pids_mentioning(gcs) == []


def test_local_config_never_runs_ray_stop():
    """`ray stop` ends every Ray process of the user on the machine: the local cluster config must not run it."""
    config = yaml.safe_load(LOCAL_YAML.read_text())
    commands = [c for k, v in config.items() if k.endswith("_commands") for c in v]
    assert commands and not any(re.search(r"\bray stop\b", c) for c in commands)
    assert config["provider"] == {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []}
