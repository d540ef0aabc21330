"""The cost of secure aggregation: fused scores per second, secure vs clear, over the same served silos.

Three `mor silo serve` processes (untrained small_cnn models, one torch
thread each, kits from `mor pki init` with the secure-aggregation material)
and the same batch-64 round of distinct easy-VQA rows, fused by
`ClearFusion` (each silo's weighted terms in the clear) and by
`SecureFusion` (masked, BFV-encrypted terms, summed under encryption,
blinded, decrypted by one participant), alternating round by round. Prints
both and the ratio. The GRPO step on the secure path against in process is
`benchmarks/grpo_step.py --network` (it needs the demo's artefacts).

    .venv/bin/python benchmarks/secagg.py [--rounds 30]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transport import bench_consortium, bench_silo

from coordinator.decrypted_rows import DecryptedRows
from coordinator.fusion import ClearFusion, FusionItems
from coordinator.network_client import NetworkSiloClient
from coordinator.secure_fusion import SecureFusion
from mor_cli.pki_cli import init_pki
from mor_cli.silo_processes import SiloProcesses
from mor_secure.data import load_consortium, make_splits
from mor_secure.pki.kits import CertKit
from mor_secure.secagg.provisioning import coordinator_context

SILOS, BATCH = 3, 64


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds per path")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        consortium = bench_consortium(root, SILOS)
        init_pki(consortium, root / "pki", days=1)
        names = [f"silo-{i}" for i in range(SILOS)]
        configs = {name: bench_silo(root, consortium, name) for name in names}
        kit = CertKit.load(root / "pki" / "kits" / "coordinator-coordinator")
        records = list(make_splits(load_consortium(consortium)).calibration)[:BATCH]
        items = FusionItems(images=tuple(r.image_path for r in records), prompts=tuple(r.question for r in records),
                            responses=tuple(r.answer for r in records))
        weights = torch.softmax(torch.randn(BATCH, SILOS, generator=torch.Generator().manual_seed(0)), dim=1)
        print(f"starting {SILOS} silos (`mor silo serve`, one torch thread each)...", flush=True)
        with SiloProcesses(configs, probe_kit=kit, workdir=root / "serving") as served:
            clients = [NetworkSiloClient(n, served.silos[n].address, kit) for n in names]
            fusions = {"clear": ClearFusion(clients), "secure": SecureFusion(clients, coordinator_context(kit))}
            fused = {label: fusion.fuse(items, weights) for label, fusion in fusions.items()}  # warm
            times: dict[str, list[float]] = {label: [] for label in fusions}
            for _ in range(args.rounds):
                for label, fusion in fusions.items():
                    if label == "secure":
                        # The same rows under the same weights are answered from the coordinator's record of
                        # decrypted rows without asking anyone; a fresh record makes each fuse a round again.
                        fusion.decrypted = DecryptedRows(fusion.silo_names)
                    started = time.perf_counter()
                    fusion.fuse(items, weights)
                    times[label].append(time.perf_counter() - started)
            for client in clients:
                client.close()
        clear, secure = (statistics.median(times[label]) for label in ("clear", "secure"))
        print(f"\nround of {BATCH} rows over {SILOS} silos, median of {args.rounds}")
        print(f"  clear:  {clear * 1e3:7.1f} ms  ({BATCH / clear:7.0f} fused scores/s)")
        print(f"  secure: {secure * 1e3:7.1f} ms  ({BATCH / secure:7.0f} fused scores/s)")
        print(f"  secure / clear round time {secure / clear:.2f}x; largest difference of the fused rewards "
              f"{(fused['secure'] - fused['clear']).abs().max().item():.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
