"""Model state that DP-SGD does not protect: buffers training changes outside the gradients.

Opacus privatises gradients only, and its validators look at trainable layers
(`ModuleValidator`, `GradSampleModule.validate`). A *frozen* BatchNorm left in
training mode still moves its running mean and variance with every private
batch, unclipped and without noise, and those buffers ship with the model: a
reader of the weights sees statistics of the private data that no epsilon
covers. Such layers are refused before the first step; any other buffer that
changes during a run is put back and the run fails, so no such model leaves.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase


def running_statistics_problems(model: nn.Module) -> list[str]:
    """One reason per layer that would update running statistics from private batches (in training mode)."""
    return [
        f"{name or 'the model'} ({type(module).__name__}) updates its running statistics from every private batch "
        "in training mode, without clipping or noise, though its weights are frozen: keep it in eval mode (override "
        "the model's train()) or build it with track_running_stats=False"
        for name, module in model.named_modules()
        if isinstance(module, _NormBase) and module.track_running_stats and module.training
    ]


class BufferSnapshot:
    """The model's buffers as they were before training, to tell whether a run changed any."""

    def __init__(self, model: nn.Module) -> None:
        self._model = model
        self._saved = {name: buffer.detach().clone() for name, buffer in model.named_buffers()}

    def restore_changed(self) -> list[str]:
        """Names of the buffers the run changed, added or removed; each is put back as it was."""
        current = dict(self._model.named_buffers())
        changed = sorted(name for name in current.keys() | self._saved.keys()
                         if name not in current or name not in self._saved
                         or not torch.equal(current[name], self._saved[name]))
        for name in changed:
            owner_name, _, attribute = name.rpartition(".")
            owner = self._model.get_submodule(owner_name)
            if name not in self._saved:
                delattr(owner, attribute)
            elif name in current:  # assigning keeps the buffer's persistence
                setattr(owner, attribute, self._saved[name])
            else:
                owner.register_buffer(attribute, self._saved[name])
        return changed
