"""Two real `mor silo train` processes against one ledger, and a training process killed mid-run.

The guarantee under test: a second training on the workdir is refused before it
reserves budget or reads any private pair, and a run that dies
keeps its reservation charged.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from silo_agent.training import load_silo_config, open_ledger

from test_silo_job import SILO_YAML

TIMEOUT_S = 240
# Logged by `train_silo` right after it has read the silo's pairs.
READ_DATA_LOG = "training pairs"


def silo_command(*args: str) -> list[str]:
    return [sys.executable, "-c", "from mor_cli.main import entry_point; entry_point()", "silo", *args]


@pytest.fixture
def silo_config(tmp_path: Path, consortium_path: Path) -> Path:
    shutil.copy(consortium_path, tmp_path / "consortium.yaml")
    config = tmp_path / "hospital-a.yaml"
    config.write_text(SILO_YAML, encoding="utf-8")
    subprocess.run(silo_command("init", "--config", str(config)), check=True, capture_output=True, timeout=TIMEOUT_S)
    return config


def test_two_concurrent_trainings_with_budget_for_one(silo_config: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    processes = [subprocess.Popen(silo_command("train", "--config", str(silo_config), "--no-progress"),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for _ in range(2)]
    try:
        outputs = [p.communicate(timeout=TIMEOUT_S) for p in processes]
    finally:
        for p in processes:
            p.kill()
            p.wait()
    codes = sorted(p.returncode for p in processes)
    assert codes == [0, 1], outputs
    refused_err = next(err for p, (_, err) in zip(processes, outputs) if p.returncode == 1)
    # Whichever guard stops the second run (the workdir's training lock while the first holds it, else the
    # budget), it is stopped before it reserves or reads anything: the ledger keeps the first run's one charge.
    assert "another `mor silo train` or `mor silo init` is running on this workdir" in refused_err \
        or "privacy budget exceeded" in refused_err, refused_err
    assert READ_DATA_LOG not in refused_err  # refused before reading any private pair
    (charge,) = open_ledger(load_silo_config(silo_config)).charges
    assert charge.settled and charge.epsilon <= 8.0


def test_killed_training_keeps_its_reservation_charged(silo_config: Path) -> None:
    config = load_silo_config(silo_config)
    process = subprocess.Popen(silo_command("train", "--config", str(silo_config), "--no-progress"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not open_ledger(config).open_reservations:
            assert process.poll() is None, "training ended before it could be killed"
            assert time.monotonic() < deadline, "no reservation appeared"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        process.kill()
        process.wait()
    ledger = open_ledger(config)
    assert len(ledger.open_reservations) == 1
    assert ledger.spent_epsilon == 8.0 and ledger.remaining_epsilon == pytest.approx(2.0)
    retry = subprocess.run(silo_command("train", "--config", str(silo_config), "--no-progress"),
                           capture_output=True, text=True, timeout=TIMEOUT_S)
    assert retry.returncode == 1 and "privacy budget exceeded" in retry.stderr
