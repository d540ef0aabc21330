"""The Mixture-of-Rewards router: per input, how much to trust each silo (DESIGN §2.2).

Shape (after ArmoRM's gating network): frozen features of (image, prompt)
concatenated with a learned embedding of the objective, a small MLP, and a
temperature-scaled softmax over silos. Training signal (after
BayesianRouter's "RM k is correct" head): for each calibration pair and each
silo, one bit saying whether that silo ranked the pair right; the MLP's k-th
output is the log-odds of that bit, trained with binary cross-entropy. Silos
that are right more often on an input get larger logits and hence more weight.

A silo may answer its bits through randomized response (flip probability
p_k). Fitting the noisy bits directly would shrink every logit towards 0 (a
silo right 100% of the time would look right only 1 - p_k of the time), so
the likelihood is forward-corrected: P(report 1) = q (1 - p_k) + (1 - q) p_k
with q = sigmoid(logit), and q keeps the meaning "the silo is truly right".

The fused reward R(x, y) = sum_k w_k(x) r_k(x, y) is formed by a `Fusion`
(coordinator/fusion.py): each silo pre-weights its own scores and the sum
happens in the clear or under secure aggregation (DESIGN §4).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from pydantic import Field
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from mor_secure.config import StrictModel
from mor_secure.models.encoders import (
    EFFICIENTNET_FEATURES,
    MINILM_FEATURES,
    ImageFeatureEncoder,
    TextFeatureEncoder,
)

ROUTER_FEATURE_DIM = EFFICIENTNET_FEATURES + MINILM_FEATURES
WEIGHTS_FILE = "router.safetensors"
MANIFEST_FILE = "router.json"
_FORMAT_VERSION = 1


class RouterConfig(StrictModel):
    """Size and training schedule of the router."""

    hidden: int = Field(default=128, gt=0, description="Width of the MLP's hidden layer.")
    objective_dim: int = Field(default=16, gt=0, description="Size of the learned objective-id embedding.")
    temperature: float = Field(
        default=0.5,
        gt=0.0,
        allow_inf_nan=False,
        description=(
            "Softmax temperature over silos (> 0): weights = softmax(logits / temperature); "
            "lower is sharper, higher is closer to a uniform average."
        ),
    )
    epochs: int = Field(default=200, gt=0, description="Passes over the calibration bits.")
    learning_rate: float = Field(default=3e-3, gt=0.0, allow_inf_nan=False, description="AdamW learning rate.")
    weight_decay: float = Field(
        default=1e-4, ge=0.0, allow_inf_nan=False,
        description="AdamW weight decay; keeps logits finite when some silo is always right or always wrong.",
    )
    batch_size: int = Field(default=256, gt=0, description="Calibration rows per optimisation step.")
    seed: int = Field(default=0, description="Seed of initialisation and shuffling; same seed, same router.")


class RouterFeatures:
    """The coordinator's frozen encoder of (image, prompt): [N, 1280 + 384] features.

    Image features are L2-normalised so both halves have unit norm: raw
    EfficientNet features have norm ~12.6 and would otherwise drown the
    prompt, which is what mostly says which silo to trust.
    """

    feature_dim = ROUTER_FEATURE_DIM

    def __init__(self, cache_dir: str | Path | None = None) -> None:
        self.image_encoder = ImageFeatureEncoder(cache_dir)
        self.text_encoder = TextFeatureEncoder()

    def encode(self, images: Sequence[str | Path], prompts: Sequence[str], *, progress: bool = False) -> torch.Tensor:
        """concat(L2-normalised image features, MiniLM prompt embedding), one row per (image, prompt)."""
        if len(images) != len(prompts):
            raise ValueError(f"images and prompts must have one entry per row, got {len(images)} and {len(prompts)}")
        image_features = F.normalize(self.image_encoder.encode(list(images), progress=progress), dim=-1)
        return torch.cat([image_features, self.text_encoder.encode(list(prompts))], dim=-1)


class Router(nn.Module):
    """g(features, objective) -> K logits, the log-odds that silo k ranks this input right."""

    def __init__(self, feature_dim: int, n_silos: int, n_objectives: int, config: RouterConfig, *,
                 silo_names: Sequence[str] | None = None, objective_names: Sequence[str] | None = None) -> None:
        super().__init__()
        for label, value in (("feature_dim", feature_dim), ("n_silos", n_silos), ("n_objectives", n_objectives)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{label} must be a positive integer, got {value!r}")
        if not isinstance(config, RouterConfig):
            raise ValueError(f"config must be a RouterConfig, got {type(config).__name__}")
        self.feature_dim = feature_dim
        self.n_silos = n_silos
        self.n_objectives = n_objectives
        self.config = config
        self.silo_names = _names(silo_names, n_silos, "silo_names", "silo")
        self.objective_names = _names(objective_names, n_objectives, "objective_names", "objective")
        self.objective_embedding = nn.Embedding(n_objectives, config.objective_dim)
        self.mlp = nn.Sequential(
            nn.Linear(feature_dim + config.objective_dim, config.hidden),
            nn.ReLU(),
            nn.Linear(config.hidden, n_silos),
        )

    def objective_id(self, name: str) -> int:
        """Index of the objective called `name`; KeyError naming the known ones otherwise."""
        try:
            return self.objective_names.index(name)
        except ValueError:
            raise KeyError(f"no objective {name!r}; known objectives: {list(self.objective_names)}") from None

    def forward(self, features: torch.Tensor, objective_ids: torch.Tensor) -> torch.Tensor:
        """Logits [N, K]."""
        self._check_inputs(features, objective_ids)
        features = features.to(self.objective_embedding.weight.dtype)
        return self.mlp(torch.cat([features, self.objective_embedding(objective_ids.long())], dim=-1))

    def weights(self, features: torch.Tensor, objective_ids: torch.Tensor) -> torch.Tensor:
        """softmax(logits / temperature) over silos: [N, K], each row sums to 1."""
        return torch.softmax(self(features, objective_ids) / self.config.temperature, dim=-1)

    def _check_inputs(self, features: torch.Tensor, objective_ids: torch.Tensor) -> None:
        if not isinstance(features, torch.Tensor) or features.dim() != 2 or features.shape[1] != self.feature_dim:
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"features must be a [N, {self.feature_dim}] tensor, got {shape}")
        if not features.is_floating_point():
            raise ValueError(f"features must be floating point, got {features.dtype}")
        if (not isinstance(objective_ids, torch.Tensor) or objective_ids.dim() != 1
                or objective_ids.shape[0] != features.shape[0]):
            shape = (tuple(objective_ids.shape) if isinstance(objective_ids, torch.Tensor)
                     else type(objective_ids).__name__)
            raise ValueError(f"objective_ids must be a [N={features.shape[0]}] tensor, got {shape}")
        if objective_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"objective_ids must be an integer tensor (torch.long), got {objective_ids.dtype}")
        if objective_ids.numel() and (objective_ids.min() < 0 or objective_ids.max() >= self.n_objectives):
            raise ValueError(
                f"objective_ids must be in [0, {self.n_objectives}) (objectives {list(self.objective_names)}), "
                f"got values in [{objective_ids.min().item()}, {objective_ids.max().item()}]"
            )


def train_router(
    features: torch.Tensor,
    objective_ids: torch.Tensor,
    bits: torch.Tensor,
    *,
    silo_names: Sequence[str],
    objective_names: Sequence[str],
    config: RouterConfig,
    flip_probabilities: Sequence[float] | None = None,
    progress: bool = False,
) -> Router:
    """Fit a router to per-silo correctness bits [N, K] with (forward-corrected) BCE per silo.

    `flip_probabilities[k]` is the randomized-response flip probability of
    silo k's bits (0 for exact bits; None means all exact). Deterministic for
    a given `config.seed`; the global RNG is left as it was.
    """
    silo_names, objective_names = list(silo_names), list(objective_names)
    n_silos, n_objectives = len(silo_names), len(objective_names)
    if not isinstance(features, torch.Tensor) or features.dim() != 2 or features.shape[0] == 0:
        raise ValueError(f"features must be a non-empty [N, D] tensor, got "
                         f"{tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__}")
    if not features.is_floating_point() or not torch.isfinite(features).all():
        raise ValueError("features must be finite floating-point values")
    rows = features.shape[0]
    if not isinstance(bits, torch.Tensor) or bits.dtype != torch.bool or tuple(bits.shape) != (rows, n_silos):
        described = f"{tuple(bits.shape)} {bits.dtype}" if isinstance(bits, torch.Tensor) else type(bits).__name__
        raise ValueError(f"bits must be a bool tensor of shape [N={rows}, K={n_silos}] (one column per silo "
                         f"in silo_names), got {described}")
    flips = _flip_tensor(flip_probabilities, n_silos)

    # manual_seed seeds every CUDA device too: fork them all, or GRPO's sampling continues from this seed.
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
        torch.manual_seed(config.seed)
        router = Router(features.shape[1], n_silos, n_objectives, config,
                        silo_names=silo_names, objective_names=objective_names)
    router._check_inputs(features, objective_ids)
    features = features.float()
    objective_ids = objective_ids.long()
    targets = bits.float()
    generator = torch.Generator().manual_seed(config.seed)
    optimiser = torch.optim.AdamW(router.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)

    router.train()
    bar = tqdm(range(config.epochs), desc="router", unit="epoch", disable=not progress)
    for _ in bar:
        order = torch.randperm(rows, generator=generator)
        total = 0.0
        for start in range(0, rows, config.batch_size):
            index = order[start:start + config.batch_size]
            loss = corrected_bce(router(features[index], objective_ids[index]), targets[index], flips)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += loss.item() * len(index)
        bar.set_postfix(loss=f"{total / rows:.4f}")
    return router.eval()


def corrected_bce(logits: torch.Tensor, reported: torch.Tensor, flip_probabilities: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of reported bits when bit k was flipped with probability p_k.

    P(report 1) = (1 - p) sigmoid(x) + p sigmoid(-x), evaluated as a
    log-sum-exp of log-sigmoids so that it stays finite for any logit; with
    p = 0 it is exactly `binary_cross_entropy_with_logits`.
    """
    log_keep, log_flip = torch.log1p(-flip_probabilities), torch.log(flip_probabilities)
    log_right, log_wrong = F.logsigmoid(logits), F.logsigmoid(-logits)
    log_one = torch.logaddexp(log_keep + log_right, log_flip + log_wrong)
    log_zero = torch.logaddexp(log_flip + log_right, log_keep + log_wrong)
    return -(reported * log_one + (1.0 - reported) * log_zero).mean()


def save_router(router: Router, directory: str | Path) -> Path:
    """Write weights (safetensors) and a JSON manifest (config, names, dimensions) to `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in router.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE))
    manifest = {
        "format_version": _FORMAT_VERSION,
        "feature_dim": router.feature_dim,
        "n_silos": router.n_silos,
        "n_objectives": router.n_objectives,
        "silo_names": list(router.silo_names),
        "objective_names": list(router.objective_names),
        "config": router.config.model_dump(),
    }
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return directory


def load_router(directory: str | Path) -> Router:
    """Rebuild a router written by `save_router`, in eval mode."""
    directory = Path(directory)
    manifest_path, weights_path = directory / MANIFEST_FILE, directory / WEIGHTS_FILE
    for path in (manifest_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{directory}: no {path.name}; not a saved router")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if manifest.get("format_version") != _FORMAT_VERSION:
            raise ValueError(f"format_version {manifest.get('format_version')!r}, expected {_FORMAT_VERSION}")
        router = Router(manifest["feature_dim"], manifest["n_silos"], manifest["n_objectives"],
                        RouterConfig.model_validate(manifest["config"]),
                        silo_names=manifest["silo_names"], objective_names=manifest["objective_names"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{manifest_path}: invalid router manifest: {exc}") from exc
    router.load_state_dict(load_file(str(weights_path)))
    return router.eval()


def _names(names: Sequence[str] | None, count: int, label: str, stem: str) -> tuple[str, ...]:
    if names is None:
        return tuple(f"{stem}-{i}" for i in range(count))
    if isinstance(names, str):
        raise ValueError(f"{label} must be a sequence of names, not one string {names!r}")
    names = tuple(names)
    if len(names) != count:
        raise ValueError(f"{label} has {len(names)} names, expected {count}")
    if any(not isinstance(n, str) or not n.strip() for n in names):
        raise ValueError(f"{label} must be non-empty strings, got {list(names)}")
    if len(set(names)) != len(names):
        raise ValueError(f"{label} must be unique, got {list(names)}")
    return names


def _flip_tensor(flip_probabilities: Sequence[float] | None, n_silos: int) -> torch.Tensor:
    if flip_probabilities is None:
        return torch.zeros(n_silos)
    values = list(flip_probabilities)
    if len(values) != n_silos:
        raise ValueError(f"flip_probabilities has {len(values)} entries, expected one per silo ({n_silos})")
    for k, p in enumerate(values):
        # p = 1/2 makes the reported bit independent of the truth: nothing to learn from it.
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (math.isfinite(p) and 0.0 <= p < 0.5):
            raise ValueError(f"flip_probabilities[{k}] must be in [0, 0.5), got {p!r}")
    return torch.tensor(values, dtype=torch.float32)
