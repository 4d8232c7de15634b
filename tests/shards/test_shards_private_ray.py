"""The shard job's private Ray on this machine (`shards.cluster.connect` without an address): stopped completely,
the autoscaler monitor first."""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from kit import REPO
from kit.procs import alive, pids_mentioning, stop_pids

pytestmark = pytest.mark.ray

# In a process of its own: the test session's shared Ray (`ray_local`) would otherwise be the one `connect` returns.
_SCRIPT = textwrap.dedent(
    """
    import json
    import ray
    from ray._private import ray_constants, worker
    from shards import cluster

    connection = cluster.connect(None, num_cpus=1)
    node = worker._global_node
    temp_dir = node.get_temp_dir_path()
    print(temp_dir, flush=True)  # first, so that the test can stop this Ray even if what follows fails
    processes = {kind: [i.process.pid for i in infos] for kind, infos in node.all_processes.items()}
    monitor = node.all_processes[ray_constants.PROCESS_TYPE_MONITOR][0].process

    seen = {}
    real_shutdown = ray.shutdown

    def shutdown(*args, **kwargs):  # what `close` has done by the time it calls ray.shutdown
        seen["monitor_gone"] = monitor.poll() is not None
        seen["still_works"] = ray.get(ray.remote(lambda: 6 * 7).remote())  # the rest of the cluster is untouched
        return real_shutdown(*args, **kwargs)

    ray.shutdown = shutdown
    connection.close()
    print(json.dumps({"temp_dir": temp_dir, "processes": processes, **seen, "initialized": ray.is_initialized()}))
    """
)


def test_private_ray_stops_every_process_and_its_temp_dir():
    """`Connection.close` of a private Ray leaves no Ray process and no temp dir; the autoscaler monitor, which Ray
    itself would stop only after the GCS (and then wait on for a second), is stopped first without disturbing the
    cluster."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=180
    )
    lines = proc.stdout.strip().splitlines()
    temp_dir = next((line for line in lines if line.startswith("/tmp/relret-ray-")), None)
    report = json.loads(lines[-1]) if proc.returncode == 0 else {}
    recorded = [p for pids in report.get("processes", {}).values() for p in pids]
    try:
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert report["monitor_gone"] and report["still_works"] == 42
        assert not report["initialized"]
        assert {"gcs_server", "raylet", "monitor"} <= set(report["processes"])
        assert report["temp_dir"] == temp_dir
        deadline = time.monotonic() + 10  # the raylet's workers may take a moment to exit after it
        while time.monotonic() < deadline and (pids_mentioning(temp_dir) or [p for p in recorded if alive(p)]):
            time.sleep(0.1)
        assert [p for p in recorded if alive(p)] == []
        assert pids_mentioning(temp_dir) == []
        assert not Path(temp_dir).exists()
    finally:
        stop_pids([p for p in recorded if alive(p)] + (pids_mentioning(temp_dir) if temp_dir else []))
