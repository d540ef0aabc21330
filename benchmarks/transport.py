"""The cost of the network: scores/s over mTLS gRPC vs in-process, and round latency vs number of silos.

Both measurements run in one process against the same kind of model, so
machine load hits both sides alike, and print ratios:

1. Throughput: one silo (`mor silo serve`, its own process) and the same
   saved model behind the in-process client; Score requests of batch 1 to
   256 rows (distinct easy-VQA images, warmed first), alternating in blocks.
   Target: network / in-process >= 0.8 at batch >= 64.
2. Round latency: a `ClearFusion` round (parallel fan-out) over 1, 2, 4 and 8
   served silos, batch 64. Target: 8 silos <= 1.5x the latency of 1. On a
   machine with fewer cores than silos the silos' scoring competes for CPU
   (in a consortium each silo has its own machine), so the same fan-out is
   also timed with `Describe`, which does no model work: that isolates what
   the transport and the fan-out themselves cost.

The silos' models are untrained small_cnn reward models: the cheapest real
architecture, so the transport's share of the cost is the largest it gets.
Silos run with one torch thread each.

    .venv/bin/python benchmarks/transport.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from coordinator.fusion import ClearFusion, FusionItems
from coordinator.network_client import NetworkSiloClient
from coordinator.silo_requests import score_request
from mor_cli.pki_cli import init_pki
from mor_cli.silo_processes import SiloProcesses
from mor_secure.data import load_consortium, make_splits
from mor_secure.models.reward_architectures import SmallCNNRewardModel
from mor_secure.pki.kits import CertKit
from silo_agent.in_process import in_process_client
from silo_agent.training import MODEL_DIR, create_ledger, load_silo_config

BATCHES = (1, 4, 16, 64, 128, 256)
SILO_COUNTS = (1, 2, 4, 8)
THROUGHPUT_TARGET, LATENCY_TARGET = 0.8, 1.5


def bench_consortium(root: Path, silos: int) -> Path:
    """A consortium file for benchmarks: `silos` small silos over easy-VQA (shared with benchmarks/audit.py)."""
    lines = ["seed: 0", "splits: {sft_images: 400, calibration_images: 300, dev_images: 100, test_images: 100}",
             "silos:"]
    lines += [f"  - {{name: silo-{i}, image_share: 0.05, reliable_kinds: [shape], label_flip_rate: 0.5}}" for i in range(silos)]
    path = root / "consortium.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def bench_silo(root: Path, consortium: Path, name: str) -> Path:
    """A small_cnn silo config under `root` serving with a permissive policy (shared with benchmarks/secagg.py)."""
    path = root / "silos" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    (root / "policy.yaml").write_text("rate_limit: {per_second: 100000, burst: 100000}\nmax_concurrent_requests: 16\n",
                                      encoding="utf-8")
    path.write_text(f"name: {name}\nconsortium: {consortium}\nworkdir: {name}\narchitecture: small_cnn\n"
                    f"serve: {{kit: ../pki/kits/silo-{name}, crl: ../pki/ca/crl.pem, policy: ../policy.yaml, port: 0}}\n",
                    encoding="utf-8")
    config = load_silo_config(path)
    create_ledger(config)
    SmallCNNRewardModel(seed=0).save(config.workdir / MODEL_DIR)
    return path


def _median_seconds(call, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed requests per (batch, path) block")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # like the silos: the comparison is per request, not per core
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        consortium = bench_consortium(root, max(SILO_COUNTS))
        init_pki(consortium, root / "pki", days=1)
        records = list(make_splits(load_consortium(consortium)).calibration)[: max(BATCHES)]
        names = [f"silo-{i}" for i in range(max(SILO_COUNTS))]
        configs = {name: bench_silo(root, consortium, name) for name in names}
        coordinator_kit = CertKit.load(root / "pki" / "kits" / "coordinator-coordinator")
        print(f"starting {len(names)} silos (`mor silo serve`, one torch thread each)...", flush=True)
        with SiloProcesses(configs, probe_kit=coordinator_kit, workdir=root / "serving") as served:
            clients = [NetworkSiloClient(n, served.silos[n].address, coordinator_kit) for n in names]
            local = in_process_client("silo-0", load_silo_config(configs["silo-0"]).workdir / MODEL_DIR)

            print("\nthroughput, one silo: scores/s (median of requests), network / in-process")
            ratios = {}
            for batch in BATCHES:
                part = records[:batch]
                request = score_request([r.image_path for r in part], [r.question for r in part],
                                        [r.answer for r in part], objective="correct")
                for client in (clients[0], local):
                    client.score(request)  # warm: features computed, connection up
                network = _median_seconds(lambda: clients[0].score(request), args.repeats)
                here = _median_seconds(lambda: local.score(request), args.repeats)
                ratios[batch] = here / network
                print(f"  batch {batch:>3}: network {batch / network:>8.0f}/s  in-process {batch / here:>8.0f}/s"
                      f"  ratio {ratios[batch]:.2f}")
            worst = min(ratios[b] for b in BATCHES if b >= 64)
            print(f"  worst ratio at batch >= 64: {worst:.2f} (target >= {THROUGHPUT_TARGET}: "
                  f"{'met' if worst >= THROUGHPUT_TARGET else 'MISSED'})")

            print("\nround latency, batch 64, parallel fan-out (ClearFusion)")
            part = records[:64]
            items = FusionItems(images=tuple(r.image_path for r in part), prompts=tuple(r.question for r in part),
                                responses=tuple(r.answer for r in part))
            latency = {}
            for count in SILO_COUNTS:
                fusion = ClearFusion(clients[:count])
                weights = torch.full((64, count), 1.0 / count)
                fusion.fuse(items, weights)
                latency[count] = _median_seconds(lambda: fusion.fuse(items, weights), args.repeats)
                print(f"  {count} silo(s): {latency[count] * 1e3:7.1f} ms  ({latency[count] / latency[1]:.2f}x of 1)")
            scaling = latency[max(SILO_COUNTS)] / latency[1]
            print(f"  {max(SILO_COUNTS)} silos / 1 silo: {scaling:.2f}x (target <= {LATENCY_TARGET}: "
                  f"{'met' if scaling <= LATENCY_TARGET else 'MISSED'}; the silos share this machine's cores)")

            print("\nround latency without model work (Describe to every silo in parallel)")
            described = {}
            with ThreadPoolExecutor(max_workers=max(SILO_COUNTS)) as pool:
                for count in SILO_COUNTS:
                    def round_trip(count: int = count) -> None:
                        list(pool.map(lambda client: client.describe(), clients[:count]))
                    round_trip()
                    described[count] = _median_seconds(round_trip, args.repeats)
                    print(f"  {count} silo(s): {described[count] * 1e3:7.1f} ms  "
                          f"({described[count] / described[1]:.2f}x of 1)")
            for client in clients:
                client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
