"""The resnet18 replica and its weights: none (seeded init) | DEFAULT | a .pth file.

`load_weights` runs once, in the driver; its result travels to the replicas
through Ray's object store, so no worker downloads or reads weights itself.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision

from distrib.config import ConfigError

StateDict = dict[str, torch.Tensor]


def build_model(*, num_classes: int, seed: int, weights: StateDict | None) -> torch.nn.Module:
    """A resnet18 on the CPU: seeded init (identical for the same seed on any machine), then `weights` if given."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=num_classes)
    if weights is not None:
        model.load_state_dict(weights)
    return model


def load_weights(spec: str, *, num_classes: int) -> StateDict | None:
    """The state dict that `weights: spec` names, on the CPU; None for `none`.

    Raises ConfigError (one line, with the fix) when the file is missing, is not a
    state dict, or does not fit a resnet18 with `num_classes` outputs.
    """
    if spec == "none":
        return None
    if spec == "DEFAULT":
        return _torchvision_default()
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"weights: {spec!r} is invalid: no such file; give a .pth state dict, DEFAULT or none")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: say which and why, in one line
        raise ConfigError(f"weights: {spec!r} could not be loaded ({type(err).__name__}); "
                          "save it with torch.save(model.state_dict(), path)") from None
    if not isinstance(state, dict):
        raise ConfigError(f"weights: {spec!r} holds a {type(state).__name__}, not a state dict; "
                          "save it with torch.save(model.state_dict(), path)")
    expected = torchvision.models.resnet18(num_classes=num_classes).state_dict()
    mismatched = [k for k, v in expected.items() if k not in state or state[k].shape != v.shape]
    if mismatched or set(state) - set(expected):
        first = mismatched[0] if mismatched else sorted(set(state) - set(expected))[0]
        raise ConfigError(f"weights: {spec!r} does not fit resnet18 with num_classes={num_classes} "
                          f"(first mismatch: {first}); check num_classes or the file")
    return state


def _torchvision_default() -> StateDict:
    """torchvision's pretrained weights through its own loader and cache (downloads if it can)."""
    weights = torchvision.models.ResNet18_Weights.DEFAULT
    cache_dir = Path(torch.hub.get_dir()) / "checkpoints"
    file_name = Path(weights.url).name
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as err:  # URLError, timeouts, hash mismatch: all end with the same fix
        raise ConfigError(
            f"weights: 'DEFAULT' could not be fetched ({type(err).__name__}); download {weights.url} "
            f"and put {file_name} in {cache_dir} (or set TORCH_HOME)") from None
