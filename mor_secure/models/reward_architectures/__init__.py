"""The reward-model architectures; importing this package registers them all.

Heterogeneity across silos is the point of MoR: each silo picks one.
- `lora_vlm`: LoRA adapters (PEFT) on the shared VLM backbone + scalar head.
- `frozen_encoders`: frozen EfficientNet-Lite0 + MiniLM, small DP-trained head.
- `small_cnn`: a small CNN and word embeddings trained from scratch.
"""

from .frozen_encoders import FrozenEncoderRewardModel
from .lora_vlm import LoraVLMRewardModel
from .small_cnn import SmallCNNRewardModel

__all__ = ["FrozenEncoderRewardModel", "LoraVLMRewardModel", "SmallCNNRewardModel"]
