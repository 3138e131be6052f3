"""The tutorial's single training step, run plainly and through the orchestrator.

The tutorial this project grew from: resnet18, one random 3x64x64 image, random
(1, 1000) labels, `loss = (prediction - labels).sum()`, `loss.backward()`,
`SGD(lr=1e-2, momentum=0.9).step()`. With one worker the orchestrator must give
exactly the plain script's numbers. The only change to the tutorial's code is
an explicit generator for the data, so both sides draw the same image.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass

import torch
import torchvision

from distrib.config import RunConfig
from distrib.data import step_seed
from distrib.driver import Orchestrator


def tutorial_config(*, seed: int, device: str, weights: str) -> RunConfig:
    """The run config that makes the orchestrator do the tutorial's step. Its run directory is
    a scratch folder (seed_step removes it): a check leaves nothing where it is run."""
    scratch = os.path.join(tempfile.gettempdir(), f"distrib-seed-step-{os.getpid()}-{{time}}")
    return RunConfig(num_workers=1, device=device, batch_size_per_worker=1, image_size=64, num_classes=1000,
                     steps=1, lr=1e-2, momentum=0.9, seed=seed, loss="sum", weights=weights,
                     precision="fp32", channels_last=False, cudnn_benchmark=False, run_dir=scratch)


def plain_tutorial_step(*, seed: int, device: str, weights: dict | None) -> tuple[float, dict]:
    """The tutorial's code, in this process: returns (loss, model state dict on the CPU).

    Runs with cuDNN autotuning off, as the replica does for this check (the setting is
    process-wide, so it is restored afterwards)."""
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        return _tutorial_code(seed=seed, device=device, weights=weights)
    finally:
        torch.backends.cudnn.benchmark = benchmark


def _tutorial_code(*, seed: int, device: str, weights: dict | None) -> tuple[float, dict]:
    torch.manual_seed(seed)
    model = torchvision.models.resnet18()
    if weights is not None:
        model.load_state_dict(weights)
    model.to(device)
    gen = torch.Generator(device=device).manual_seed(step_seed(seed, 0))
    data = torch.rand(1, 3, 64, 64, generator=gen, device=device)
    labels = torch.rand(1, 1000, generator=gen, device=device)
    prediction = model(data)
    loss = (prediction - labels).sum()
    loss.backward()
    optim = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    optim.step()
    return loss.item(), {k: v.detach().cpu() for k, v in model.state_dict().items()}


@dataclass(frozen=True)
class SeedStepResult:
    distrib_loss: float
    plain_loss: float
    max_param_diff: float
    """Largest absolute difference over every parameter and buffer."""
    device: str


def seed_step(*, seed: int = 0, device: str = "auto", weights: str = "none", progress: bool = False) -> SeedStepResult:
    """Run the tutorial's step through a 1-worker orchestrator and plainly; compare them."""
    cfg = tutorial_config(seed=seed, device=device, weights=weights)
    orch = Orchestrator(cfg, progress=progress)
    try:
        with orch:
            (metrics,) = orch.train()
            state = orch.state()["model"]
            resolved = orch.cfg
    finally:
        if orch.run_dir is not None:
            shutil.rmtree(orch.run_dir, ignore_errors=True)
    loaded = None
    if weights != "none":
        from distrib.model import load_weights

        loaded = load_weights(weights, num_classes=1000)
    # The replica computes with one thread (cpus_per_worker=1); so must the reference,
    # since the CPU kernels' summation order can depend on the thread count.
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    try:
        plain_loss, plain_state = plain_tutorial_step(seed=seed, device=resolved.device, weights=loaded)
    finally:
        torch.set_num_threads(threads)
    diff = max((state[k].double() - v.double()).abs().max().item() for k, v in plain_state.items())
    return SeedStepResult(distrib_loss=metrics.loss, plain_loss=plain_loss, max_param_diff=diff,
                          device=resolved.device)
