"""The collectives' interface follows the host's Ray address (gloo and NCCL otherwise resolve the host name,
which stock images map to loopback)."""

from __future__ import annotations

import pytest

from scmm_atlas.netif import SOCKET_VARS, interface_of, use_node_interface


def test_the_interface_of_an_address_is_the_one_that_holds_it() -> None:
    assert interface_of("127.0.0.1") == "lo"
    assert interface_of("192.0.2.77") is None  # TEST-NET-1: on no interface


def test_unset_variables_follow_the_address_and_a_users_setting_wins(monkeypatch) -> None:
    for var in SOCKET_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "ib0")
    assert use_node_interface("127.0.0.1") == {"GLOO_SOCKET_IFNAME": "lo"}
    import os

    assert os.environ["GLOO_SOCKET_IFNAME"] == "lo" and os.environ["NCCL_SOCKET_IFNAME"] == "ib0"


def test_an_address_on_no_interface_changes_nothing(monkeypatch, caplog) -> None:
    for var in SOCKET_VARS:
        monkeypatch.delenv(var, raising=False)
    assert use_node_interface("192.0.2.77") == {}
    assert "no interface holds" in caplog.text


@pytest.mark.parametrize("address", ["::1"])
def test_ipv6_addresses_are_found_too(address: str) -> None:
    assert interface_of(address) in ("lo", None)  # ::1 exists where the kernel has IPv6
