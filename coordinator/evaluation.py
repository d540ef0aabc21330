"""`mor coordinator evaluate`: MoR against its baselines on the same GRPO budget (DESIGN §2.4).

For every seed and method the reference policy is aligned with GRPO under
that method's reward (same prompts, steps, generations, learning rate), and
the result is scored by exact match on a kind-balanced sample of the test split:
the headline is the accuracy of SAMPLED answers (temperature 1, as GRPO
samples; `eval_samples` per question), i.e. the expected reward of the policy
GRPO optimises; greedy decoding is reported next to it. Both are kept because
they disagree here: GRPO on a 1.8M-parameter VLM mostly moves probability
mass among answers the policy already considers (sampled accuracy rises by
0.1-0.3), and flips the greedy answer far less often (docs/results.md). Each reward is also scored directly: its pairwise accuracy on clean
pairs from the test split. Methods:

- ``reference``: no GRPO (the starting point);
- ``mor``: the learned router's fused reward (the method);
- ``uniform``: the plain average of the silos' scores;
- ``single:<silo>``: one silo's reward model alone;
- ``fedavg_rm``: one reward model federated-averaged over the silos (homogeneous architecture);
- ``centralized_rm``: one reward model on the silos' pooled pairs (breaks privacy; a reference point, not a bound:
  it is not calibrated on the labelled public pairs MoR's router is);
- ``oracle``: exact match against the ground truth (the ceiling of any reward).

The seed drives GRPO's sampling and prompt order and the router's
initialisation; the silos' reward models are trained once, as in deployment.
Leave-one-silo-out: one kind at a time is removed from calibration, and the
table says what weight the router then gives the silo reliable on that kind.
Runs already finished in `out_dir` are reused, so an interrupted evaluation
resumes where it stopped.

Which held-out split is read where (mor_secure/data/splits.py): the
in-training accuracy checks (the plots) are a probe, looked at while settings
are chosen, so they read the `dev` split; everything this module reports as a
result (answer accuracy, reward pairwise accuracy, routing tables,
leave-one-silo-out) reads the `test` split, which nothing else reads.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, field_validator, model_validator

from mor_secure.config import StrictModel
from mor_secure.data import QUESTION_KINDS, ConsortiumSpec, PreferencePair, VQARecord, make_pairs, make_splits
from mor_secure.models.tiny_vlm import checkpoint_digest, load_vlm
from mor_secure.transport.authorization import AuditSink
from mor_secure.wire.client import SiloClient

from .answer_eval import AccuracyCallback, balanced_sample, evaluate_answers
from .calibration import CalibrationBits, CalibrationConfig, Objective, collect_bits, fit_router, mean_weights_by_kind
from .grpo import GRPOSettings, latest_checkpoint, train_grpo
from .results_report import RunResult, plot_training_curves, results_page_markdown, summarise, write_results_json
from .fusion import ClearFusion, Fusion
from .methods import RewardTransform, grpo_reward, method_reward
from .rewards import answer_vocabulary
from .router import RouterFeatures

logger = logging.getLogger(__name__)

BASELINE_MODELS = ("fedavg_rm", "centralized_rm")
# How the leave-one-silo-out rounds are labelled in the coordinator's audit log.
LEAVE_ONE_OUT_METHOD = "leave-one-out"
_RESULT_FILE = "result.json"


class EvaluationConfig(StrictModel):
    """What `mor coordinator evaluate` runs; every method gets the same GRPO budget."""

    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1,
                             description="Seeds; each method is run once per seed and reported as mean +- std.")
    methods: list[str] | None = Field(
        None, description="Methods to run (see the module docstring); null = every method whose inputs exist.")
    objective: Objective = Field("correct", description="Router objective GRPO optimises under `mor`.")
    reward_transform: RewardTransform = Field(
        "group_top",
        description="Applied to every method's reward alike: `group_top` gives 1 to the completions a prompt's "
        "group scores highest and 0 to the rest (a reward model's ranking, not its score gaps; see "
        "coordinator.rewards.GroupTopReward); `score` passes the reward through unchanged.")
    format_guard: bool = Field(
        True,
        description="Give every method's reward its floor for answers outside the public answer vocabulary of "
        "the question's kind (coordinator.rewards.OnFormatReward), before `reward_transform`. Silo reward models "
        "never saw off-topic answers; without the guard GRPO found ones they score high.")
    grpo: dict[str, Any] = Field(
        default_factory=dict,
        description="GRPOSettings fields shared by every run (all but output_dir and seed, which are per run).")
    prompts_per_kind: int | None = Field(
        None, gt=0,
        description="GRPO prompts per kind, drawn from the public calibration questions (null = as many as the "
        "rarest kind has, 485 on the demo consortium: kinds are balanced so no silo's domain dominates; the "
        "router is calibrated on these same public questions).")
    test_questions_per_kind: int | None = Field(
        600, gt=0, description="Test-split questions per kind for the reported accuracy (sampled and greedy).")
    pairwise_pairs_per_kind: int | None = Field(
        400, gt=0, description="Clean test-split pairs per kind for each reward's reported pairwise accuracy.")
    eval_samples: int = Field(
        4, ge=1, description="Answers sampled per test question (temperature 1) for the headline accuracy.")
    eval_every: int = Field(50, gt=0, description="Steps between the in-training accuracy checks (the plots).")
    eval_questions_per_kind: int = Field(
        100, gt=0, description="Dev-split questions per kind in each in-training accuracy check (a probe: never "
        "the test split, which only the reported numbers read).")
    calibration: CalibrationConfig = Field(
        default_factory=CalibrationConfig,
        description="Router calibration (calibration.router.seed is replaced by each run's seed; calibration.seed, "
        "the subsample, is shared by all runs).")
    leave_one_silo_out: bool = Field(True, description="Also run the leave-one-silo-out routing experiment.")

    @field_validator("grpo")
    @classmethod
    def _grpo_fields(cls, grpo: dict[str, Any]) -> dict[str, Any]:
        owned = sorted({"output_dir", "seed"} & grpo.keys())
        if owned:
            raise ValueError(f"grpo sets {owned}, which the evaluation sets per run; remove them")
        GRPOSettings(output_dir="unused", **grpo)  # fails here, naming the field, rather than mid-evaluation
        return grpo

    @model_validator(mode="after")
    def _objective_is_calibrated(self) -> EvaluationConfig:
        if self.objective not in self.calibration.objectives:
            raise ValueError(f"objective {self.objective!r} is not among calibration.objectives "
                             f"{self.calibration.objectives}; add it there")
        return self

    def grpo_settings(self, output_dir: Path, seed: int) -> GRPOSettings:
        return GRPOSettings(output_dir=output_dir, seed=seed, **self.grpo)


def weightings_of_test_pairs(methods: Sequence[str], config: EvaluationConfig, spec: ConsortiumSpec,
                         silos: Sequence[str]) -> dict[str, int]:
    """Per question kind, how many weightings of the silos the evaluation fuses its test pairs under.

    `mor` one per seed (each seed's router), `uniform` one; the leave-one-silo-out experiment one more per
    held-out router on that kind's pairs, and the first seed's full router if `mor` is not run. The other methods
    fuse nothing (`single:` asks one silo in the clear, baselines are the coordinator's own models).
    """
    fused = len(config.seeds) * ("mor" in methods) + ("uniform" in methods)
    counts = dict.fromkeys(QUESTION_KINDS, fused)
    if config.leave_one_silo_out:
        held_out = Counter(kind for silo in spec.silos if silo.name in silos for kind in silo.reliable_kinds)
        for kind, routers in held_out.items():
            counts[kind] += routers + ("mor" not in methods)
    return counts


def refuse_revealing_comparison(methods: Sequence[str], config: EvaluationConfig, spec: ConsortiumSpec,
                                silos: Sequence[str]) -> None:
    """On a secure pool: ValueError, before anything runs, for a comparison the pool would refuse mid-run.

    As many generic weightings of a row as there are silos solve for every silo's score on it, so the pool's
    record of decrypted rows (coordinator/decrypted_rows.py) refuses the sum that completes them; on the test
    pairs, which every method scores, that would come hours into the evaluation.
    """
    counts = weightings_of_test_pairs(methods, config, spec, silos)
    revealing = {kind: n for kind, n in counts.items() if n >= len(silos)}
    if revealing:
        raise ValueError(
            f"on a secure pool this evaluation would fuse its test pairs under {max(revealing.values())} weightings "
            f"of {len(silos)} silos (kinds {', '.join(sorted(revealing))}: mor once per seed, uniform, the "
            "leave-one-silo-out routers), enough to solve for every silo's score on them, so the pool would refuse "
            "it partway: run fewer seeds or methods (or leave_one_silo_out: false), or the comparison on a pool "
            "with aggregation: clear (benchmark data only)")


def available_methods(silos: Sequence[str], baselines: Sequence[str]) -> list[str]:
    """Every method the given silos and baseline models make possible, in report order."""
    return (["reference", "mor", "uniform"] + [f"single:{s}" for s in silos]
            + [b for b in BASELINE_MODELS if b in baselines] + ["oracle"])


def grpo_prompts(records: Sequence[VQARecord], per_kind: int | None) -> list[VQARecord]:
    """Kind-balanced GRPO prompts from the coordinator's public calibration questions.

    Calibration images are the ones every silo and the router have already
    encoded (calibration asks about them), so GRPO's reward calls start warm.
    """
    rarest = min(sum(r.kind == k for r in records) for k in {r.kind for r in records})
    return balanced_sample(records, rarest if per_kind is None else per_kind, seed=0)


def reward_pairwise_accuracy(reward: Callable[..., list[float]], pairs: Sequence[PreferencePair], *,
                             chunk: int = 256) -> dict[str, float]:
    """Share of pairs where the reward scores `chosen` strictly above `rejected`, per kind and overall (mean of kinds)."""
    hits: dict[str, list[bool]] = {}
    for start in range(0, len(pairs), chunk):
        part = list(pairs[start:start + chunk])
        responses = [p.chosen for p in part] + [p.rejected for p in part]
        columns = {"image_path": [str(p.image_path) for p in part] * 2, "question": [p.prompt for p in part] * 2,
                   "answer": [p.chosen for p in part] * 2}
        scores = reward(prompts=columns["question"], completions=responses, **columns)
        for pair, better in zip(part, [c > r for c, r in zip(scores[:len(part)], scores[len(part):])], strict=True):
            hits.setdefault(pair.kind, []).append(better)
    result = {kind: sum(h) / len(h) for kind in QUESTION_KINDS if (h := hits.get(kind))}
    result["overall"] = sum(result.values()) / len(result)
    return result


# Settings that do not change a finished run's result: runs for more seeds or methods can join earlier ones.
_SETTINGS_FREE_TO_CHANGE = {"seeds", "methods", "leave_one_silo_out"}


def run_inputs(reference_dir: Path, clients: Sequence[SiloClient], baselines: dict[str, SiloClient]) -> dict[str, Any]:
    """What runs are made from besides the settings: the reference policy's digest, the silos' and baselines' names.

    Silos are known by name only (`describe()` has no digest of a reward model). A reference that is not a
    checkpoint (yet) is recorded by its path: no run can be made from it, and no checkpoint matches it.
    """
    reference = checkpoint_digest(reference_dir) if (reference_dir / "config.json").is_file() else str(
        reference_dir.resolve())
    return {"reference_checkpoint": reference, "silos": [c.name for c in clients], "baseline_models": sorted(baselines)}


def _check_settings_match(out_dir: Path, config: EvaluationConfig, spec: ConsortiumSpec,
                          inputs: dict[str, Any]) -> None:
    """Refuse to reuse `out_dir`'s finished runs if they were made under other evaluation settings or inputs.

    The consortium is part of the settings: its splits decide which questions a
    run is trained, probed and scored on (resizing dev changes the test split).
    So are `run_inputs`: the policy GRPO starts from and the silos it asks.
    """
    record = out_dir / "evaluation_settings.json"
    settings = {**config.model_dump(mode="json", exclude=_SETTINGS_FREE_TO_CHANGE),
                "consortium": spec.model_dump(mode="json"), **inputs}
    if record.is_file():
        recorded = json.loads(record.read_text(encoding="utf-8"))
        changed = sorted(k for k in settings.keys() | recorded.keys() if settings.get(k) != recorded.get(k))
        if changed:
            raise ValueError(f"{out_dir} holds runs made with other evaluation settings or inputs (changed: "
                             f"{changed}); their results would be reused as if made with these. Use another --out, "
                             "or delete it.")
    out_dir.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")


class Evaluation:
    """One evaluation: the shared inputs, built once, and a run per (method, seed)."""

    def __init__(self, spec: ConsortiumSpec, clients: Sequence[SiloClient], reference_dir: str | Path,
                 out_dir: str | Path, config: EvaluationConfig, *, baselines: dict[str, SiloClient] | None = None,
                 feature_cache: str | Path | None = None, progress: bool = True,
                 fusion: Callable[..., Fusion] = ClearFusion, audit: AuditSink | None = None,
                 secure_aggregation: bool = False) -> None:
        """`secure_aggregation`: `fusion` sums securely (the pool's `secure_aggregation`), so a comparison that
        would fuse the test pairs under as many weightings as there are silos is refused here, before it runs."""
        self.spec, self.config, self.progress, self.fusion = spec, config, progress, fusion
        self.audit = audit  # the coordinator's log: calibration rounds are entries (fusion records GRPO's)
        self.clients = list(clients)
        self.baselines = dict(baselines or {})
        unknown = sorted(set(self.baselines) - set(BASELINE_MODELS))
        if unknown:
            raise ValueError(f"unknown baseline model(s) {unknown}; known: {list(BASELINE_MODELS)}")
        self.reference_dir = Path(reference_dir)
        self.out_dir = Path(out_dir)
        _check_settings_match(self.out_dir, config, spec, run_inputs(self.reference_dir, self.clients, self.baselines))
        possible = available_methods([c.name for c in self.clients], list(self.baselines))
        self.methods = list(config.methods) if config.methods is not None else possible
        missing = [m for m in self.methods if m not in possible]
        if missing:
            raise ValueError(f"method(s) {missing} cannot run with these inputs; possible: {possible} "
                             "(fedavg_rm / centralized_rm need their reward models)")
        if secure_aggregation:
            refuse_revealing_comparison(self.methods, config, spec, [c.name for c in self.clients])
        splits = make_splits(spec)
        self.calibration_records = list(splits.calibration)
        self.prompts = grpo_prompts(splits.calibration, config.prompts_per_kind)
        # Final reporting only: the test split is read by nothing that chooses settings.
        self.test = balanced_sample(splits.test, config.test_questions_per_kind, seed=1)
        self.test_pairs = list(make_pairs(balanced_sample(splits.test, config.pairwise_pairs_per_kind, seed=3),
                                          seed=spec.seed))
        # A probe (the in-training accuracy plots, looked at while tuning): the dev split, never test.
        self.dev_probe = balanced_sample(splits.dev, config.eval_questions_per_kind, seed=2)
        self.features = RouterFeatures(feature_cache)
        self._bits: dict[tuple[str, ...], CalibrationBits] = {}
        self._routers: dict[tuple[int, tuple[str, ...]], Any] = {}

    def bits(self, exclude_kinds: Sequence[str] | None = None) -> CalibrationBits:
        """The silos' calibration answers (asked once per set of excluded kinds, reused by every seed).

        `exclude_kinds=None` means the configured `calibration.exclude_kinds`.
        """
        if exclude_kinds is None:
            exclude_kinds = self.config.calibration.exclude_kinds
        key = tuple(sorted(exclude_kinds))
        if key not in self._bits:
            config = self.config.calibration.model_copy(update={"exclude_kinds": list(key)})
            self._bits[key] = collect_bits(self.clients, self.calibration_records, self.features, config,
                                           progress=self.progress, audit=self.audit)
        return self._bits[key]

    def router(self, seed: int, exclude_kinds: Sequence[str] | None = None) -> Any:
        """The router of this seed (its initialisation and batch order), trained on the shared bits."""
        if exclude_kinds is None:
            exclude_kinds = self.config.calibration.exclude_kinds
        key = (seed, tuple(sorted(exclude_kinds)))
        if key not in self._routers:
            config = self.config.calibration.router.model_copy(update={"seed": seed})
            self._routers[key] = fit_router(self.bits(exclude_kinds), config, progress=self.progress).router
        return self._routers[key]

    def reward(self, method: str, seed: int) -> Callable[..., list[float]]:
        """The reward of `method` as the silos and router give it (before the GRPO transforms)."""
        return method_reward(method, silos=self.clients, router=self.router(seed) if method == "mor" else None,
                             features=self.features, objective=self.config.objective, baselines=self.baselines,
                             fusion=self.fusion)

    def run(self, method: str, seed: int) -> RunResult:
        """GRPO under `method`'s reward (none for `reference`), then test-split accuracy; reused if already done.

        During GRPO the policy is probed on the dev split (`history`); the
        reported accuracy and pairwise accuracy read the test split.
        """
        run_dir = self.out_dir / "runs" / method.replace(":", "_") / f"seed-{seed}"
        result_path = run_dir / _RESULT_FILE
        if result_path.is_file():
            return RunResult(**json.loads(result_path.read_text(encoding="utf-8")))
        started = time.perf_counter()
        if method == "reference":
            policy, history, pairwise = self.reference_dir, [], None
        else:
            reward = self.reward(method, seed)
            pairwise = reward_pairwise_accuracy(reward, self.test_pairs)
            reward = grpo_reward(reward, vocabulary=answer_vocabulary(self.calibration_records),
                                 format_guard=self.config.format_guard, transform=self.config.reward_transform)
            settings = self.config.grpo_settings(run_dir / "grpo", seed)
            if not self.progress:  # the run's step bar (grpo.StepProgress) goes with the other bars
                settings = settings.model_copy(update={"trl_overrides": {**settings.trl_overrides,
                                                                         "disable_tqdm": True}})
            _, processor = load_vlm(self.reference_dir)
            callback = AccuracyCallback(processor, self.dev_probe, every=self.config.eval_every,
                                        samples=self.config.eval_samples)
            # A run interrupted after a checkpoint (transformers writes one at the last step, too) continues there.
            resumed = latest_checkpoint(settings.output_dir) is not None
            policy = train_grpo(self.reference_dir, self.prompts, reward, settings, resume=resumed,
                                callbacks=[callback])
            state = json.loads((settings.output_dir / "trainer_state.json").read_text(encoding="utf-8"))
            history = state["log_history"]
        model, processor = load_vlm(policy)
        accuracy = evaluate_answers(model, processor, self.test, samples=self.config.eval_samples, seed=seed)
        greedy = evaluate_answers(model, processor, self.test)
        result = RunResult(method=method, seed=seed, accuracy=accuracy, reward_pairwise_accuracy=pairwise,
                           history=history, seconds=round(time.perf_counter() - started, 1), greedy_accuracy=greedy)
        run_dir.mkdir(parents=True, exist_ok=True)
        result_path.write_text(json.dumps(result.__dict__, indent=2) + "\n", encoding="utf-8")
        return result

    def leave_one_silo_out(self) -> list[dict]:
        """Per silo: routing on its reliable kind when that kind was missing from calibration, vs full calibration.

        Reported, so scored on the test pairs.
        """
        seed = self.config.seeds[0]
        full = self.router(seed)
        test_features = self.features.encode([str(p.image_path) for p in self.test_pairs],
                                              [p.prompt for p in self.test_pairs])
        kinds = [p.kind for p in self.test_pairs]
        rows = []
        for silo in self.spec.silos:
            if silo.name not in full.silo_names:
                continue
            for kind in silo.reliable_kinds:
                # On top of the kinds the configured calibration already leaves out, or the two routers
                # would differ in more than the held-out kind.
                held_out = self.router(seed, exclude_kinds=sorted({*self.config.calibration.exclude_kinds, kind}))
                kind_pairs = [p for p in self.test_pairs if p.kind == kind]

                def fused_accuracy(router: Any, kind: str = kind, kind_pairs: list = kind_pairs) -> float:
                    # The pool's fusion, as every other method: on a secure pool these rounds are secure too.
                    reward = method_reward("mor", silos=self.clients, router=router, features=self.features,
                                           objective=self.config.objective, fusion=self.fusion,
                                           record_as=LEAVE_ONE_OUT_METHOD)
                    return reward_pairwise_accuracy(reward, kind_pairs)[kind]

                rows.append({
                    "held_out_silo": silo.name, "held_out_kind": kind,
                    "mean_weight": mean_weights_by_kind(held_out, test_features, kinds, self.config.objective)[kind],
                    "fused_pairwise_accuracy": round(fused_accuracy(held_out), 4),
                    "full_router_mean_weight":
                        mean_weights_by_kind(full, test_features, kinds, self.config.objective)[kind],
                    "full_router_pairwise_accuracy": round(fused_accuracy(full), 4),
                })
        return rows

    def routing_table(self) -> dict[str, dict[str, dict[str, float]]]:
        """objective -> kind -> silo -> mean weight of the first seed's router on the test pairs."""
        router = self.router(self.config.seeds[0])
        test_features = self.features.encode([str(p.image_path) for p in self.test_pairs],
                                             [p.prompt for p in self.test_pairs])
        kinds = [p.kind for p in self.test_pairs]
        return {objective: mean_weights_by_kind(router, test_features, kinds, objective)
                for objective in router.objective_names}

    def run_all(self, *, on_result: Callable[[RunResult], None] | None = None) -> list[RunResult]:
        results = []
        total = len(self.methods) * len(self.config.seeds)
        for seed in self.config.seeds:
            for method in self.methods:
                torch.manual_seed(seed)
                result = self.run(method, seed)
                results.append(result)
                # Always shown (not only with progress bars): a table takes over an hour.
                shown = " ".join(f"{k} {v:.3f}" for k, v in result.accuracy.items())
                print(f"[{len(results)}/{total}] {method} seed {seed} ({result.seconds:.0f}s): {shown}", flush=True)
                if on_result is not None:
                    on_result(result)
        return results


# The results file `mor demo table` publishes under docs/results/.
RESULTS_JSON = "mor_vs_baselines.json"
GENERATED_BEGIN = "<!-- generated by `mor coordinator evaluate`: begin -->"
GENERATED_END = "<!-- generated by `mor coordinator evaluate`: end -->"


def write_between_markers(path: Path, generated: str) -> None:
    """Write `generated` into `path`: between the markers if the file has them (prose around it is kept), else whole."""
    block = f"{GENERATED_BEGIN}\n{generated}{GENERATED_END}\n"
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    if GENERATED_BEGIN in text and GENERATED_END in text:
        head, rest = text.split(GENERATED_BEGIN, 1)
        block = head + block + rest.split(GENERATED_END, 1)[1].lstrip("\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(block, encoding="utf-8")


def publish(evaluation: Evaluation, runs: Sequence[RunResult], *, json_path: str | Path, markdown_path: str | Path,
            plots_prefix: str | Path, title: str = "MoR vs baselines") -> str:
    """Write the summary JSON, the Markdown table and the PNG plots; return the Markdown."""
    config = evaluation.config
    kinds = [k for k in QUESTION_KINDS if k in runs[0].accuracy]
    summary = summarise(runs, kinds)
    greedy_runs = [dataclasses.replace(r, accuracy=r.greedy_accuracy, reward_pairwise_accuracy=None) for r in runs]
    greedy = summarise(greedy_runs, kinds)
    extra: dict[str, Any] = {
        "metric": f"exact match of sampled answers (temperature 1, {config.eval_samples} per question); "
                  "`greedy` holds the same runs decoded greedily",
        "test_questions": len(evaluation.test),
        "grpo_steps": config.grpo_settings(evaluation.out_dir, 0).steps,  # settings name only what was set
        "greedy": {"methods": greedy["methods"]},
        "settings": config.model_dump(mode="json"),
        "routing": evaluation.routing_table(),
    }
    if config.leave_one_silo_out:
        extra["leave_one_silo_out"] = evaluation.leave_one_silo_out()
    json_path = write_results_json(summary, json_path, extra=extra)
    plots = plot_training_curves(runs, plots_prefix)
    markdown = render_results_page(json_path, Path(markdown_path), title=title)
    logger.info("wrote %s, %s and %s", json_path, markdown_path, ", ".join(str(p) for p in plots))
    return markdown


def render_results_page(json_path: Path, markdown_path: Path, *, title: str = "MoR vs baselines") -> str:
    """Write the tables of `json_path` (as `publish` wrote it) between the markers of `markdown_path`."""
    results = json.loads(json_path.read_text(encoding="utf-8"))
    markdown = results_page_markdown(results, json_name=json_path.name, title=title)
    write_between_markers(markdown_path, markdown)
    return markdown
