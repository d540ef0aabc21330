"""The evaluation's runs become results.json, a Markdown table, training curves and the LOSO table.

Hand-made runs with known numbers: means and sample stds are checked exactly,
unfair comparisons (missing or duplicate seeds) are refused with a message
that names the culprit, and the ceilings are never bolded as "best".
"""

from __future__ import annotations

import dataclasses
import json
import statistics

import pytest

from coordinator.results_report import (
    RunResult,
    leave_one_silo_out_markdown,
    method_order,
    plot_training_curves,
    results_markdown,
    summarise,
    write_results_json,
)

KINDS = ("color", "shape", "yes_no")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(method: str, seed: int, overall: float, *, pairwise: float | None = None, steps: int = 0,
         offset: float = 0.0) -> RunResult:
    """A run whose per-kind accuracies are overall - 0.1, overall, overall + 0.1 (easy to check)."""
    accuracy = {"overall": overall, "color": overall - 0.1, "shape": overall, "yes_no": overall + 0.1}
    history = [{"step": s, "reward": offset + 0.1 * s + seed, "loss": 0.0} for s in range(1, steps + 1)]
    history += [{"step": s, "eval_accuracy/overall": overall - 0.01 * (steps - s)} for s in range(0, steps + 1, 2)]
    rpa = None if pairwise is None else {"overall": pairwise, "color": pairwise, "shape": pairwise}
    return RunResult(method, seed, accuracy, rpa, history if steps else [], seconds=10.0 + seed)


def _runs(steps: int = 0) -> list[RunResult]:
    """Three seeds of the usual methods; mor is best among private methods, the ceilings beat it."""
    values = {"reference": (0.50, 0.52, 0.54), "mor": (0.70, 0.72, 0.77), "uniform": (0.60, 0.62, 0.61),
              "single:hospital-a": (0.55, 0.56, 0.57), "centralized_rm": (0.80, 0.81, 0.82),
              "oracle": (0.90, 0.91, 0.92)}
    pairwise = {"mor": 0.9, "uniform": 0.8, "single:hospital-a": 0.7, "centralized_rm": 0.95}
    return [_run(m, seed, v, pairwise=pairwise.get(m), steps=steps if m != "reference" else 0, offset=i)
            for i, (m, vs) in enumerate(values.items()) for seed, v in zip((2, 0, 1), vs)]


def test_summary_has_the_required_shape_and_exact_numbers():
    summary = summarise(_runs(), KINDS)
    assert summary["seeds"] == [0, 1, 2]
    assert list(summary["methods"]) == ["reference", "mor", "uniform", "single:hospital-a", "centralized_rm", "oracle"]
    mor = summary["methods"]["mor"]
    assert mor["overall_mean"] == pytest.approx(statistics.fmean([0.70, 0.72, 0.77]))
    assert mor["overall_std"] == pytest.approx(statistics.stdev([0.70, 0.72, 0.77]))  # ddof=1
    assert set(mor["per_kind"]) == set(KINDS)
    assert mor["per_kind"]["color"]["mean"] == pytest.approx(statistics.fmean([0.60, 0.62, 0.67]))
    assert mor["per_kind"]["yes_no"]["std"] == pytest.approx(statistics.stdev([0.80, 0.82, 0.87]))
    assert mor["n_seeds"] == 3
    assert [p["seed"] for p in mor["per_seed"]] == [0, 1, 2]
    assert mor["per_seed"][0] == pytest.approx({"seed": 0, "overall": 0.72, "color": 0.62, "shape": 0.72,
                                                "yes_no": 0.82})
    assert mor["reward_pairwise_accuracy"]["overall"] == pytest.approx({"mean": 0.9, "std": 0.0})
    assert set(mor["reward_pairwise_accuracy"]) == {"overall", "color", "shape"}  # yes_no not reported
    assert "reward_pairwise_accuracy" not in summary["methods"]["reference"]


def test_one_seed_has_zero_std():
    summary = summarise([_run("mor", 0, 0.7)], KINDS)
    assert summary["methods"]["mor"]["overall_std"] == 0.0
    assert summary["methods"]["mor"]["per_kind"]["shape"] == {"mean": pytest.approx(0.7), "std": 0.0}


def test_methods_on_different_seeds_are_refused_naming_method_and_seed():
    runs = [r for r in _runs() if not (r.method == "uniform" and r.seed == 1)]
    with pytest.raises(ValueError, match=r"'uniform'.*seed\(s\) \[1\]"):
        summarise(runs, KINDS)


def test_duplicate_method_seed_is_refused():
    runs = _runs() + [_run("mor", 2, 0.99)]
    with pytest.raises(ValueError, match=r"duplicate.*'mor' seed 2"):
        summarise(runs, KINDS)


def test_missing_kind_and_overall_in_kinds_are_refused():
    with pytest.raises(ValueError, match="overall"):
        summarise(_runs(), ("overall", "color"))
    with pytest.raises(ValueError, match=r"'mor' seed 0.*\['size'\]"):
        summarise([_run("mor", 0, 0.7)], ("size",))


def test_method_order_is_canonical():
    assert method_order(["zeta", "oracle", "single:b", "fedavg_rm", "mor", "single:a", "reference",
                         "centralized_rm", "uniform"]) == [
        "reference", "mor", "uniform", "single:a", "single:b", "fedavg_rm", "centralized_rm", "oracle", "zeta"]


def test_results_json_round_trips_with_extras(tmp_path):
    summary = summarise(_runs(), KINDS)
    path = write_results_json(summary, tmp_path / "deep" / "results.json", extra={"settings": {"steps": 10}})
    text = path.read_text()
    assert text.endswith("}\n") and '\n  "seeds"' in text
    data = json.loads(text)
    assert data["settings"] == {"steps": 10}
    assert data["methods"]["mor"]["overall_mean"] == pytest.approx(summary["methods"]["mor"]["overall_mean"])
    with pytest.raises(ValueError, match="methods"):
        write_results_json(summary, tmp_path / "x.json", extra={"methods": {}})


def _row(table: str, method: str) -> list[str]:
    """Cells of the table row whose first cell starts with `method`."""
    line = next(ln for ln in table.splitlines() if ln.startswith(f"| {method} ") or ln.startswith(f"| {method}|"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_markdown_table_formats_bolds_best_private_method_and_marks_ceilings():
    summary = summarise(_runs(), KINDS)
    md = results_markdown(summary, kinds=KINDS, title="easy-VQA, 3 silos", notes=("Budget: 10 steps.",))
    assert md.startswith("## easy-VQA, 3 silos")
    assert "n = 3 seeds" in md and "Budget: 10 steps." in md
    for method in summary["methods"]:
        assert f"| {method}" in md
    mor = _row(md, "mor")
    assert mor[1] == f"**{statistics.fmean([0.70, 0.72, 0.77]):.3f} ± {statistics.stdev([0.70, 0.72, 0.77]):.3f}**"
    assert all(c.startswith("**") for c in mor[1:5])  # best in overall and every kind
    assert mor[5] == "0.900 ± 0.000"
    assert _row(md, "reference")[5] == "—"
    for ceiling in ("oracle", "centralized_rm"):
        cells = _row(md, ceiling)
        assert cells[0] == f"{ceiling} †"
        assert not any("**" in c for c in cells)  # higher than mor, yet never bolded
    assert "† Not a privacy-preserving method, excluded from the bolding: " in md
    assert "centralized_rm = reward model trained on all silos' pooled data (breaks privacy; a reference point, " \
        "not a bound" in md and "oracle = ground-truth reward (the ceiling of any reward)" in md
    assert "Upper bound" not in md  # the table it writes can show centralized_rm below MoR
    assert md.count("**") == 2 * 4  # one bold cell per accuracy column


def test_markdown_bolds_ties_on_the_printed_value():
    runs = [_run("mor", 0, 0.7001), _run("uniform", 0, 0.6999), _run("reference", 0, 0.5)]
    md = results_markdown(summarise(runs, KINDS), kinds=KINDS, title="t")
    assert _row(md, "mor")[1].startswith("**") and _row(md, "uniform")[1].startswith("**")


def test_one_seed_prints_no_spread_and_no_pairwise_column_without_pairwise_results():
    """A sample std of one seed is undefined: "± 0.000" claimed a spread of zero (the demo's table)."""
    runs = [_run("mor", 0, 0.7), _run("reference", 0, 0.5)]
    md = results_markdown(summarise(runs, KINDS), kinds=KINDS, title="t")
    assert "one seed (0), so no spread was measured" in md and "±" not in md
    assert "pairwise" not in md and _row(md, "mor")[1] == "**0.700**"
    assert len(_row(md, "mor")) == 1 + 1 + len(KINDS)  # method, overall, one per kind: no empty pairwise column


def test_markdown_refuses_kinds_the_summary_lacks():
    with pytest.raises(ValueError, match="size"):
        results_markdown(summarise(_runs(), KINDS), kinds=("size",), title="t")


def _assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1024


def test_training_curves_are_written_as_pngs(tmp_path):
    paths = plot_training_curves(_runs(steps=6), tmp_path / "plots" / "easyvqa")
    assert [p.name for p in paths] == ["easyvqa_reward.png", "easyvqa_accuracy.png"]
    for path in paths:
        _assert_png(path)


def test_training_curves_skip_missing_history_and_refuse_nothing(tmp_path):
    paths = plot_training_curves([_run("mor", 0, 0.7, steps=4), _run("uniform", 0, 0.6)], tmp_path / "one")
    assert len(paths) == 2
    _assert_png(paths[0])
    with pytest.raises(ValueError, match="log_history"):
        plot_training_curves([_run("mor", 0, 0.7)], tmp_path / "none")


LOSO = [
    {"held_out_silo": "hospital-a", "held_out_kind": "shape",
     "mean_weight": {"hospital-a": 0.30, "bank-b": 0.40, "hospital-c": 0.30}, "fused_pairwise_accuracy": 0.81,
     "full_router_mean_weight": {"hospital-a": 0.85, "bank-b": 0.10, "hospital-c": 0.05},
     "full_router_pairwise_accuracy": 0.95},
    {"held_out_silo": "bank-b", "held_out_kind": "color",
     "mean_weight": {"hospital-a": 0.20, "bank-b": 0.50, "hospital-c": 0.30}, "fused_pairwise_accuracy": 0.77},
]


def test_leave_one_silo_out_table_has_each_silo():
    md = leave_one_silo_out_markdown(LOSO)
    assert "1/3 = 0.333" in md
    assert _row(md, "hospital-a") == ["hospital-a", "shape", "0.300", "0.850", "0.810", "0.950"]
    assert _row(md, "bank-b") == ["bank-b", "color", "0.500", "—", "0.770", "—"]


def test_leave_one_silo_out_refuses_incomplete_rows():
    with pytest.raises(ValueError, match="fused_pairwise_accuracy"):
        leave_one_silo_out_markdown([{k: v for k, v in LOSO[0].items() if k != "fused_pairwise_accuracy"}])
    with pytest.raises(ValueError, match="'hospital-a'"):
        leave_one_silo_out_markdown([{**LOSO[0], "mean_weight": {"bank-b": 1.0}}])
    with pytest.raises(ValueError):
        leave_one_silo_out_markdown([])


def test_the_results_page_is_rendered_again_from_its_json_alone(tmp_path):
    """`mor demo table --render-only`: the tables come from the stored JSON, and the prose around them stays."""
    from coordinator.evaluation import GENERATED_BEGIN, GENERATED_END
    from mor_cli.main import main

    summary = summarise(_runs(), KINDS)
    greedy = summarise([dataclasses.replace(r, reward_pairwise_accuracy=None) for r in _runs()], KINDS)
    write_results_json(summary, tmp_path / "mor_vs_baselines.json", extra={
        "test_questions": 1800, "grpo_steps": 300, "greedy": {"methods": greedy["methods"]},
        "settings": {"eval_samples": 4, "grpo": {}}, "leave_one_silo_out": LOSO})  # steps left at their default
    page = tmp_path / "results.md"
    page.write_text(f"prose before\n{GENERATED_BEGIN}\nstale\n{GENERATED_END}\nprose after\n", encoding="utf-8")
    assert main(["demo", "table", "--render-only", "--results-dir", str(tmp_path), "--results-md", str(page)]) == 0
    text = page.read_text(encoding="utf-8")
    assert text.startswith("prose before\n") and text.endswith("prose after\n") and "stale" not in text
    assert "on 1800 questions of the test split" in text and "Every GRPO run: 300 steps" in text
    assert "## MoR vs baselines: greedy decoding" in text and "held-out silo" in text
    assert main(["demo", "table", "--render-only", "--results-dir", str(tmp_path / "none"),
                 "--results-md", str(page)]) == 1  # no JSON there: one clear line
