"""The evaluation's pieces that need no GRPO run: config checks, method lists, reward scoring, the pool file."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from coordinator.answer_eval import balanced_sample
from coordinator.calibration import CalibrationConfig
from coordinator.evaluation import EvaluationConfig, available_methods, reward_pairwise_accuracy
from coordinator.pool import load_pool, pool_clients, pool_fusion
from coordinator.rewards import ExactMatchReward
from mor_secure.config import ConfigError
from mor_secure.data import QUESTION_KINDS, make_pairs
from mor_secure.data.records import VQARecord


def test_balanced_sample_caps_every_kind(consortium) -> None:
    _, splits = consortium
    sample = balanced_sample(splits.test, 4, seed=0)
    assert [sum(r.kind == k for r in sample) for k in QUESTION_KINDS] == [4, 4, 4]
    assert sample == balanced_sample(splits.test, 4, seed=0)
    assert len(balanced_sample(splits.test, None, seed=0)) == len(splits.test)


def test_available_methods_in_report_order() -> None:
    assert available_methods(["a", "b"], ["centralized_rm"]) == [
        "reference", "mor", "uniform", "single:a", "single:b", "centralized_rm", "oracle"]


def test_evaluation_config_checks_say_how_to_fix() -> None:
    with pytest.raises(ValueError, match="sets per run"):
        EvaluationConfig(grpo={"output_dir": "x"})
    with pytest.raises(ValueError, match="beta must be > 0"):
        EvaluationConfig(grpo={"beta": 0.0})
    with pytest.raises(ValueError, match="not among calibration.objectives"):
        EvaluationConfig(objective="correct_and_brief", calibration={"objectives": ["correct"]})
    settings = EvaluationConfig(grpo={"steps": 7}).grpo_settings(Path("out"), seed=3)
    assert (settings.steps, settings.seed, settings.output_dir) == (7, 3, Path("out"))


def test_pairwise_accuracy_of_the_oracle_and_of_its_opposite(consortium) -> None:
    _, splits = consortium
    pairs = list(make_pairs(splits.test, seed=0))
    oracle = ExactMatchReward()
    assert reward_pairwise_accuracy(oracle, pairs, chunk=7) == {**dict.fromkeys(QUESTION_KINDS, 1.0), "overall": 1.0}

    def backwards(prompts, completions, **columns):
        return [-x for x in oracle(prompts, completions, **columns)]

    assert reward_pairwise_accuracy(backwards, pairs)["overall"] == 0.0


def test_pool_file_resolves_paths_and_reports_problems(tmp_path: Path) -> None:
    pool_path = tmp_path / "pool.yaml"
    pool_path.write_text("silos:\n  - name: a\n    reward_model: models/a\n", encoding="utf-8")
    pool = load_pool(pool_path)
    assert pool.silos[0].reward_model == (tmp_path / "models" / "a").resolve()
    with pytest.raises(FileNotFoundError, match="mor silo train"):
        pool_clients(pool)
    with pytest.raises(ValueError, match="unknown silo"):
        pool_clients(pool, names=["b"])

    pool_path.write_text("silos:\n  - {name: a, reward_model: x}\n  - {name: a, reward_model: y}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="repeated"):
        load_pool(pool_path)
    # No ledger in the pool: the coordinator's queries are post-processing of DP models and charge nothing.
    pool_path.write_text("silos:\n  - {name: a, reward_model: x, ledger: l.json}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="ledger"):
        load_pool(pool_path)
    pool_path.write_text("silos:\n  - {name: a, reward_model: x, privacy_budget: {epsilon: 1.0, delta: 0.0}}\n",
                         encoding="utf-8")
    with pytest.raises(ConfigError, match="privacy_budget"):
        load_pool(pool_path)
    pool_path.write_text("silos:\n  - {name: a, reward_model: x, adress: y}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="adress"):
        load_pool(pool_path)


def test_a_networked_pool_that_fuses_in_the_clear_says_so_loudly(tmp_path: Path, caplog) -> None:
    pool_path = tmp_path / "pool.yaml"
    pool_path.write_text("kit: kit\naggregation: clear\nsilos:\n  - {name: a, address: 127.0.0.1:1}\n"
                         "  - {name: b, address: 127.0.0.1:2}\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="coordinator.pool"):
        pool_fusion(load_pool(pool_path))
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "every silo's weighted scores reach the coordinator" in caplog.text
    caplog.clear()
    pool_path.write_text(pool_path.read_text(encoding="utf-8").replace("aggregation: clear", "aggregation: secure"),
                         encoding="utf-8")
    pool_fusion(load_pool(pool_path))
    assert not caplog.records


def test_group_top_keeps_each_prompts_winners_only() -> None:
    from coordinator.rewards import GroupTopReward

    def graded(prompts, completions, **columns):
        return [{"circle": 0.5, "triangle": 2.0, "rectangle": -3.0, "": -3.0}[c] for c in completions]

    reward = GroupTopReward(graded)
    completions = ["circle", "triangle", "rectangle", "circle", "circle", "rectangle", "circle", ""]
    columns = {"image_path": ["a.png"] * 4 + ["b.png"] * 4, "question": ["what shape?"] * 8}
    # Group a: triangle wins alone; group b: both "circle"s tie at the top.
    assert reward(["q"] * 8, completions, **columns) == [0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    assert reward.__name__ == "graded/group_top"
    with pytest.raises(ValueError, match="image_path"):
        reward(["q"], ["circle"], question=["what shape?"])


def test_on_format_floors_off_topic_and_malformed_answers_only() -> None:
    from coordinator.rewards import EMPTY_COMPLETION_REWARD, OnFormatReward, answer_vocabulary

    records = [VQARecord("i", Path("i.png"), "what shape?", "circle", "shape"),
               VQARecord("i", Path("i.png"), "what color?", "Red", "color"),
               VQARecord("j", Path("j.png"), "is it red?", "yes", "yes_no")]
    vocabulary = answer_vocabulary(records)
    assert vocabulary == {"shape": {"circle"}, "color": {"red"}, "yes_no": {"yes"}}

    def loves_everything(prompts, completions, **columns):
        return [5.0] * len(completions)

    reward = OnFormatReward(loves_everything, vocabulary)
    completions = ["circle.", "yes", "", "\ufffd", "red", "Red", "circle"]
    kinds = ["shape", "shape", "shape", "color", "color", "color", "yes_no"]
    floor = EMPTY_COMPLETION_REWARD
    assert reward(["q"] * 7, completions, kind=kinds) == [5.0, floor, floor, floor, 5.0, 5.0, floor]
    assert reward.__name__ == "loves_everything/on_format"
    with pytest.raises(ValueError, match="no answer vocabulary for kind"):
        reward(["q"], ["circle"], kind=["counting"])
    with pytest.raises(ValueError, match="kind"):
        reward(["q"], ["circle"])
    with pytest.raises(ValueError, match="empty for some kind"):
        OnFormatReward(loves_everything, {"shape": frozenset()})


def test_generated_table_replaces_only_the_marked_block(tmp_path: Path) -> None:
    from coordinator.evaluation import GENERATED_BEGIN, GENERATED_END, write_between_markers

    path = tmp_path / "results.md"
    write_between_markers(path, "table v1\n")
    assert path.read_text() == f"{GENERATED_BEGIN}\ntable v1\n{GENERATED_END}\n"
    path.write_text("# Results\n\nprose before\n\n" + path.read_text() + "\nprose after\n")
    write_between_markers(path, "table v2\n")
    text = path.read_text()
    assert "table v1" not in text and "table v2" in text
    assert text.startswith("# Results\n\nprose before\n") and text.endswith("prose after\n")


def test_in_training_probe_reads_dev_and_reported_numbers_read_test(consortium, tmp_path: Path,
                                                                     monkeypatch) -> None:
    """The plots are a probe (looked at while tuning): dev. Every reported number: test, which nothing else reads."""
    import coordinator.evaluation as evaluation_module
    from coordinator.evaluation import Evaluation

    monkeypatch.setattr(evaluation_module, "RouterFeatures", lambda cache: None)  # no encoder needed here
    spec, splits = consortium
    config = EvaluationConfig(test_questions_per_kind=5, eval_questions_per_kind=3, pairwise_pairs_per_kind=4)
    evaluation = Evaluation(spec, [], tmp_path / "reference", tmp_path / "out", config, progress=False)
    assert {r.image_id for r in evaluation.dev_probe} <= splits.image_ids("dev")
    assert {r.image_id for r in evaluation.test} <= splits.image_ids("test")
    assert {p.image_id for p in evaluation.test_pairs} <= splits.image_ids("test")
    assert len(evaluation.dev_probe) == 3 * len(QUESTION_KINDS)

    # Finished runs are not reused across another consortium: resizing dev changes the test split.
    resized = spec.model_copy(update={"splits": spec.splits.model_copy(update={"dev_images": 10})})
    with pytest.raises(ValueError, match=r"changed: \['consortium'\]"):
        Evaluation(resized, [], tmp_path / "reference", tmp_path / "out", config, progress=False)


def test_leave_one_silo_out_fuses_through_the_pools_fusion(consortium, tmp_path: Path, monkeypatch) -> None:
    """On a secure pool the pool's fusion is secure aggregation: leave-one-silo-out must not fall back to clear rounds."""
    import coordinator.evaluation as evaluation_module
    from coordinator.evaluation import LEAVE_ONE_OUT_METHOD, Evaluation
    from coordinator.fusion import ClearFusion
    from coordinator.router import Router, RouterConfig
    from silo_agent.in_process import InProcessSiloClient
    from silo_agent.service import SiloService
    from silo_fakes import RightAnswerModel

    class ZeroFeatures:  # the frozen encoder is not what this test is about
        def __init__(self, cache) -> None:
            pass

        def encode(self, images, prompts, *, progress: bool = False):
            return torch.zeros(len(images), 4)

    monkeypatch.setattr(evaluation_module, "RouterFeatures", ZeroFeatures)
    spec, _ = consortium
    names = [silo.name for silo in spec.silos]
    silos = [InProcessSiloClient(SiloService(name, RightAnswerModel())) for name in reversed(names)]
    built: list[tuple[list[str], str]] = []

    def pool_fusion(clients, **settings):
        built.append(([c.name for c in clients], settings["method"]))
        return ClearFusion(clients, **settings)

    config = EvaluationConfig(test_questions_per_kind=2, eval_questions_per_kind=1, pairwise_pairs_per_kind=2,
                              calibration=CalibrationConfig(exclude_kinds=["yes_no"]))
    evaluation = Evaluation(spec, silos, tmp_path / "reference", tmp_path / "out", config, progress=False,
                            fusion=pool_fusion)
    router = Router(4, len(names), 1, RouterConfig(), silo_names=names, objective_names=[config.objective])
    excluded: list = []
    monkeypatch.setattr(evaluation, "router", lambda seed, exclude_kinds=None: excluded.append(exclude_kinds) or router)
    rows = evaluation.leave_one_silo_out()
    assert [(row["held_out_silo"], row["held_out_kind"]) for row in rows] == [
        (silo.name, kind) for silo in spec.silos for kind in silo.reliable_kinds]
    # The full router is the configured one; each held-out one leaves out its kind on top of the configured yes_no.
    assert excluded == [None] + [sorted({"yes_no", kind}) for silo in spec.silos for kind in silo.reliable_kinds]
    # Two fused rewards per row (held-out router, full router), each over the router's silos in its order.
    assert built == [(names, LEAVE_ONE_OUT_METHOD)] * (2 * len(rows))


def test_balanced_sample_draws_each_kind_independently_of_the_others(consortium) -> None:
    """Leaving a kind out (leave-one-silo-out) must not change which records the other kinds keep."""
    _, splits = consortium
    full = balanced_sample(splits.test, 4, seed=0)
    without_color = balanced_sample([r for r in splits.test if r.kind != "color"], 4, seed=0)
    assert without_color == [r for r in full if r.kind != "color"]


def test_overall_accuracy_is_the_mean_over_kinds_when_kinds_are_unequal() -> None:
    from coordinator.answer_eval import accuracy_by_kind

    records = [VQARecord(f"y{i}", Path("y.png"), "is it red?", "yes", "yes_no") for i in range(3)]
    records.append(VQARecord("c", Path("c.png"), "what color?", "red", "color"))
    assert accuracy_by_kind(records, ["yes", "yes", "yes", "blue"]) == {"color": 0.0, "yes_no": 1.0, "overall": 0.5}


def test_the_silos_score_exactly_the_answer_the_format_guard_checked(tmp_path: Path) -> None:
    """'right zq!' passes the guard as the answer 'right': the silos must score that, not text the guard never read."""
    from coordinator.methods import grpo_reward
    from coordinator.rewards import EMPTY_COMPLETION_REWARD, UniformSiloReward, answer_vocabulary
    from silo_agent.in_process import InProcessSiloClient
    from silo_agent.service import SiloService
    from silo_fakes import RightAnswerModel, png

    class Recording(InProcessSiloClient):
        def __init__(self) -> None:
            super().__init__(SiloService("a", RightAnswerModel()))
            self.scored: list[str] = []

        def score(self, request):
            self.scored.extend(row.response for row in request.rows)
            return super().score(request)

    image = tmp_path / "a.png"
    image.write_bytes(png())
    vocabulary = answer_vocabulary([VQARecord("i", image, "what?", answer, "color") for answer in ("right", "wrong")])
    silo = Recording()
    reward = grpo_reward(UniformSiloReward([silo]), vocabulary=vocabulary, transform="score")
    completions = ["right", "Right!", "right zq!", "wrong", "zq right"]
    columns = {"image_path": [str(image)] * 5, "question": ["what?"] * 5, "kind": ["color"] * 5}
    # RightAnswerModel's standardised score: 1 for "right", -1 for any other text.
    assert reward(["q"] * 5, completions, **columns) == [1.0, 1.0, 1.0, -1.0, EMPTY_COMPLETION_REWARD]
    assert set(silo.scored) == {"right", "wrong"}


def test_a_floored_answer_never_wins_its_group() -> None:
    """Every on-vocabulary answer scored below the floor: the off-vocabulary ones must still not win group-top."""
    from coordinator.methods import grpo_reward
    from coordinator.rewards import answer_vocabulary

    records = [VQARecord("i", Path("i.png"), "what shape?", answer, "shape") for answer in ("circle", "triangle")]
    vocabulary = answer_vocabulary([*records, VQARecord("k", Path("k.png"), "what color?", "red", "color")])

    def confidently_wrong(prompts, completions, **columns):  # standardised scores have such tails
        return [{"circle": -3.4, "triangle": -3.9}.get(c, 5.0) for c in completions]

    reward = grpo_reward(confidently_wrong, vocabulary=vocabulary)
    columns = {"image_path": ["i.png"] * 4, "question": ["what shape?"] * 4, "kind": ["shape"] * 4}
    assert reward(["q"] * 4, ["circle", "triangle", "xq", "red"], **columns) == [1.0, 0.0, 0.0, 0.0]
    only_floored = {name: values[:2] for name, values in columns.items()}
    assert reward(["q"] * 2, ["xq", "red"], **only_floored) == [0.0, 0.0]


def test_a_resume_refuses_runs_made_from_another_reference_or_other_silos(consortium, tmp_path: Path,
                                                                          monkeypatch) -> None:
    import coordinator.evaluation as evaluation_module
    from coordinator.evaluation import Evaluation
    from silo_agent.in_process import InProcessSiloClient
    from silo_agent.service import SiloService
    from silo_fakes import RightAnswerModel

    monkeypatch.setattr(evaluation_module, "RouterFeatures", lambda cache: None)  # no encoder needed here
    spec, _ = consortium
    reference = tmp_path / "reference"
    reference.mkdir()
    (reference / "config.json").write_text("{}", encoding="utf-8")
    (reference / "model.safetensors").write_bytes(b"policy v1")
    silos = [InProcessSiloClient(SiloService(name, RightAnswerModel())) for name in ("a", "b")]
    config = EvaluationConfig(seeds=[0], methods=["reference"], leave_one_silo_out=False)
    out = tmp_path / "out"

    def evaluation(clients=silos, baselines=None):
        return Evaluation(spec, clients, reference, out, config, baselines=baselines, progress=False)

    evaluation()
    evaluation()  # the same inputs: resumes
    with pytest.raises(ValueError, match=r"changed: \['silos'\].*another --out"):
        evaluation(clients=silos[:1])
    with pytest.raises(ValueError, match=r"changed: \['baseline_models'\]"):
        evaluation(baselines={"fedavg_rm": silos[0]})
    (reference / "model.safetensors").write_bytes(b"policy v2")
    with pytest.raises(ValueError, match=r"changed: \['reference_checkpoint'\]"):
        evaluation()


def test_an_interrupted_run_continues_from_its_grpo_checkpoint(consortium, tmp_path: Path, monkeypatch) -> None:
    """No result.json yet but a checkpoint (transformers writes one at the last step): GRPO resumes, not refuses."""
    import coordinator.evaluation as evaluation_module
    from coordinator.evaluation import Evaluation

    class StopHere(Exception):
        pass

    resumes: list[bool] = []

    def train_grpo(policy_dir, records, reward, settings, *, resume, callbacks):
        resumes.append(resume)
        raise StopHere  # what GRPO does with the flag is tests/integration/test_grpo.py's business

    monkeypatch.setattr(evaluation_module, "RouterFeatures", lambda cache: None)  # no encoder needed here
    monkeypatch.setattr(evaluation_module, "load_vlm", lambda path: (None, None))
    monkeypatch.setattr(evaluation_module, "train_grpo", train_grpo)
    spec, _ = consortium
    config = EvaluationConfig(seeds=[0], methods=["oracle"], leave_one_silo_out=False, test_questions_per_kind=2,
                              eval_questions_per_kind=1, pairwise_pairs_per_kind=2)
    evaluation = Evaluation(spec, [], tmp_path / "reference", tmp_path / "out", config, progress=False)
    for _ in range(2):
        with pytest.raises(StopHere):
            evaluation.run("oracle", 0)
        (tmp_path / "out" / "runs" / "oracle" / "seed-0" / "grpo" / "checkpoint-300").mkdir(parents=True,
                                                                                          exist_ok=True)
    assert resumes == [False, True]


@pytest.mark.parametrize("progress", [False, True])
def test_the_grpo_step_bar_follows_the_evaluations_progress_setting(consortium, tmp_path: Path, monkeypatch,
                                                                     progress: bool) -> None:
    """`--no-progress` (or no terminal) hides the GRPO run's bar as well as the others."""
    import coordinator.evaluation as evaluation_module
    from coordinator.evaluation import Evaluation

    class StopHere(Exception):
        pass

    shown: list[bool] = []

    def train_grpo(policy_dir, records, reward, settings, *, resume, callbacks):
        shown.append(not settings.to_grpo_config().disable_tqdm)
        raise StopHere

    monkeypatch.setattr(evaluation_module, "RouterFeatures", lambda cache: None)
    monkeypatch.setattr(evaluation_module, "load_vlm", lambda path: (None, None))
    monkeypatch.setattr(evaluation_module, "train_grpo", train_grpo)
    spec, _ = consortium
    config = EvaluationConfig(seeds=[0], methods=["oracle"], leave_one_silo_out=False, test_questions_per_kind=2,
                              eval_questions_per_kind=1, pairwise_pairs_per_kind=2)
    evaluation = Evaluation(spec, [], tmp_path / "reference", tmp_path / "out", config, progress=progress)
    with pytest.raises(StopHere):
        evaluation.run("oracle", 0)
    assert shown == [progress]


def test_a_comparison_a_secure_pool_would_refuse_partway_is_refused_before_it_runs(consortium, tmp_path: Path) -> None:
    """As many weightings of the test pairs as there are silos solve for every silo's score on them, and the
    pool's record refuses the sum that completes them (coordinator/decrypted_rows.py): hours into the run."""
    from coordinator.evaluation import Evaluation, weightings_of_test_pairs
    from silo_agent.in_process import InProcessSiloClient
    from silo_agent.service import SiloService
    from silo_fakes import RightAnswerModel

    spec, _ = consortium
    silos = [s.name for s in spec.silos]
    clients = [InProcessSiloClient(SiloService(name, RightAnswerModel())) for name in silos]
    demo = EvaluationConfig(seeds=[0], methods=["reference", "mor", "uniform"], leave_one_silo_out=False)
    assert set(weightings_of_test_pairs(demo.methods, demo, spec, silos).values()) == {2}
    table = EvaluationConfig(seeds=[0, 1, 2], methods=["reference", "mor", "uniform"], leave_one_silo_out=False)
    reliable = {kind for silo in spec.silos for kind in silo.reliable_kinds}
    held_out = EvaluationConfig(seeds=[0], methods=["reference", "mor", "uniform"])  # the leave-one-silo-out too
    assert {k: n for k, n in weightings_of_test_pairs(held_out.methods, held_out, spec, silos).items()
            if k in reliable} == dict.fromkeys(reliable, 3)
    for config in (table, held_out):
        with pytest.raises(ValueError, match=f"test pairs under [34] weightings of {len(silos)} silos"):
            Evaluation(spec, clients, tmp_path / "reference", tmp_path / "out", config, progress=False,
                       secure_aggregation=True)
    # The demo's comparison is allowed; in the clear, any is.
    Evaluation(spec, clients, tmp_path / "reference", tmp_path / "out", demo, progress=False, secure_aggregation=True)
    Evaluation(spec, clients, tmp_path / "reference", tmp_path / "out", table, progress=False)
