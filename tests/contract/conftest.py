"""The shared `SiloClient` suite runs against every client (as Flower runs one suite per interface).

`connect(service)` gives a client reaching `service` through one transport;
each test in this directory runs once per transport in `CLIENT_KINDS`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from mor_secure.wire.client import SiloClient
from silo_agent.in_process import InProcessSiloClient
from silo_agent.service import SiloService

CLIENT_KINDS = ("in_process",)


@pytest.fixture(params=CLIENT_KINDS)
def connect(request: pytest.FixtureRequest) -> Iterator[Callable[[SiloService], SiloClient]]:
    """A function from a silo service to a client of it, over the transport of this parameter."""
    yield InProcessSiloClient
