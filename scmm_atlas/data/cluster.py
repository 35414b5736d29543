"""Joining or starting Ray: one place for the local defaults that training and inference share."""

from __future__ import annotations

import logging
import os

DASHBOARD_ENV = "SCMM_ATLAS_RAY_DASHBOARD"


def ensure_ray(address: str | None, *, object_store_bytes: int = 1 << 30) -> None:
    """Join ``address``, or start a local Ray sized to this machine. A no-op when Ray is already up.

    Locally: a bounded object store; MALLOC_ARENA_MAX=2 in its workers (glibc's per-thread arenas
    cost ~300 MB per threaded loader process otherwise); workers log warnings and errors only; no
    dashboard, unless ``SCMM_ATLAS_RAY_DASHBOARD=1``, and then it (with its job server) listens on
    127.0.0.1 only. Ray's token authentication (on by default since Ray 2.5x) guards its internal
    ports."""
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(address="local", num_cpus=os.cpu_count(), object_store_memory=object_store_bytes,
                 include_dashboard=os.environ.get(DASHBOARD_ENV) == "1", dashboard_host="127.0.0.1",
                 runtime_env={"env_vars": {"MALLOC_ARENA_MAX": "2"}}, configure_logging=False,
                 logging_config=ray.LoggingConfig(log_level="WARNING"))
    import ray.data  # its driver-side INFO lines (execution plans) are noise next to our progress bars

    if not logging.getLogger().isEnabledFor(logging.INFO):
        logging.getLogger("ray.data").setLevel(logging.WARNING)
