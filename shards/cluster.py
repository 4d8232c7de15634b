"""Where the shard job runs: a private Ray on this machine, or an existing cluster it joins.

- No address (and no RAY_ADDRESS in the environment), or `local`: start a new Ray on this machine for this job, on
  127.0.0.1 only, with its own temp dir and random ports, and stop it when the job ends. It never attaches to another
  Ray that happens to run here (unlike `ray.init()`'s auto-detection).
- An address (`--ray-address`, or RAY_ADDRESS as `ray submit` sessions on our cluster configs set it): join that
  cluster. A loopback address keeps this driver on 127.0.0.1 as well.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Callable

LOOPBACK = "127.0.0.1"


def resolve_address(address: str | None) -> str | None:
    """The cluster to join, or None for a private local Ray."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    return None if address in (None, "local") else address


@dataclasses.dataclass
class Connection:
    """This process's connection to Ray."""

    cluster: str
    """`local` (a private Ray started for this job) or the GCS address of the cluster joined."""
    close: Callable[[], None]
    """Disconnect (and stop a private Ray, deleting its temp dir)."""


def connect(address: str | None, num_cpus: int | None = None, object_store_mb: int | None = None) -> Connection:
    """Start or join Ray.

    The environment variables set here for Ray are restored by `Connection.close`. A process already connected to
    Ray (a test session, a notebook) keeps its connection: the job runs there and leaves it open.
    """
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return Connection(sys.modules["ray"].get_runtime_context().gcs_address, lambda: None)
    target = resolve_address(address)
    loopback = target is None or target.split("://")[-1].rsplit(":", 1)[0] in (LOOPBACK, "localhost")
    saved = {k: os.environ.get(k) for k in _ENV}
    if loopback:
        # Without this Ray replaces 127.0.0.1 by the machine's address and binds its services to every interface
        # (measured on Ray 2.60, see the platform notes). Ray reads it when imported, hence before `import ray`.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if target is None and "RAY_AUTH_TOKEN" not in os.environ and "RAY_AUTH_TOKEN_PATH" not in os.environ:
        # A token of this job's own, handed to the Ray processes through their environment: Ray would otherwise
        # create and reuse ~/.ray/auth_token, a file shared with every other Ray user of this account.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        os.environ["RAY_AUTH_TOKEN"] = _PROCESS_TOKEN
    import ray
    from ray._private import ray_constants
    from ray._raylet import AuthenticationTokenLoader, Config

    if loopback:
        ray_constants.ENABLE_RAY_CLUSTER = False  # in case Ray was imported before the line above
    # Ray read its configuration when imported and caches the token it loaded: re-read both after the lines above
    # (Ray does the same when it creates a token itself).
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
    temp_dir = None

    def stop() -> None:
        if target is None:
            _stop_autoscaler_monitor()
        ray.shutdown()
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    try:
        if target is None:
            # Short path: Ray's unix sockets live under it and must stay within 107 bytes.
            temp_dir = tempfile.mkdtemp(prefix="relret-ray-", dir="/tmp" if os.path.isdir("/tmp") else None)
            ray.init(
                address="local",
                num_cpus=num_cpus,
                object_store_memory=object_store_mb * 2**20 if object_store_mb else None,
                include_dashboard=False,
                _node_ip_address=LOOPBACK,
                _temp_dir=temp_dir,
            )
        else:
            ray.init(address=target, _node_ip_address=LOOPBACK if loopback else None)
    except BaseException:
        stop()
        raise
    return Connection("local" if target is None else ray.get_runtime_context().gcs_address, stop)


def _stop_autoscaler_monitor() -> None:
    """Stop the autoscaler monitor of the private Ray this process started, ahead of `ray.shutdown`.

    `ray.shutdown` stops the GCS before the monitor; the monitor's SIGTERM handler then tries to report its end to the
    GCS that is gone, and Ray waits one second before it sends SIGKILL (Ray 2.60: 1.0 of the 1.4 s `ray.shutdown`
    took at the end of every job). The monitor holds nothing of the job, so it is killed outright (by its PID).
    """
    from ray._private import ray_constants, worker

    node = worker._global_node
    for info in node.all_processes.get(ray_constants.PROCESS_TYPE_MONITOR, []) if node is not None else []:
        if info.process.poll() is None:
            info.process.kill()
            info.process.wait(timeout=10)


_PROCESS_TOKEN = secrets.token_hex(32)
_ENV = ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")


def cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def cluster_cpus() -> int:
    import ray

    return int(ray.cluster_resources().get("CPU", 1))
