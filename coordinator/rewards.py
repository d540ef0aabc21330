"""Reward callables for TRL's `GRPOTrainer` (DESIGN §2.3): the fused Mixture-of-Rewards and its baselines.

TRL calls a reward function as `f(prompts=..., completions=..., **columns)`,
where `columns` are the training dataset's other columns, one value per
completion (each prompt row repeated `num_generations` times), plus a few
TRL extras (`completion_ids`, `trainer_state`, `log_metric`, ...). For
conversational prompts each completion is a list of messages
(`[{"role": "assistant", "content": "blue"}]`), otherwise a string. It logs
each function under its `__name__`.

Every silo-backed reward here is one class, `SiloMixtureReward`, that
differs only in where the weights w_k come from: the router (the method),
1/K (uniform baseline) or a single silo (single-silo baseline). The sum
R = sum_k w_k r_k is formed by a `coordinator.fusion.Fusion`: in the clear
(`ClearFusion`: tests, baselines, single-machine runs) or under secure
aggregation (DESIGN §4), without this module changing. Each silo is asked
ONCE per call with all of the step's completions: a round trip per row would
dominate a networked silo's cost, and silos' rate caps count calls.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from mor_secure.wire.client import SiloClient

from .answer_eval import normalise_answer
from .fusion import Fusion, FusionItems, as_fusion

# Reward of an empty (or whitespace-only) completion under a silo mixture. Silos
# refuse to score empty responses, and scores are standardised (mean 0, std 1 on
# the consortium's public calibration pairs), so -3 sits below nearly every real
# answer: an empty answer is never right, and the policy should learn to avoid it.
EMPTY_COMPLETION_REWARD = -3.0

# Router rows must sum to 1; allow float32 round-off.
_WEIGHT_SUM_TOLERANCE = 1e-4
# Scores this close count as a tie for the group's top answer (float32 round-off of equal answers).
_TIE_TOLERANCE = 1e-6


def completion_text(completion: Any) -> str:
    """The text of one TRL completion: a plain string, or the assistant messages' text joined."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and all(isinstance(m, dict) for m in completion):
        parts: list[str] = []
        for message in completion:
            if message.get("role", "assistant") != "assistant":
                continue
            content = message.get("content")
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, Sequence):
                parts.extend(p.get("text") or "" for p in content if isinstance(p, dict) and p.get("type") == "text")
            elif content is not None:
                raise TypeError("assistant message content must be a string or a list of parts, "
                                f"got {type(content).__name__}")
        return "".join(parts)
    raise TypeError(
        "a completion must be a string (plain prompts) or a list of message dicts (conversational prompts), "
        f"got {type(completion).__name__}"
    )


def completion_texts(completions: Sequence[Any]) -> list[str]:
    """`completion_text` of every completion."""
    if isinstance(completions, (str, bytes)) or not isinstance(completions, Sequence):
        raise TypeError(f"completions must be a list, got {type(completions).__name__}")
    return [completion_text(c) for c in completions]


def _column(kwargs: dict[str, Any], name: str, rows: int, reward_name: str) -> list[Any]:
    """Dataset column `name` as passed by TRL, checked to hold one value per completion."""
    if name not in kwargs or kwargs[name] is None:
        known = sorted(k for k in kwargs if k not in {"trainer_state", "log_extra", "log_metric", "completion_ids"})
        raise ValueError(
            f"{reward_name} needs the dataset column {name!r} (build the dataset with coordinator.grpo.grpo_dataset); "
            f"columns passed: {known}"
        )
    values = list(kwargs[name])
    if len(values) != rows:
        raise ValueError(f"{reward_name}: column {name!r} has {len(values)} values for {rows} completions; "
                         "expected one value per completion")
    return values


class ConstantReward:
    """The same reward for every completion: zero advantages, so a step costs generation + KL only (benchmarks)."""

    def __init__(self, value: float = 0.0) -> None:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ValueError(f"value must be a finite number, got {value!r}")
        self.value = float(value)
        self.__name__ = "constant_reward"

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        return [self.value] * len(completions)


class ExactMatchReward:
    """1.0 when the normalised completion equals the dataset's `answer`, else 0.0.

    The oracle ceiling: it reads ground truth no silo shares, so it bounds what
    any learned reward can reach on the same GRPO budget.
    """

    def __init__(self) -> None:
        self.__name__ = "exact_match_reward"

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        texts = completion_texts(completions)
        answers = _column(kwargs, "answer", len(texts), self.__name__)
        return [float(normalise_answer(t) == normalise_answer(str(a))) for t, a in zip(texts, answers, strict=True)]


class SiloMixtureReward:
    """R(x, y) = sum_k w_k(x) r_k(x, y) over the given silos; subclasses say where w comes from.

    `silos` is a `Fusion`, or a list of clients (fused in the clear). Needs
    the dataset columns `image_path` and `question` (what the silos and the
    router see). An empty completion is not sent to the silos (they refuse
    empty responses) and gets `empty_reward`.
    """

    def __init__(self, silos: Fusion | Sequence[SiloClient], *, name: str,
                 empty_reward: float = EMPTY_COMPLETION_REWARD) -> None:
        try:
            self.fusion = as_fusion(silos)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
        if not math.isfinite(empty_reward):
            raise ValueError(f"empty_reward must be finite, got {empty_reward!r}")
        self.empty_reward = float(empty_reward)
        self.__name__ = name

    @property
    def silo_names(self) -> tuple[str, ...]:
        """Silo names in column order of the weights and scores."""
        return self.fusion.silo_names

    def weights(self, images: Sequence[str], questions: Sequence[str]) -> torch.Tensor:
        """[N, K] weights, each row summing to 1, in `silo_names` order."""
        raise NotImplementedError

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        texts = completion_texts(completions)
        rows = len(texts)
        if len(prompts) != rows:
            raise ValueError(f"{self.__name__}: got {len(prompts)} prompts for {rows} completions; expected one each")
        if rows == 0:
            return []
        images = [str(p) for p in _column(kwargs, "image_path", rows, self.__name__)]
        questions = [str(q) for q in _column(kwargs, "question", rows, self.__name__)]

        with torch.no_grad():
            weights = self._checked_weights(self.weights(images, questions), rows)
        log_metric: Callable[[str, float], None] | None = kwargs.get("log_metric")
        if log_metric is not None:
            # The coordinator's own routing decision; never a silo's score (that stays secret, DESIGN §4).
            for k, silo in enumerate(self.silo_names):
                log_metric(f"router_weight/{silo}", weights[:, k].mean().item())

        answered = [i for i, t in enumerate(texts) if t.strip()]
        rewards = torch.full((rows,), self.empty_reward)
        if answered:
            kinds = kwargs.get("kind")
            items = FusionItems(images=tuple(images[i] for i in answered),
                                prompts=tuple(questions[i] for i in answered),
                                responses=tuple(texts[i].strip() for i in answered),
                                kinds=None if kinds is None or len(kinds) != rows else
                                tuple(str(kinds[i]) for i in answered))
            fused = self.fusion.fuse(items, weights[answered])
            if log_metric is not None:
                # Which silos answered this round (1/0): a silo that was down shows here, and its weight went
                # to the others (coordinator.fusion.renormalised).
                for silo, present in self.fusion.last_round.items():
                    log_metric(f"silo_answered/{silo}", float(present))
            if not isinstance(fused, torch.Tensor) or tuple(fused.shape) != (len(answered),):
                raise RuntimeError(f"{self.__name__}: fusion returned {getattr(fused, 'shape', type(fused))}, "
                                   f"expected [{len(answered)}]")
            if not torch.isfinite(fused).all():
                raise RuntimeError(f"{self.__name__}: fusion returned non-finite rewards")
            rewards[answered] = fused.float()
        return rewards.tolist()

    def _checked_weights(self, weights: torch.Tensor, rows: int) -> torch.Tensor:
        expected = (rows, len(self.silo_names))
        if not isinstance(weights, torch.Tensor) or tuple(weights.shape) != expected:
            shape = tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__
            raise RuntimeError(f"{self.__name__}: weights have shape {shape}, expected {expected} "
                               "(one row per completion, one column per silo)")
        weights = weights.detach().float().cpu()
        if not torch.isfinite(weights).all() or (weights < 0).any():
            raise RuntimeError(f"{self.__name__}: weights must be finite and non-negative")
        if ((weights.sum(dim=1) - 1).abs() > _WEIGHT_SUM_TOLERANCE).any():
            raise RuntimeError(f"{self.__name__}: each row of weights must sum to 1 (a convex mixture of silos)")
        return weights


class UniformSiloReward(SiloMixtureReward):
    """Baseline: the plain average of the silos' scores (w_k = 1/K everywhere)."""

    def __init__(self, silos: Fusion | Sequence[SiloClient], *, empty_reward: float = EMPTY_COMPLETION_REWARD) -> None:
        super().__init__(silos, name="uniform_silo_reward", empty_reward=empty_reward)

    def weights(self, images: Sequence[str], questions: Sequence[str]) -> torch.Tensor:
        silos = len(self.silo_names)
        return torch.full((len(images), silos), 1.0 / silos)


class SingleSiloReward(UniformSiloReward):
    """Baseline: one silo's score alone (a mixture of one)."""

    def __init__(self, silo: Fusion | SiloClient, *, empty_reward: float = EMPTY_COMPLETION_REWARD) -> None:
        super().__init__(silo if isinstance(silo, Fusion) else [silo], empty_reward=empty_reward)
        if len(self.silo_names) != 1:
            raise ValueError(f"a single-silo reward needs one silo, got {list(self.silo_names)}")
        self.__name__ = f"single_silo_reward/{self.silo_names[0]}"


class FusedSiloReward(SiloMixtureReward):
    """The method: router weights w(x) = g(features(image, question), objective), fused over the silos.

    `silos` is a `Fusion` over the router's silos (in its order), or a list
    of clients in any order, matched to the router's silos by name. `router` needs `.silo_names`, `.objective_names`, `.objective_id(name)` and
    `.weights(features, objective_ids)`; `features` needs `.encode(images,
    prompts)` (e.g. `coordinator.router.RouterFeatures`). Weights are
    computed once per distinct (image, question) in a call, not once per
    completion, since a step holds each prompt `num_generations` times.
    """

    def __init__(self, silos: Fusion | Sequence[SiloClient], router: Any, features: Any, *, objective: str,
                 empty_reward: float = EMPTY_COMPLETION_REWARD) -> None:
        router_silos = list(router.silo_names)
        if isinstance(silos, Fusion):
            if list(silos.silo_names) != router_silos:
                raise ValueError(f"the fusion's silos {list(silos.silo_names)} must be the router's silos "
                                 f"{router_silos}, in that order")
        else:
            clients = list(silos)
            by_name = {c.name: c for c in clients}
            missing = [s for s in router_silos if s not in by_name]
            extra = [s for s in by_name if s not in router_silos]
            if missing or extra or len(by_name) != len(clients):
                raise ValueError(
                    f"the silo clients must be exactly the router's silos {router_silos}; "
                    f"missing clients: {missing}, clients the router does not know: {extra}"
                )
            silos = [by_name[s] for s in router_silos]
        super().__init__(silos, name="fused_silo_reward", empty_reward=empty_reward)
        if objective not in router.objective_names:
            raise ValueError(f"unknown objective {objective!r}; the router knows {list(router.objective_names)}")
        self.router = router
        self.features = features
        self.objective = objective
        self._objective_id = int(router.objective_id(objective))

    def weights(self, images: Sequence[str], questions: Sequence[str]) -> torch.Tensor:
        keys = list(zip(images, questions, strict=True))
        distinct = list(dict.fromkeys(keys))
        row_of = {key: i for i, key in enumerate(distinct)}
        features = self.features.encode([i for i, _ in distinct], [q for _, q in distinct])
        if not isinstance(features, torch.Tensor) or features.dim() != 2 or features.shape[0] != len(distinct):
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise RuntimeError(f"router features have shape {shape}, expected [{len(distinct)}, F] "
                               "(one row per distinct image and question)")
        objective_ids = torch.full((len(distinct),), self._objective_id, dtype=torch.long)
        distinct_weights = self.router.weights(features, objective_ids)
        distinct_weights = self._checked_weights(distinct_weights, len(distinct))
        return distinct_weights[torch.tensor([row_of[k] for k in keys], dtype=torch.long)]


def _wrapped_name(reward: Callable[..., list[float]], suffix: str) -> str:
    """The name TRL logs for a reward wrapped by a transform: "<inner name>/<suffix>"; checks it is callable."""
    if not callable(reward):
        raise ValueError(f"reward must be callable, got {type(reward).__name__}")
    return f"{getattr(reward, '__name__', type(reward).__name__)}/{suffix}"


class GroupTopReward:
    """Wraps a reward: 1.0 for the completions a prompt's group scores highest, 0.0 for the rest.

    Why: a Bradley-Terry reward model is trained to rank answers, so only its
    ranking within one prompt is meaningful, not how far apart two wrong
    answers score. Keeping only the group's winner turns a reward that ranks
    well into what the exact-match oracle gives whenever the right answer is
    among the samples. It is not enough on its own: when the right answer is
    missing, the reward's favourite wrong answer still wins. On the demo, a
    policy that cannot tell the shapes apart answered "circle" to 71% of
    shape questions under the raw fused score and still collapsed under this
    transform at beta 0.04; with beta 0.2 the KL keeps the right answer among
    the samples (docs/grpo.md). Groups are the completions of one (image,
    question) in a call; ties all win.

    Rows the wrapped reward floored (an `OnFormatReward`: its `on_format`
    says which) never win: they get 0 and do not count for the group's top.
    A floored answer's score is a constant, not a ranking, and it would
    otherwise win whenever every real answer scored below the floor.
    """

    def __init__(self, reward: Callable[..., list[float]]) -> None:
        self.reward = reward
        self.eligible: Callable[..., list[bool]] | None = getattr(reward, "on_format", None)
        self.__name__ = _wrapped_name(reward, "group_top")

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        scores = self.reward(prompts, completions, **kwargs)
        rows = len(scores)
        images = _column(kwargs, "image_path", rows, self.__name__)
        questions = _column(kwargs, "question", rows, self.__name__)
        eligible = [True] * rows if self.eligible is None else self.eligible(completions, **kwargs)
        keys = list(zip(map(str, images), map(str, questions)))
        best: dict[tuple[str, str], float] = {}
        for key, score, may_win in zip(keys, scores, eligible, strict=True):
            if may_win:
                best[key] = max(best.get(key, -math.inf), score)
        return [float(may_win and score >= best[key] - _TIE_TOLERANCE)
                for key, score, may_win in zip(keys, scores, eligible, strict=True)]


def answer_vocabulary(records: Sequence[Any]) -> dict[str, frozenset[str]]:
    """{question kind: the normalised answers seen for it} from public records (e.g. the calibration split)."""
    vocabulary: dict[str, set[str]] = {}
    for record in records:
        vocabulary.setdefault(record.kind, set()).add(normalise_answer(record.answer))
    return {kind: frozenset(answers) for kind, answers in vocabulary.items()}


class OnFormatReward:
    """Wraps a reward: `floor` for answers outside the public answer vocabulary of their question's kind.

    Why: a silo's preference pairs always pit two answers of the question's
    kind against each other (a plausible wrong answer as rejected), so its
    reward model has never seen an off-topic or malformed answer and scores
    one arbitrarily. Measured on the demo (labels of a silo's other kinds are
    coin flips): with bank-b's reward behind 0.91 of the router weight on
    colour, GRPO taught the policy to answer colour questions with empty
    strings and byte fragments (colour accuracy 0.001), and under the uniform
    average 30% of all answers were byte fragments. Every method's reward is
    wrapped alike, so the comparison stays fair; the vocabulary is public (the
    coordinator's calibration answers per kind) and says nothing about which
    answer is right. Rows are matched to kinds by the dataset's `kind` column.

    The wrapped reward is given each completion's answer, exactly what the
    guard checked (`normalise_answer`: first word, lower-cased, without
    surrounding punctuation; the answer that accuracy and the oracle read),
    and "" for a floored one (not sent to the silos): "red zq!" is scored as
    "red", and a silo never scores text outside the vocabulary.
    """

    def __init__(self, reward: Callable[..., list[float]], vocabulary: dict[str, frozenset[str]], *,
                 floor: float = EMPTY_COMPLETION_REWARD) -> None:
        name = _wrapped_name(reward, "on_format")
        if not vocabulary or not all(vocabulary.values()):
            raise ValueError("the answer vocabulary is empty for some kind: build it with answer_vocabulary(records) "
                             "from records that cover every question kind")
        self.reward, self.vocabulary, self.floor = reward, vocabulary, floor
        self.__name__ = name

    def on_format(self, completions: Sequence[Any], **kwargs: Any) -> list[bool]:
        """Per completion: is its answer in the vocabulary of its question's kind (else it is floored)?"""
        return [answer in self.vocabulary[kind] for answer, kind in self._answers_and_kinds(completions, kwargs)]

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        checked = [(answer, answer in self.vocabulary[kind])
                   for answer, kind in self._answers_and_kinds(completions, kwargs)]
        scores = self.reward(prompts, [answer if ok else "" for answer, ok in checked], **kwargs)
        return [score if ok else self.floor for score, (_, ok) in zip(scores, checked, strict=True)]

    def _answers_and_kinds(self, completions: Sequence[Any], columns: dict[str, Any]) -> list[tuple[str, str]]:
        texts = completion_texts(completions)
        kinds = [str(k) for k in _column(columns, "kind", len(texts), self.__name__)]
        unknown = sorted(set(kinds) - set(self.vocabulary))
        if unknown:
            raise ValueError(f"{self.__name__}: no answer vocabulary for kind(s) {unknown}; "
                             f"it has {sorted(self.vocabulary)}")
        return [(normalise_answer(text), kind) for text, kind in zip(texts, kinds, strict=True)]
