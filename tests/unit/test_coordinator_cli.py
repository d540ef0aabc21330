"""`mor coordinator evaluate-policy`: scores the dev split unless asked for test, and says which it read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coordinator.cli import main
from mor_secure.data import load_consortium, make_splits

# Tiny held-out splits, so greedy decoding of every question takes a moment.
CONSORTIUM_YAML = """\
seed: 0
splits: {sft_images: 60, calibration_images: 20, dev_images: 3, test_images: 2}
silos:
  - {name: hospital-a, image_share: 0.05, reliable_kinds: [shape], label_flip_rate: 0.4}
"""


@pytest.mark.parametrize(("flags", "split"), [((), "dev"), (("--split", "test"), "test"), (("--split", "dev"), "dev")])
def test_evaluate_policy_defaults_to_dev_and_prints_the_split(tmp_path: Path, tiny_vlm_dir: Path, capsys,
                                                              flags: tuple[str, ...], split: str) -> None:
    consortium = tmp_path / "consortium.yaml"
    consortium.write_text(CONSORTIUM_YAML, encoding="utf-8")
    records = make_splits(load_consortium(consortium)).records(split)

    assert main(["evaluate-policy", "--consortium", str(consortium), "--model", str(tiny_vlm_dir), *flags]) == 0
    header, _, table = capsys.readouterr().out.partition("\n")
    assert header == f"split {split}: {len(records)} questions (greedy exact match)"
    assert set(json.loads(table)) >= {"overall"}


def test_evaluate_policy_rejects_other_splits(tmp_path: Path, capsys) -> None:
    code = main(["evaluate-policy", "--consortium", "c.yaml", "--model", "m", "--split", "calibration"])
    assert code == 2 and "invalid choice: 'calibration'" in capsys.readouterr().err


def test_a_round_with_too_few_silos_ends_in_one_line_not_a_traceback(tmp_path: Path, capsys) -> None:
    """`align` / `evaluate` with silos down: the round fails (RoundFailedError), which the user fixes, not a bug."""
    import argparse

    import torch
    from silo_fakes import RightAnswerModel, png

    from coordinator.fusion import ClearFusion, FusionItems
    from mor_secure.cli_errors import EXIT_USER_ERROR, run_command
    from mor_secure.wire import ErrorCode, SiloError
    from silo_agent.in_process import InProcessSiloClient
    from silo_agent.service import SiloService

    class Down(InProcessSiloClient):
        def score(self, request):
            raise SiloError(ErrorCode.UNAVAILABLE, f"silo {self.name!r}: connection refused")

    image = tmp_path / "a.png"
    image.write_bytes(png())
    silos = [InProcessSiloClient(SiloService("a", RightAnswerModel())), Down(SiloService("b", RightAnswerModel()))]

    def align(args) -> int:
        items = FusionItems(images=(image,), prompts=("q",), responses=("right",))
        ClearFusion(silos, minimum_participants=2).fuse(items, torch.full((1, 2), 0.5))
        return 0

    parser = argparse.ArgumentParser(prog="mor coordinator")
    parser.add_subparsers(dest="command").add_parser("align")
    assert run_command(parser, ["align"], {"align": align}) == EXIT_USER_ERROR
    assert capsys.readouterr().err == ("mor coordinator: error: only 1 of 2 silos answered, fewer than the "
                                       "consortium's minimum of 2: UNAVAILABLE: silo 'b': connection refused\n")
