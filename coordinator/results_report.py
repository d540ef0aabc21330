"""Turn the MoR evaluation's runs into the published artefacts (DESIGN §2.4).

One `RunResult` per (method, seed): the aligned VLM's exact-match accuracy per
question kind, the pairwise accuracy of the reward it was trained with, and
TRL's `log_history`. From these come `results.json` (mean ± sample std over
seeds, the shape the benchmark issue asks for), a Markdown table, training
curves and the leave-one-silo-out table. Everything here is pure Python;
matplotlib is imported only when a plot is drawn, so importing stays cheap.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Methods that are not privacy-preserving alternatives, never "best". The centralised model is a reference point,
# not a bound: it sees none of the labelled public pairs MoR's router is calibrated on, and can score below it.
CEILINGS = {"centralized_rm": "reward model trained on all silos' pooled data (breaks privacy; a reference point, "
                              "not a bound: not calibrated on the labelled public pairs MoR's router is)",
            "oracle": "ground-truth reward (the ceiling of any reward)"}
_HEAD = ("reference", "mor", "uniform")
_TAIL = ("fedavg_rm", "centralized_rm", "oracle")
_CEILING_MARK = "†"


@dataclass(frozen=True)
class RunResult:
    """One GRPO run (or the no-GRPO reference) of one method with one seed."""

    method: str
    seed: int
    accuracy: dict[str, float]
    reward_pairwise_accuracy: dict[str, float] | None = None
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    greedy_accuracy: dict[str, float] | None = None  # the same policy decoded greedily, when measured


def method_order(methods: Sequence[str]) -> list[str]:
    """Canonical row order, so every table reads baseline -> ours -> baselines -> ceilings."""
    present = set(methods)
    singles = sorted(m for m in present if m.startswith("single:"))
    others = sorted(present - set(_HEAD) - set(_TAIL) - set(singles))
    return [m for m in _HEAD if m in present] + singles + [m for m in _TAIL if m in present] + others


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample std (ddof=1); std is 0.0 for one value, since one seed says nothing about spread."""
    values = [float(v) for v in values]
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def _check_runs(runs: Sequence[RunResult], kinds: Sequence[str]) -> dict[str, dict[int, RunResult]]:
    """Group runs by method and seed; refuse anything that would make the comparison unfair."""
    if not runs:
        raise ValueError("no runs to summarise: pass at least one RunResult")
    if "overall" in kinds:
        raise ValueError("'overall' is always reported; pass only question kinds in `kinds`")
    by_method: dict[str, dict[int, RunResult]] = defaultdict(dict)
    for run in runs:
        if run.seed in by_method[run.method]:
            raise ValueError(f"duplicate run for method {run.method!r} seed {run.seed}: "
                             "keep one run per (method, seed)")
        missing = [k for k in ("overall", *kinds) if k not in run.accuracy]
        if missing:
            raise ValueError(f"run {run.method!r} seed {run.seed} has no accuracy for {missing}; "
                             "evaluate it on every kind")
        by_method[run.method][run.seed] = run
    all_seeds = {s for per_seed in by_method.values() for s in per_seed}
    for method, per_seed in by_method.items():
        absent = sorted(all_seeds - set(per_seed))
        if absent:
            raise ValueError(f"method {method!r} has no run for seed(s) {absent}; every method must be "
                             "evaluated on the same seeds (run them, or drop those seeds everywhere)")
    return by_method


def _pairwise_summary(method: str, per_seed: dict[int, RunResult], kinds: Sequence[str]) -> dict | None:
    """Mean ± std of the reward's pairwise accuracy, for keys every seed reports; None if no seed has it."""
    have = [r.reward_pairwise_accuracy for r in per_seed.values()]
    if all(h is None for h in have):
        return None
    if any(h is None for h in have):
        seeds = sorted(s for s, r in per_seed.items() if r.reward_pairwise_accuracy is None)
        raise ValueError(f"method {method!r} has reward_pairwise_accuracy for some seeds but not seed(s) {seeds}; "
                         "give it for all seeds or none")
    keys = [k for k in ("overall", *kinds) if all(k in h for h in have)]
    return {k: _mean_std([h[k] for h in have]) for k in keys}


def summarise(runs: Sequence[RunResult], kinds: Sequence[str]) -> dict:
    """Mean ± sample std over seeds per method, overall and per kind (the results.json shape)."""
    by_method = _check_runs(runs, kinds)
    seeds = sorted({s for per_seed in by_method.values() for s in per_seed})
    methods: dict[str, dict] = {}
    for method in method_order(list(by_method)):
        per_seed = by_method[method]
        overall = _mean_std([per_seed[s].accuracy["overall"] for s in seeds])
        entry: dict = {
            "overall_mean": overall["mean"],
            "overall_std": overall["std"],
            "per_kind": {k: _mean_std([per_seed[s].accuracy[k] for s in seeds]) for k in kinds},
            "n_seeds": len(seeds),
            "per_seed": [{"seed": s, "overall": per_seed[s].accuracy["overall"],
                          **{k: per_seed[s].accuracy[k] for k in kinds}} for s in seeds],
            "seconds_mean": statistics.fmean(per_seed[s].seconds for s in seeds),
        }
        pairwise = _pairwise_summary(method, per_seed, kinds)
        if pairwise is not None:
            entry["reward_pairwise_accuracy"] = pairwise
        methods[method] = entry
    return {"seeds": seeds, "methods": methods}


def write_results_json(summary: dict, path: str | Path, *, extra: dict | None = None) -> Path:
    """Write the summary (plus top-level extras such as "settings") as stable, diff-friendly JSON."""
    extra = dict(extra or {})
    clash = sorted(set(extra) & set(summary))
    if clash:
        raise ValueError(f"extra keys {clash} would overwrite the summary's own; rename them")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**summary, **extra}, indent=2) + "\n", encoding="utf-8")
    return path


def _cell(stats: dict[str, float], bold: bool = False, *, spread: bool = True) -> str:
    """"0.774 ± 0.012" ("0.774" without `spread`: one seed measures none), bold when it is the best non-ceiling
    mean of its column."""
    text = f"{stats['mean']:.3f} ± {stats['std']:.3f}" if spread else f"{stats['mean']:.3f}"
    return f"**{text}**" if bold else text


def results_markdown(summary: dict, *, kinds: Sequence[str], title: str, notes: Sequence[str] = ()) -> str:
    """Markdown table of the summary: one row per method, mean ± std per column, best non-ceiling bold."""
    methods = summary.get("methods") or {}
    if not methods:
        raise ValueError("summary has no methods; build it with summarise(runs, kinds)")
    for method, entry in methods.items():
        missing = [k for k in kinds if k not in entry["per_kind"]]
        if missing:
            raise ValueError(f"method {method!r} has no per-kind accuracy for {missing}; summarise with these kinds")
    order = method_order(list(methods))
    columns = {"overall": {m: {"mean": methods[m]["overall_mean"], "std": methods[m]["overall_std"]} for m in order}}
    columns.update({k: {m: methods[m]["per_kind"][k] for m in order} for k in kinds})
    # Best is judged on the printed (3-decimal) value, so visually equal cells are bolded alike.
    contenders = [m for m in order if m not in CEILINGS]
    best = {c: max((round(v[m]["mean"], 3) for m in contenders), default=None) for c, v in columns.items()}

    seeds = summary.get("seeds", [])
    spread = len(seeds) > 1
    over = (f"mean ± sample std over n = {len(seeds)} seeds ({', '.join(map(str, seeds))})" if spread else
            f"one seed ({', '.join(map(str, seeds))}), so no spread was measured")
    pairwise = {m: methods[m].get("reward_pairwise_accuracy", {}).get("overall") for m in order}
    with_pairwise = any(pairwise.values())
    lines = [f"## {title}", "",
             f"Exact-match accuracy of the aligned VLM on held-out questions, {over}. "
             + ("Last column: pairwise accuracy of the method's reward on held-out preference pairs. "
                if with_pairwise else "") + "Bold: best mean per column among privacy-preserving methods.", ""]
    lines.append("| method | " + " | ".join(columns) + (" | reward pairwise acc. |" if with_pairwise else " |"))
    lines.append("|---|" + "---:|" * (len(columns) + with_pairwise))
    for m in order:
        label = f"{m} {_CEILING_MARK}" if m in CEILINGS else m
        cells = [_cell(columns[c][m], m not in CEILINGS and round(columns[c][m]["mean"], 3) == best[c],
                       spread=spread) for c in columns]
        if with_pairwise:
            cells.append(_cell(pairwise[m], spread=spread) if pairwise[m] else "—")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    ceilings = [m for m in order if m in CEILINGS]
    if ceilings:
        lines += ["", f"{_CEILING_MARK} Not a privacy-preserving method, excluded from the bolding: "
                  + "; ".join(f"{m} = {CEILINGS[m]}" for m in ceilings) + "."]
    for note in notes:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def _curve(runs: Sequence[RunResult], key: str) -> tuple[list[float], list[float], list[float]] | None:
    """Steps, mean and std over seeds of `key` in the log history; seeds missing a step just don't count there."""
    by_step: dict[float, list[float]] = defaultdict(list)
    for run in runs:
        for entry in run.history:
            if key in entry and "step" in entry and entry[key] is not None:
                by_step[float(entry["step"])].append(float(entry[key]))
    if not by_step:
        return None
    steps = sorted(by_step)
    stats = [_mean_std(by_step[s]) for s in steps]
    return steps, [s["mean"] for s in stats], [s["std"] for s in stats]


def _band(ax, steps: list[float], mean: list[float], std: list[float], label: str) -> None:
    """One line with its ±std band, same colour."""
    (line,) = ax.plot(steps, mean, label=label)
    ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                    color=line.get_color(), alpha=0.2, linewidth=0)


def plot_training_curves(runs: Sequence[RunResult], path_prefix: str | Path) -> list[Path]:
    """`<prefix>_reward.png` (one panel per method: reward scales differ) and `<prefix>_accuracy.png`.

    Methods without the data for a plot are skipped; a plot with no curve at all is not written.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure  # no pyplot: no global figure state to leak between calls

    by_method: dict[str, list[RunResult]] = defaultdict(list)
    for run in runs:
        by_method[run.method].append(run)
    order = method_order(list(by_method))
    rewards = {m: c for m in order if (c := _curve(by_method[m], "reward")) is not None}
    accuracy = {m: c for m in order if (c := _curve(by_method[m], "eval_accuracy/overall")) is not None}
    if not rewards and not accuracy:
        raise ValueError("no run has 'reward' or 'eval_accuracy/overall' entries with a 'step' in its history; "
                         "pass TRL's trainer_state.json log_history")
    prefix = Path(path_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if rewards:
        ncols = min(3, len(rewards))
        nrows = math.ceil(len(rewards) / ncols)
        fig = Figure(figsize=(4.5 * ncols, 3.2 * nrows), layout="constrained")
        axes = fig.subplots(nrows, ncols, sharex=True, squeeze=False).ravel()
        for i, (ax, (method, (steps, mean, std))) in enumerate(zip(axes, rewards.items())):
            _band(ax, steps, mean, std, method)
            ax.set_title(method)
            ax.set_ylabel("training reward")
            if i + ncols >= len(rewards):  # nothing drawn below this panel: it carries the shared x axis
                ax.set_xlabel("step")
                ax.tick_params(axis="x", labelbottom=True)
        for ax in axes[len(rewards):]:
            ax.set_visible(False)
        fig.suptitle("Mean training reward over seeds (± std); scales differ per method")
        written.append(prefix.with_name(prefix.name + "_reward.png"))
        fig.savefig(written[-1], dpi=110)
    if accuracy:
        fig = Figure(figsize=(7, 4.5), layout="constrained")
        ax = fig.subplots()
        for method, (steps, mean, std) in accuracy.items():
            _band(ax, steps, mean, std, method)
        if "reference" in by_method:
            ref = statistics.fmean(r.accuracy["overall"] for r in by_method["reference"])
            ax.axhline(ref, color="black", linestyle="--", linewidth=1, label="reference (no GRPO), test split")
        ax.set_xlabel("step")
        ax.set_ylabel("exact-match accuracy (overall), dev split")
        ax.set_title("Accuracy during GRPO, mean over seeds (± std)")
        ax.legend(fontsize="small")
        written.append(prefix.with_name(prefix.name + "_accuracy.png"))
        fig.savefig(written[-1], dpi=110)
    return written


_LOSO_KEYS = ("held_out_silo", "held_out_kind", "mean_weight", "fused_pairwise_accuracy")


def _fmt(value: float | None) -> str:
    """Three decimals, or a dash for a measurement that was not taken."""
    return "—" if value is None else f"{value:.3f}"


def leave_one_silo_out_markdown(rows: Sequence[dict]) -> str:
    """Held-out-client table: does the router still find a silo whose kind it never saw in calibration?"""
    if not rows:
        raise ValueError("no leave-one-silo-out rows; run one router calibration per held-out silo")
    lines = ["| held-out silo | its kind | weight on its kind, kind not in calibration | weight, full calibration "
             "| fused pairwise acc., kind not in calibration | fused pairwise acc., full calibration |",
             "|---|---|---:|---:|---:|---:|"]
    n_silos = set()
    for i, row in enumerate(rows):
        missing = [k for k in _LOSO_KEYS if k not in row]
        if missing:
            raise ValueError(f"leave-one-silo-out row {i} lacks {missing}; each row needs {list(_LOSO_KEYS)}")
        silo = row["held_out_silo"]
        if silo not in row["mean_weight"]:
            raise ValueError(f"row {i}: mean_weight has no entry for the held-out silo {silo!r}; "
                             "record the router's mean weight on every silo")
        n_silos.add(len(row["mean_weight"]))
        full_weight = (row.get("full_router_mean_weight") or {}).get(silo)
        lines.append(f"| {silo} | {row['held_out_kind']} | {_fmt(row['mean_weight'][silo])} | {_fmt(full_weight)} "
                     f"| {_fmt(row['fused_pairwise_accuracy'])} | {_fmt(row.get('full_router_pairwise_accuracy'))} |")
    intro = ("Mean router weight a silo gets on questions of its own kind, when that kind was left out of the "
             "router's calibration set vs with full calibration, and the fused reward's pairwise accuracy on "
             "that kind in both cases.")
    if len(n_silos) == 1:
        k = n_silos.pop()
        intro += f" Uniform weight would be 1/{k} = {1 / k:.3f}."
    return intro + "\n\n" + "\n".join(lines) + "\n"


def results_page_markdown(results: Mapping[str, Any], *, json_name: str, title: str = "MoR vs baselines") -> str:
    """The generated part of docs/results.md, from the results JSON alone (`evaluation.publish` writes it, and
    `mor demo table --render-only` renders it again without re-running the evaluation)."""
    methods = results["methods"]
    kinds = list(next(iter(methods.values()))["per_kind"])
    settings = results["settings"]
    # JSON written before 2026-12-04 holds neither count; its sample was test_questions_per_kind of every kind,
    # and its settings name the GRPO steps.
    questions = results.get("test_questions", len(kinds) * (settings.get("test_questions_per_kind") or 0))
    notes = [f"Exact match of sampled answers (temperature 1, {settings['eval_samples']} per question) on "
             f"{questions} questions of the test split (held-out easy-VQA test images; in-training "
             "checks read the separate dev split); overall is the mean over kinds.",
             f"Every GRPO run: {results.get('grpo_steps') or settings['grpo']['steps']} steps from the same "
             "reference; all settings in "
             f"`{json_name}`."]
    markdown = results_markdown(results, kinds=kinds, title=title, notes=notes)
    markdown += "\n" + results_markdown({"seeds": results["seeds"], "methods": results["greedy"]["methods"]},
                                         kinds=kinds, title=f"{title}: greedy decoding",
                                         notes=["The same policies, answers decoded greedily."])
    if "leave_one_silo_out" in results:
        markdown += "\n" + leave_one_silo_out_markdown(results["leave_one_silo_out"])
    return markdown
