"""Joining or starting Ray: one place for the local defaults that training and inference share."""

from __future__ import annotations

import logging
import os

from ..netif import SETUP_HOOK
from ..settings import settings

TQDM_PATCH_ENV = "RAY_TQDM_PATCH_PRINT"
# Settings of a local Ray (a cluster keeps its own):
# - Ray starts its workers at nice 15 (``worker_niceness``) so that a cluster node's daemons stay
#   responsive. On one machine that puts the training workers below their own driver and anything
#   else running: on 2 cores a normal-priority process takes its CPU from training first. Locally
#   workers run at the driver's priority.
# - The raylet frees objects whose references are gone in batches, once a second by default: a
#   loader handing over 14 blocks a second kept ~300 MB of dead blocks in the object store (and so
#   in its processes' memory). Every 100 ms keeps that to a few blocks.
# - No metrics collection: nothing here reads Ray's Prometheus metrics, and the node's metrics agent
#   served them, unauthenticated, on all interfaces (README, "Network exposure").
LOCAL_SYSTEM_CONFIG = {"worker_niceness": 0, "free_objects_period_milliseconds": 100,
                       "enable_metrics_collection": False}


def ensure_ray(address: str | None, *, object_store_bytes: int = 1 << 30) -> None:
    """Join ``address`` (else ``RAY_ADDRESS``, as set under ``ray job submit``), or start a local Ray sized
    to this machine. A no-op when Ray is already up.

    Locally: workers at the driver's priority (:data:`LOCAL_SYSTEM_CONFIG`); a bounded object store;
    MALLOC_ARENA_MAX=2 in its workers (glibc's per-thread arenas cost ~300 MB per threaded loader
    process otherwise); workers log warnings and errors only (unless this process logs INFO, e.g.
    ``scmm-atlas -v``); the dashboard and its job server listen on 127.0.0.1 only (Ray Train's state
    API needs them; ``SCMM_ATLAS_RAY_DASHBOARD=0`` turns them off). Ray's token authentication (on
    by default since Ray 2.5x) guards its ports.
    """
    import ray

    # Ray's progress bars drawn in this process (Ray Data's, the epoch bar relayed from a worker) replace
    # builtins.print by their own unless told not to, and numba then cannot compile code that prints:
    # pynndescent (kBET, scanpy's neighbours) fails in a notebook that trained or inferred first
    os.environ.setdefault(TQDM_PATCH_ENV, "0")
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")  # a job's commands run on the job's cluster
    quiet = not logging.getLogger().isEnabledFor(logging.INFO)  # then workers' Ray Data logs warnings only too
    hook = {"worker_process_setup_hook": SETUP_HOOK}  # DDP's collectives on the interface of each host's address
    if address:
        ray.init(address=address, log_to_driver=True, runtime_env=hook)
    else:
        ray.init(address="local", num_cpus=os.cpu_count(), object_store_memory=object_store_bytes,
                 include_dashboard=settings().ray_dashboard, dashboard_host="127.0.0.1",
                 runtime_env={**hook, "env_vars": {"MALLOC_ARENA_MAX": "2",
                                                   **({"RAY_DATA_LOG_LEVEL": "WARNING"} if quiet else {})}},
                 configure_logging=False, logging_config=ray.LoggingConfig(log_level="WARNING" if quiet else "INFO"),
                 _system_config=LOCAL_SYSTEM_CONFIG)
