"""Joining or starting Ray: one place for the local defaults that training and inference share."""

from __future__ import annotations

import os


def ensure_ray(address: str | None, *, object_store_bytes: int = 1 << 30) -> None:
    """Join ``address``, or start a local Ray sized to this machine: dashboard off, a bounded object
    store, and MALLOC_ARENA_MAX=2 in its workers (glibc's per-thread arenas cost ~300 MB per
    threaded loader process otherwise). A no-op when Ray is already up."""
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(address="local", num_cpus=os.cpu_count(), object_store_memory=object_store_bytes,
                 include_dashboard=False, runtime_env={"env_vars": {"MALLOC_ARENA_MAX": "2"}}, configure_logging=False)
