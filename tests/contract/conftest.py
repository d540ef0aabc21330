"""The shared `SiloClient` suite runs against every client (as Flower runs one suite per interface).

`connect(service)` gives a client reaching `service` through one transport;
each test in this directory runs once per transport in `CLIENT_KINDS`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from coordinator.network_client import NetworkSiloClient
from mor_secure.transport.server import serve
from mor_secure.wire.client import SiloClient
from silo_agent.in_process import InProcessSiloClient
from silo_agent.service import SiloService
from silo_agent.servicer import ROLES_BY_RPC, servicer_registration

CLIENT_KINDS = ("in_process", "grpc")


@pytest.fixture(params=CLIENT_KINDS)
def connect(request: pytest.FixtureRequest, pki) -> Iterator[Callable[[SiloService], SiloClient]]:
    """A function from a silo service to a client of it, over the transport of this parameter.

    grpc: the service behind `mor silo serve`'s servicer on 127.0.0.1 port 0,
    mTLS with kits from the project's PKI, reached by the coordinator's
    networked client; every server started is stopped afterwards.
    """
    if request.param == "in_process":
        yield InProcessSiloClient
        return
    started: list = []

    def over_grpc(service: SiloService) -> SiloClient:
        running = serve(kit=pki.kits["hospital-a"], crl_path=pki.crl, services=[servicer_registration(service)],
                        roles_by_rpc=ROLES_BY_RPC)
        running.set_serving(True)
        client = NetworkSiloClient(service.name, f"127.0.0.1:{running.port}", pki.kits["coordinator"], retries=0,
                                   deadline_s=30)
        started.append((running, client))
        return client

    yield over_grpc
    for running, client in started:
        client.close()
        running.stop(0)
