"""Models: the tiny VLM builder, frozen encoders and the silo reward-model architectures."""

from .reward_model import RewardModel, Standardisation, architectures, load_reward_model
from .tiny_vlm import TinyVLMConfig, build_tiny_vlm, load_vlm

__all__ = ["RewardModel", "Standardisation", "TinyVLMConfig", "architectures", "build_tiny_vlm",
           "load_reward_model", "load_vlm"]
