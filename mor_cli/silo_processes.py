"""Silos as separate `mor silo serve` processes on 127.0.0.1, for the demo, the tests and the benchmarks.

`SiloProcesses` starts one process per silo YAML (each with its own kit and
policy from its `serve:` section, one torch thread so several fit on a small
machine), learns each port from the process itself (`--port-file`: the OS
chooses ports, none is fixed), waits until each answers health SERVING over
mTLS, and on exit, also when the caller failed, stops them with SIGTERM
(SIGKILL after a grace period). Each silo's output goes to <workdir>/<silo>.serve.log.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mor_secure.pki.identity import PartyIdentity, Role
from mor_secure.pki.kits import CertKit
from mor_secure.transport.authorization import AuditSink
from mor_secure.transport.channel import secure_channel

# Loading a LoRA silo's backbone and reference caches takes ~20 s on 2 cores; 300 s is far beyond that.
STARTUP_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 60.0


@dataclass
class ServedSilo:
    """One running `mor silo serve` process."""

    name: str
    config: Path
    process: subprocess.Popen
    port_file: Path
    log: Path
    port: int | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def silo_command(config: Path, port_file: Path, *, port: int | None = None) -> list[str]:
    command = [sys.executable, "-m", "mor_cli", "silo", "serve", "--config", str(config), "--port-file", str(port_file)]
    return command + (["--port", str(port)] if port is not None else [])


def is_serving(address: str, kit: CertKit, *, silo: str, audit: AuditSink | None = None) -> bool:
    """Whether silo `silo` at `address` answers health SERVING to `kit`'s holder (the call recorded in `audit`)."""
    with secure_channel(address, kit, expect=PartyIdentity(Role.SILO, silo), audit=audit) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


class SiloProcesses:
    """A context manager running one `mor silo serve` per config; `silos[name].address` once started."""

    def __init__(self, configs: dict[str, Path], *, probe_kit: CertKit, workdir: Path,
                 probe_audit: AuditSink | None = None) -> None:
        self.configs = dict(configs)
        self.probe_kit = probe_kit
        self.probe_audit = probe_audit  # the prober's own log: its health checks are calls like any other
        self.workdir = Path(workdir)
        self.silos: dict[str, ServedSilo] = {}
        self.exit_codes: dict[str, int] = {}

    def start(self, name: str, *, port: int | None = None) -> ServedSilo:
        """Start (or restart, e.g. on its old `port`) one silo and wait until it is SERVING."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        port_file = self.workdir / f"{name}.port.json"
        port_file.unlink(missing_ok=True)
        log = self.workdir / f"{name}.serve.log"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        with log.open("a", encoding="utf-8") as handle:
            process = subprocess.Popen(silo_command(self.configs[name], port_file, port=port), env=env,
                                       stdout=handle, stderr=subprocess.STDOUT)
        silo = ServedSilo(name=name, config=self.configs[name], process=process, port_file=port_file, log=log)
        self.silos[name] = silo
        self._wait_serving(silo)
        return silo

    def _wait_serving(self, silo: ServedSilo) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if silo.process.poll() is not None:
                tail = silo.log.read_text(encoding="utf-8", errors="replace")[-2000:]
                raise RuntimeError(f"silo {silo.name} exited with {silo.process.returncode} while starting; "
                                   f"end of {silo.log}:\n{tail}")
            if silo.port is None and silo.port_file.is_file():
                silo.port = json.loads(silo.port_file.read_text(encoding="utf-8"))["port"]
            if silo.port is not None and is_serving(silo.address, self.probe_kit, silo=silo.name,
                                                    audit=self.probe_audit):
                return
            time.sleep(0.25)
        raise TimeoutError(f"silo {silo.name} was not SERVING after {STARTUP_TIMEOUT_S:.0f} s; see {silo.log}")

    def kill(self, name: str) -> None:
        """SIGKILL one silo (fault drills): no drain, no goodbye."""
        silo = self.silos[name]
        silo.process.kill()
        silo.process.wait(timeout=STOP_TIMEOUT_S)

    def stop(self, name: str) -> int:
        """SIGTERM one silo and wait for it to drain; SIGKILL it if it does not exit in time."""
        silo = self.silos[name]
        if silo.process.poll() is None:
            silo.process.send_signal(signal.SIGTERM)
            try:
                silo.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                silo.process.kill()
                silo.process.wait(timeout=STOP_TIMEOUT_S)
        return silo.process.returncode

    def __enter__(self) -> SiloProcesses:
        try:
            for name in self.configs:
                self.start(name)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        for name in list(self.silos):
            self.exit_codes[name] = self.stop(name)
