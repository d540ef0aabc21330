"""The coordinator's MoR commands end to end through `mor_cli.main.main(argv)`, on real trained silos.

Two silos train real DP small_cnn reward models (`mor silo train`); then
`mor coordinator train-router`, `align` and `evaluate` run on the tiny VLM
with the real TRL trainer, each cut to a few steps.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from mor_cli.main import main

SILO_YAML = """\
name: {name}
consortium: {consortium}
workdir: {workdir}
architecture: small_cnn
public_pretraining_steps: 5
training:
  epochs: 1
  batch_size: 16
  learning_rate: 0.005
  dp: {{target_epsilon: 8.0, target_delta: 1.0e-5, max_grad_norm: 1.0, accountant: rdp}}
"""

GRPO_YAML = """\
steps: 2
per_device_train_batch_size: 8
save_steps: 1
logging_steps: 1
trl_overrides: {disable_tqdm: true}
"""

EVALUATION_YAML = """\
seeds: [0, 1]
methods: [reference, mor, single:bank-b, oracle]
grpo: {steps: 2, per_device_train_batch_size: 8, logging_steps: 1, save_steps: 100, trl_overrides: {disable_tqdm: true}}
prompts_per_kind: 4
test_questions_per_kind: 4
eval_samples: 2
pairwise_pairs_per_kind: 5
eval_every: 1
eval_questions_per_kind: 2
calibration: {max_records_per_kind: 10, router: {epochs: 5}}
leave_one_silo_out: true
"""


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory, consortium_path: Path) -> Path:
    """Two silos' DP reward models, made with `mor silo init` + `mor silo train`, and the pool file naming them."""
    root = tmp_path_factory.mktemp("mor-pipeline")
    lines = ["silos:"]
    for name in ("hospital-a", "bank-b"):
        config = root / f"{name}.yaml"
        config.write_text(SILO_YAML.format(name=name, consortium=consortium_path, workdir=root / name), encoding="utf-8")
        for command in ("init", "train"):
            code, _, err = run_cli(["silo", command, "--config", str(config)]
                                   + (["--no-progress"] if command == "train" else []))
            assert code == 0, err
        lines += [f"  - name: {name}", f"    reward_model: {name}/reward_model"]
    (root / "pool.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root / "pool.yaml"


@pytest.fixture(scope="module")
def router_dir(pool: Path, consortium_path: Path) -> Path:
    config = pool.parent / "calibration.yaml"
    config.write_text("max_records_per_kind: 10\nrouter: {epochs: 5}\n", encoding="utf-8")
    out = pool.parent / "router"
    code, stdout, err = run_cli(["coordinator", "train-router", "--consortium", str(consortium_path), "--pool",
                                 str(pool), "--out", str(out), "--config", str(config), "--no-progress",
                                 "--feature-cache", str(pool.parent / "cache")])
    assert code == 0, err
    assert "router written to" in stdout
    return out


def test_train_router_writes_router_and_what_the_bits_said(router_dir: Path) -> None:
    calibration = json.loads((router_dir / "calibration.json").read_text())
    assert calibration["silos"] == ["hospital-a", "bank-b"]
    assert calibration["objectives"] == ["correct", "correct_and_brief"]
    assert set(calibration["silo_accuracy"]["correct"]["bank-b"]) == {"color", "shape", "yes_no"}
    assert (router_dir / "router.safetensors").is_file()


def test_align_with_mor_then_resume(router_dir: Path, pool: Path, consortium_path: Path, reference_dir: Path,
                                    tmp_path: Path) -> None:
    config = tmp_path / "grpo.yaml"
    config.write_text(GRPO_YAML, encoding="utf-8")
    out = tmp_path / "aligned"
    argv = ["coordinator", "align", "--consortium", str(consortium_path), "--policy", str(reference_dir),
            "--pool", str(pool), "--reward", "mor", "--router", str(router_dir), "--config", str(config),
            "--out", str(out), "--feature-cache", str(pool.parent / "cache")]
    code, stdout, err = run_cli(argv)
    assert code == 0, err
    assert (out / "final" / "config.json").is_file() and "aligned policy written to" in stdout
    record = json.loads((out / "grpo_run.json").read_text())
    # align trains under the reward `evaluate` reports: format guard, then group-top (the name says so).
    assert record["reward"] == "fused_silo_reward/on_format/group_top" and record["global_step"] == 2

    config.write_text(GRPO_YAML.replace("steps: 2", "steps: 3"), encoding="utf-8")
    code, _, err = run_cli([*argv, "--resume"])
    assert code == 0, err
    record = json.loads((out / "grpo_run.json").read_text())
    assert (record["resumed_from"], record["global_step"]) == ("checkpoint-2", 3)


@pytest.mark.parametrize(("extra", "message"), [
    (["--reward", "single:nobody"], "unknown silo 'nobody'"),
    (["--reward", "mor"], "needs --router"),
    (["--reward", "best"], "unknown method 'best'"),
])
def test_align_refuses_what_it_cannot_run(extra: list[str], message: str, pool: Path, consortium_path: Path,
                                          reference_dir: Path, tmp_path: Path) -> None:
    code, _, err = run_cli(["coordinator", "align", "--consortium", str(consortium_path), "--policy",
                            str(reference_dir), "--pool", str(pool), "--out", str(tmp_path / "x"), *extra])
    assert code == 1
    assert message in err


def test_evaluate_writes_the_results_shape_and_reuses_finished_runs(pool: Path, consortium_path: Path,
                                                                   reference_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "evaluation.yaml"
    config.write_text(EVALUATION_YAML, encoding="utf-8")
    results = tmp_path / "results.json"
    argv = ["coordinator", "evaluate", "--consortium", str(consortium_path), "--pool", str(pool), "--reference",
            str(reference_dir), "--out", str(tmp_path / "work"), "--config", str(config), "--results-json",
            str(results), "--results-md", str(tmp_path / "results.md"), "--plots", str(tmp_path / "curves"),
            "--feature-cache", str(pool.parent / "cache"), "--no-progress"]
    code, stdout, err = run_cli(argv)
    assert code == 0, err

    summary = json.loads(results.read_text())
    assert summary["seeds"] == [0, 1]
    assert list(summary["methods"]) == ["reference", "mor", "single:bank-b", "oracle"]
    for entry in summary["methods"].values():
        assert {"overall_mean", "overall_std", "per_kind"} <= set(entry)
        assert set(entry["per_kind"]) == {"color", "shape", "yes_no"}
        assert all(set(v) == {"mean", "std"} for v in entry["per_kind"].values())
    assert summary["methods"]["oracle"]["reward_pairwise_accuracy"]["overall"]["mean"] == 1.0
    assert set(summary["greedy"]["methods"]) == set(summary["methods"])
    assert {row["held_out_silo"] for row in summary["leave_one_silo_out"]} == {"hospital-a", "bank-b"}
    assert set(summary["routing"]) == {"correct", "correct_and_brief"}
    assert "| mor |" in (tmp_path / "results.md").read_text()
    for plot in ("curves_reward.png", "curves_accuracy.png"):
        assert (tmp_path / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "work" / "runs").rglob("result.json")}
    assert len(before) == 8
    code, _, err = run_cli(argv)
    assert code == 0, err
    assert {p: p.stat().st_mtime_ns for p in before} == before, "finished runs must be reused, not rerun"

    # Other settings in the same --out would silently mix results: refused with the fix in the message.
    config.write_text(EVALUATION_YAML.replace("test_questions_per_kind: ", "test_questions_per_kind: 1"),
                      encoding="utf-8")
    code, _, err = run_cli(argv)
    assert code == 1
    assert "other evaluation settings" in err and "test_questions_per_kind" in err and "another --out" in err
