"""The cost of the record: durable audit entries per second, and the audit's share of a Score call.

1. Entries per second: `AuditLog.record` (SQLite WAL, synchronous FULL: each
   entry is on disk before it returns) as a silo writes it (a signed
   checkpoint in the same transaction as every entry, since each answer
   carries one) and as the coordinator writes it (a checkpoint every 256
   entries).
2. Overhead on a Score call at batch 64: two servers in this process over
   the same saved reward model, one with the silo's audit log and a client
   writing the coordinator's, one with neither; requests alternate between
   them in blocks, so machine load hits both alike. Target: audited /
   unaudited <= 1.10.

The model is an untrained small_cnn reward model, the cheapest real
architecture, so the audit's share is the largest it gets.

    .venv/bin/python benchmarks/audit.py [--entries 2000] [--repeats 30]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transport import bench_consortium

from coordinator.network_client import NetworkSiloClient
from coordinator.silo_requests import score_request
from mor_cli.pki_cli import init_pki
from mor_secure.audit import AuditLog
from mor_secure.data import load_consortium, make_splits
from mor_secure.models.reward_architectures import SmallCNNRewardModel
from mor_secure.pki.kits import CertKit
from mor_secure.policy import RateLimit, SiloAdmission, SiloPolicy
from mor_secure.transport.server import serve
from silo_agent.service import open_model_service
from silo_agent.servicer import ROLES_BY_RPC, servicer_registration

BATCH = 64
OVERHEAD_TARGET = 1.10


def entries_per_second(path: Path, kit: CertKit, count: int, **checkpoints) -> float:
    log = AuditLog.for_kit(path, kit, **checkpoints)
    event = {"event": "call", "side": "server", "rpc": "/mor_secure.proto.v1.SiloRewardService/Score",
             "caller": "mor://coordinator/coordinator", "request_digest": "0" * 64, "items": BATCH,
             "decision": "admitted", "status": "OK", "reason": "", "latency_ms": 12.5}
    started = time.perf_counter()
    for _ in range(count):
        log.record(event)
    elapsed = time.perf_counter() - started
    log.close()
    return count / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=2000, help="entries written per log style")
    parser.add_argument("--repeats", type=int, default=30, help="timed Score calls per block and path")
    parser.add_argument("--blocks", type=int, default=4, help="alternating blocks per path")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        consortium = bench_consortium(root, 1)
        init_pki(consortium, root / "pki", days=1)
        silo_kit = CertKit.load(root / "pki" / "kits" / "silo-silo-0")
        coordinator_kit = CertKit.load(root / "pki" / "kits" / "coordinator-coordinator")

        print("durable audit entries per second (each one fsynced before record() returns)")
        silo_rate = entries_per_second(root / "silo-style.db", silo_kit, args.entries, checkpoint_every_entries=1)
        coordinator_rate = entries_per_second(root / "coordinator-style.db", coordinator_kit, args.entries)
        print(f"  silo style (a signed checkpoint with every entry): {silo_rate:8.0f} entries/s")
        print(f"  coordinator style (a checkpoint every 256):        {coordinator_rate:8.0f} entries/s")

        SmallCNNRewardModel(seed=0).save(root / "model")
        policy = SiloPolicy(rate_limit=RateLimit(per_second=1e6, burst=1_000_000))
        silo_log = AuditLog.for_kit(root / "silo.db", silo_kit, checkpoint_every_entries=1)
        coordinator_log = AuditLog.for_kit(root / "coordinator.db", coordinator_kit)
        servers, clients = {}, {}
        for label, audit in (("audited", silo_log), ("unaudited", None)):
            servers[label] = serve(kit=silo_kit, crl_path=silo_kit.crl_path, roles_by_rpc=ROLES_BY_RPC,
                                   services=[servicer_registration(open_model_service("silo-0", root / "model"))],
                                   admission=SiloAdmission(policy), audit=audit)
            servers[label].set_serving(True)
            clients[label] = NetworkSiloClient("silo-0", f"127.0.0.1:{servers[label].port}", coordinator_kit,
                                               audit=coordinator_log if audit is not None else None)
        try:
            records = list(make_splits(load_consortium(consortium)).calibration)[:BATCH]
            request = score_request([r.image_path for r in records], [r.question for r in records],
                                    [r.answer for r in records], objective="correct")
            times: dict[str, list[float]] = {label: [] for label in clients}
            for client in clients.values():
                client.score(request)  # warm: connection up, first-call costs paid
            for _ in range(args.blocks):
                for label, client in clients.items():
                    for _ in range(args.repeats):
                        started = time.perf_counter()
                        client.score(request)
                        times[label].append(time.perf_counter() - started)
        finally:
            for label in clients:
                clients[label].close()
                servers[label].stop(0)
            silo_log.close()
            coordinator_log.close()
        audited, plain = (statistics.median(times[label]) for label in ("audited", "unaudited"))
        ratio = audited / plain
        print(f"\nScore call, batch {BATCH}, median of {args.blocks * args.repeats} per path")
        print(f"  with both parties' audit logs: {audited * 1e3:7.1f} ms")
        print(f"  without:                       {plain * 1e3:7.1f} ms")
        verdict = "met" if ratio <= OVERHEAD_TARGET else "MISSED"
        print(f"  ratio {ratio:.3f} (target <= {OVERHEAD_TARGET:.2f}: {verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
