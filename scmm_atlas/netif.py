"""Which network interface DDP's collectives use on a host: the one that holds the host's Ray address.

gloo (CPU) and NCCL's bootstrap pick an address by resolving the host's own name. On stock
Debian/Ubuntu images and in many containers that name resolves to loopback (``127.0.1.1`` in
``/etc/hosts``), so a multi-host process group binds and advertises 127.0.0.1 and fails to connect
(``Gloo connectFullMesh failed ... remote=[127.0.0.1]``). Ray already knows each node's routable
address (``--node-ip-address`` or its own discovery), so every worker process of our Ray jobs sets
``GLOO_SOCKET_IFNAME`` and ``NCCL_SOCKET_IFNAME`` to the interface that carries it when it starts,
before Ray Train creates a process group in it: :data:`SETUP_HOOK` is the job's
``worker_process_setup_hook`` (:func:`scmm_atlas.data.ray_session.ensure_ray`). A value the user set
is kept: it wins on hosts with several interfaces (e.g. a fast fabric for NCCL beside the management network Ray uses).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket

import psutil

log = logging.getLogger(__name__)
SOCKET_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
SETUP_HOOK = f"{__name__}.use_node_interface"  # Ray's worker_process_setup_hook for every worker of a job


def interface_of(address: str) -> str | None:
    """The name of the interface that holds ``address`` (IPv4 or IPv6), or None."""
    want = ipaddress.ip_address(address)
    for name, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            if a.family in (socket.AF_INET, socket.AF_INET6) and ipaddress.ip_address(a.address.split("%")[0]) == want:
                return name
    return None


def use_node_interface(address: str | None = None) -> dict[str, str]:
    """Set the collectives' interface variables that are unset to the interface of ``address`` (default:
    this Ray node's address); returns what was set. Runs in every training worker at start-up."""
    if address is None:
        import ray.util

        address = ray.util.get_node_ip_address()
    name = interface_of(address)
    if name is None:
        log.warning("no interface holds this node's address %s: gloo/NCCL pick their own (set %s)", address,
                    " and ".join(SOCKET_VARS))
        return {}
    chosen = {var: name for var in SOCKET_VARS if not os.environ.get(var)}
    os.environ.update(chosen)
    return chosen
