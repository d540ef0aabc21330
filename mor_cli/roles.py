"""Composing the two roles in one process: only here may coordinator and silo agent code meet.

The roles never import each other (DESIGN §3). A single-machine run (the
`mor` entry point with an in-process pool, the demo, `make results-table`,
the tests) still needs the coordinator to open silos in its own process; this
hands the coordinator's pool the silo agent's in-process opener.
"""

from __future__ import annotations


def allow_in_process_silos() -> None:
    """Let in-process pool entries run the silo agent's service object in this process."""
    from coordinator.pool import use_in_process_silos
    from silo_agent.in_process import in_process_client

    use_in_process_silos(in_process_client)
