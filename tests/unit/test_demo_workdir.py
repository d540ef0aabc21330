"""`mor demo` on the command line: `--workdir` replaces its own earlier run and never a directory it did
not make; `--no-progress` hides every bar."""

from __future__ import annotations

from pathlib import Path

from mor_cli.demo import DEMO_MARKER, claim_workdir, main


def test_a_directory_the_demo_did_not_make_is_left_alone(tmp_path: Path, capsys) -> None:
    precious = tmp_path / "thesis"
    precious.mkdir()
    (precious / "chapter1.tex").write_text("years of work", encoding="utf-8")
    assert main(["run", "--workdir", str(precious), "--no-progress"]) == 1
    assert "no demo run made it" in capsys.readouterr().err
    assert (precious / "chapter1.tex").read_text(encoding="utf-8") == "years of work"
    assert sorted(p.name for p in precious.iterdir()) == ["chapter1.tex"]
    (tmp_path / "a-file").write_text("x", encoding="utf-8")
    assert main(["run", "--workdir", str(tmp_path / "a-file"), "--no-progress"]) == 1
    assert "is a file, not a directory" in capsys.readouterr().err


def test_an_earlier_run_is_replaced_and_a_new_or_empty_directory_is_claimed(tmp_path: Path) -> None:
    earlier = tmp_path / "demo"
    claim_workdir(earlier)  # new
    (earlier / "stale_ledger.json").write_text("{}", encoding="utf-8")
    claim_workdir(earlier)  # made by a run: replaced
    assert sorted(p.name for p in earlier.iterdir()) == [DEMO_MARKER]
    empty = tmp_path / "empty"
    empty.mkdir()
    claim_workdir(empty)
    assert (empty / DEMO_MARKER).is_file()


def test_without_progress_bars_the_table_hides_transformers_checkpoint_bars_too(tmp_path: Path,
                                                                                  monkeypatch) -> None:
    """`mor demo table --no-progress` (or with no terminal): no "Loading weights" bar for every checkpoint load."""
    import mor_cli.table
    from transformers.utils import logging as hf_logging

    seen: list[tuple[bool, bool]] = []

    def run_table(workdir, *, results_dir, results_md, progress):
        seen.append((progress, hf_logging.is_progress_bar_enabled()))
        return 0

    monkeypatch.setattr(mor_cli.table, "run_table", run_table)  # the table itself is an hour's work
    try:
        hf_logging.enable_progress_bar()
        assert main(["table", "--workdir", str(tmp_path), "--no-progress"]) == 0
    finally:
        hf_logging.enable_progress_bar()
    assert seen == [(False, False)]
