"""One place that turns a method name into the reward GRPO trains under, for `align` and `evaluate` alike.

`method_reward` gives the method's own reward (what `evaluate` scores for
pairwise accuracy); `grpo_reward` adds the transforms every method gets alike
(format guard, then group-top), so a policy aligned with `mor coordinator
align --reward mor` is trained under exactly the reward `docs/results.md`
reports for `mor`. Methods:

- ``mor``: the router's fused reward (needs a router and its features);
- ``uniform``: the plain average of the silos' scores;
- ``single:<silo>``: one silo's reward model alone;
- a baseline model's name (``fedavg_rm``, ``centralized_rm``): that model alone;
- ``oracle``: exact match against the ground truth (the ceiling of any reward).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from mor_secure.wire.client import SiloClient

from .fusion import ClearFusion, Fusion
from .rewards import (
    ExactMatchReward,
    FusedSiloReward,
    GroupTopReward,
    OnFormatReward,
    SingleSiloReward,
    UniformSiloReward,
)

Reward = Callable[..., list[float]]
RewardTransform = Literal["group_top", "score"]


def method_reward(method: str, *, silos: Sequence[SiloClient], router: Any = None, features: Any = None,
                  objective: str = "correct", baselines: Mapping[str, SiloClient] | None = None,
                  fusion: Callable[..., Fusion] = ClearFusion, record_as: str | None = None) -> Reward:
    """The reward of `method` as the silos (and router) give it, before the GRPO transforms.

    `fusion(clients, objective=..., method=...)` builds how the weighted sum over silos
    is formed (in the clear by default; secure aggregation plugs in here);
    every method asks the silos under `objective`. Its rounds are recorded under
    `record_as` (default: `method`), e.g. so that an experiment's routers are not
    counted as the deployed router's.
    """
    label = record_as or method
    silos = list(silos)
    baselines = dict(baselines or {})
    by_name = {c.name: c for c in silos}
    if method == "oracle":
        return ExactMatchReward()
    if method == "mor":
        if router is None or features is None:
            raise ValueError("method mor needs a router and its features (write a router with "
                             "`mor coordinator train-router`)")
        ordered = [by_name[s] for s in router.silo_names if s in by_name]
        if len(ordered) != len(router.silo_names) or len(ordered) != len(silos):
            raise ValueError(f"the pool's silos {sorted(by_name)} must be exactly the router's silos "
                             f"{list(router.silo_names)}")
        return FusedSiloReward(fusion(ordered, objective=objective, method=label), router, features, objective=objective)
    if method == "uniform":
        return UniformSiloReward(fusion(silos, objective=objective, method=label))
    if method.startswith("single:"):
        name = method.removeprefix("single:")
        if name not in by_name:
            raise ValueError(f"unknown silo {name!r} in method {method!r}; the pool has {sorted(by_name)}")
        return SingleSiloReward(fusion([by_name[name]], objective=objective, method=label))
    if method in baselines:
        return SingleSiloReward(fusion([baselines[method]], objective=objective, method=label))
    known = ["mor", "uniform", *(f"single:{s}" for s in by_name), *baselines, "oracle"]
    raise ValueError(f"unknown method {method!r}; known: {known}")


def grpo_reward(reward: Reward, *, vocabulary: Mapping[str, frozenset[str]] | None, format_guard: bool = True,
                transform: RewardTransform = "group_top") -> Reward:
    """`reward` as GRPO receives it: floored outside the public answer vocabulary, then group-top.

    Both are applied to every method alike (coordinator.rewards explains why
    each is needed); `format_guard=False` or `transform="score"` turn them off.
    """
    if format_guard:
        if vocabulary is None:
            raise ValueError("the format guard needs the public answer vocabulary (rewards.answer_vocabulary)")
        reward = OnFormatReward(reward, dict(vocabulary))
    if transform == "group_top":
        reward = GroupTopReward(reward)
    elif transform != "score":
        raise ValueError(f"unknown reward transform {transform!r}; use group_top or score")
    return reward
