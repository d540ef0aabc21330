"""Model state that DP-SGD does not protect: what training changes outside the gradients.

Opacus privatises gradients only, and its validators look at trainable layers
(`ModuleValidator`, `GradSampleModule.validate`). A *frozen* BatchNorm left in
training mode still moves its running mean and variance with every private
batch, unclipped and without noise, and those buffers ship with the model: a
reader of the weights sees statistics of the private data that no epsilon
covers. Such layers are refused before the first step. Any other buffer that
changes during a run is put back, whether the run ends or fails, and a run
that ended fails; a frozen parameter that changes (a forward pass writing
into it) is named, and the run fails too.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase


def running_statistics_problems(model: nn.Module) -> list[str]:
    """One reason per layer that would update running statistics from private batches (in training mode)."""
    return [
        f"{name or 'the model'} ({type(module).__name__}) updates its running statistics from every private batch "
        "in training mode, without clipping or noise, whether or not its weights train: keep it in eval mode (override "
        "the model's train()) or build it with track_running_stats=False"
        for name, module in model.named_modules()
        if isinstance(module, _NormBase) and module.track_running_stats and module.training
    ]


class FrozenStateSnapshot:
    """A model's buffers (copied, to be put back) and frozen parameters (digests) as they were before training.

    Every layer's own buffers are kept, shared ones included (named_buffers()
    would list a buffer two layers share once, and only one of them would be
    put back), with their persistence (whether state_dict saves them).
    """

    def __init__(self, model: nn.Module) -> None:
        self._model = model
        copies: dict[int, torch.Tensor] = {}  # a buffer two layers share is put back shared
        self._buffers: dict[tuple[str, str], tuple[torch.Tensor, bool]] = {}
        for path, module in model.named_modules(remove_duplicate=False):
            for name, buffer in _own_buffers(module).items():
                if buffer is not None and id(buffer) not in copies:
                    copies[id(buffer)] = buffer.detach().clone()
                # torch has no public view of a buffer's persistence but this set (Module.register_buffer's).
                self._buffers[(path, name)] = (copies.get(id(buffer)) if buffer is not None else None,
                                               name not in module._non_persistent_buffers_set)
        self._frozen = {name: _digest(parameter)
                        for name, parameter in model.named_parameters(remove_duplicate=False)
                        if not parameter.requires_grad}

    def restore_changed(self) -> list[str]:
        """What the run changed: buffers changed, added or removed (each put back as it was), then frozen
        parameters changed (named with "(frozen parameter)"; these cannot be put back)."""
        current = {(path, name): buffer for path, module in self._model.named_modules(remove_duplicate=False)
                   for name, buffer in _own_buffers(module).items()}
        changed = []
        for key in sorted(current.keys() | self._buffers.keys()):
            saved = self._buffers.get(key)
            if saved is not None and key in current and _same(saved[0], current[key]):
                continue
            path, name = key
            changed.append(f"{path}.{name}" if path else name)
            owner = self._model.get_submodule(path)
            if saved is None:
                delattr(owner, name)
            else:
                owner.register_buffer(name, saved[0], persistent=saved[1])
        frozen_now = dict(self._model.named_parameters(remove_duplicate=False))
        changed += [f"{name} (frozen parameter)" for name, digest in self._frozen.items()
                    if name not in frozen_now or _digest(frozen_now[name]) != digest]
        return changed


def _own_buffers(module: nn.Module) -> dict[str, torch.Tensor | None]:
    """The layer's buffer slots, a None one included (named_buffers() skips it; a run that fills it changed it)."""
    return dict(module._buffers)


def _same(before: torch.Tensor | None, after: torch.Tensor | None) -> bool:
    """Equal in shape, type and every value, a NaN matching a NaN (a constant NaN buffer is unchanged)."""
    if before is None or after is None:
        return before is after
    if before.shape != after.shape or before.dtype != after.dtype or before.device != after.device:
        return False
    if torch.equal(before, after):
        return True
    return (before.is_floating_point() and torch.equal(before.isnan(), after.isnan())
            and torch.equal(before.nan_to_num(), after.nan_to_num()))


def _digest(tensor: torch.Tensor) -> tuple[tuple[int, ...], torch.dtype, str]:
    """Shape, type and SHA-256 of the values: a frozen base model is not copied (135M parameters would double).

    A tensor without data (on the meta device, or a lazy layer's before its first call) has none to write into.
    """
    if tensor.is_meta or isinstance(tensor, nn.parameter.UninitializedTensorMixin):
        return tuple(tensor.shape) if tensor.is_meta else (), tensor.dtype, "no data"
    values = tensor.detach()
    values = values.to_dense() if values.is_sparse else values
    data = values.resolve_conj().resolve_neg().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return tuple(tensor.shape), tensor.dtype, hashlib.sha256(data).hexdigest()
