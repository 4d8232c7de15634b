"""The shard job's private Ray on this machine (`shards.cluster.connect` without an address): stopped completely,
the autoscaler monitor first."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import REPO, pids_mentioning, stop_pids

pytestmark = pytest.mark.ray

# In a process of its own: the test session's shared Ray (`ray_local`) would otherwise be the one `connect` returns.
_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import ray
    from ray._private import ray_constants, worker
    from shards import cluster

    connection = cluster.connect(None, num_cpus=1)
    node = worker._global_node
    temp_dir = node.get_temp_dir_path()
    processes = {kind: [i.process.pid for i in infos] for kind, infos in node.all_processes.items()}
    monitor = node.all_processes[ray_constants.PROCESS_TYPE_MONITOR][0].process

    cluster._stop_autoscaler_monitor()
    monitor_gone = monitor.poll() is not None
    still_works = ray.get(ray.remote(lambda: 6 * 7).remote())  # the rest of the cluster is untouched
    connection.close()
    print(json.dumps({"temp_dir": temp_dir, "processes": processes, "monitor_gone": monitor_gone,
                      "still_works": still_works, "initialized": ray.is_initialized()}))
    """
)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_private_ray_stops_every_process_and_its_temp_dir():
    """`Connection.close` of a private Ray leaves no Ray process and no temp dir; the autoscaler monitor, which Ray
    itself would stop only after the GCS (and then wait on for a second), is stopped first without disturbing the
    cluster."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    leftovers = [p for pids in report["processes"].values() for p in pids if _alive(p)]
    try:
        assert report["monitor_gone"] and report["still_works"] == 42
        assert not report["initialized"]
        assert {"gcs_server", "raylet", "monitor"} <= set(report["processes"])
        assert leftovers == []
        assert not Path(report["temp_dir"]).exists()
        assert report["temp_dir"].startswith("/tmp/relret-ray-")
    finally:
        stop_pids(leftovers + pids_mentioning(report["temp_dir"]))
