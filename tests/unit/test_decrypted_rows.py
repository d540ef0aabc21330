"""The coordinator's record of decrypted rows: which sets of sums determine a silo's score, and the record's file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from coordinator.decrypted_rows import SAME_WEIGHTS, DecryptedRows, RevealingSumError, determined_silo

NAMES = ("a", "b", "c")


def test_sums_that_can_be_solved_for_one_silo_are_named_and_others_are_not() -> None:
    third, half = float(torch.tensor(1 / 3)), 0.5  # float32 weights, as a fusion sends them
    # Uniform over three, then over two after c dropped out: 3 * first - 2 * second is c's score.
    assert determined_silo([[third] * 3, [half, half, 0.0]], NAMES) == "c"
    # Two silos under two weightings: both solvable (the first named).
    assert determined_silo([[0.5, 0.5], [0.7, 0.3]], ("a", "b")) == "a"
    # Three generic weightings of three silos: all solvable.
    generic = torch.softmax(torch.randn(3, 3, generator=torch.Generator().manual_seed(0)), dim=1).tolist()
    assert determined_silo(generic, NAMES) == "a"
    # One sum, or two of three silos under uniform and a router's weights, determine nobody.
    assert determined_silo(generic[:1], NAMES) is None
    router = torch.softmax(torch.randn(200, 3, generator=torch.Generator().manual_seed(1)), dim=1).tolist()
    assert all(determined_silo([[third] * 3, w], NAMES) is None for w in router)
    # ... unless two of the router's weights are equal: mor - 3 w_a * uniform is then c's term alone.
    assert determined_silo([[third] * 3, [0.25, 0.25, 0.5]], NAMES) == "c"


def test_only_exact_solutions_are_refused_not_weights_a_few_bits_apart() -> None:
    """Exact arithmetic: equal weights are caught to the last bit; weights one float32 step apart are not (the
    approximate case, which docs/threat-model.md states)."""
    third = float(torch.tensor(1 / 3))
    quarter = float(torch.tensor(0.25))
    near = float(torch.nextafter(torch.tensor(0.25), torch.tensor(1.0)))
    assert determined_silo([[third] * 3, [quarter, quarter, 0.5]], NAMES) == "c"
    assert determined_silo([[third] * 3, [quarter, near, 0.5]], NAMES) is None


def _image(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_rows_are_the_same_for_the_same_image_bytes_prompt_response_and_objective(tmp_path: Path) -> None:
    one, copy, other = (_image(tmp_path, n, d) for n, d in (("1.png", b"x"), ("2.png", b"x"), ("3.png", b"y")))
    keys = DecryptedRows.row_keys("correct", [one, copy, other, one, one], ["q"] * 4 + ["p"], ["r"] * 5)
    assert keys[0] == keys[1] == keys[3] and len(set(keys)) == 3
    assert DecryptedRows.row_keys("safe", [one], ["q"], ["r"])[0] != keys[0]


def test_the_record_answers_repeats_and_refuses_a_revealing_sum_also_after_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "decrypted-rows.db"
    record = DecryptedRows(NAMES, path)
    uniform = {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}
    record.add(["row"], [uniform], [uniform], [0.25])
    record.close()
    again = DecryptedRows(list(reversed(NAMES)), path)  # another process, another column order
    assert again.known(["row", "other"], [uniform] * 2) == [0.25, None]
    # A router's weights for a row vary in their last bits with the batch: still the same weighting.
    jittered = {name: weight + 1e-7 for name, weight in uniform.items()}
    assert again.known(["row"], [jittered]) == [0.25]
    assert again.known(["row"], [{**uniform, "a": 1 / 3 + 2 * SAME_WEIGHTS}]) == [None]
    again.refuse_revealing(["row"], [{"a": 0.2, "b": 0.3, "c": 0.5}])  # two generic sums over three: allowed
    with pytest.raises(RevealingSumError, match="determine the score of silo 'c'"):
        again.refuse_revealing(["other", "row"], [uniform, {"a": 0.5, "b": 0.5}])  # c dropped out
    with pytest.raises(ValueError, match="not \\['a', 'b'\\]"):
        DecryptedRows(("a", "b"), path)
