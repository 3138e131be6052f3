"""Checksums of a tensor's raw bits, for the fingerprints that prove replicas identical.

Two ways to the same guarantee (any change confined to one element of up to 4 bytes
changes the checksum): CRC-32 on the host, a weighted sum on the device, so a GPU
replica sends one small tensor to the host instead of its whole state.
"""

from __future__ import annotations

import itertools
import zlib
from typing import NamedTuple

import torch

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def raw_bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bit patterns as a flat integer tensor (bf16 and friends included)."""
    return tensor.detach().contiguous().reshape(-1).view(_INT_OF_SIZE[tensor.element_size()])


def host_checksum(tensor: torch.Tensor) -> int:
    """CRC-32 of a CPU tensor's bytes: catches every change within 32 contiguous bits, at
    memory speed (10x faster on a CPU than the weighted sum below)."""
    return zlib.crc32(memoryview(raw_bits(tensor).numpy()).cast("B"))


def device_checksum(tensor: torch.Tensor) -> torch.Tensor:
    """sum_i bits_i * (i mod 65521 + 1) in int64, on the tensor's device (no copy to the host).
    For one changed element of up to 4 bytes, |difference| * weight < 2**48: never 0 mod 2**64."""
    bits = raw_bits(tensor).to(torch.int64)
    weights = torch.arange(bits.numel(), device=bits.device, dtype=torch.int64) % 65521 + 1
    return (bits * weights).sum()


def device_checksums(tensors: list[torch.Tensor]) -> torch.Tensor:
    """device_checksum of each tensor (same values, int64, in order), in a few kernels per
    element size instead of six per tensor: on a GPU a check's ~180 tensors made ~1,100 small
    launches, each a Python call on the thread that launches the steps.

    Per element size: the tensors' bits in one flat tensor, times each element's weight
    (its index within its own tensor, as device_checksum weighs it), a running sum, and each
    tensor's sum as the difference of the running sum at its two ends. Integer addition
    wraps mod 2**64 in any order, so the values equal device_checksum's. Needs about three
    times the tensors' bytes on the device while it runs, plus their weights, kept."""
    device = tensors[0].device if tensors else torch.device("cpu")
    sums = torch.zeros(len(tensors), dtype=torch.int64, device=device)
    by_size: dict[int, list[int]] = {}
    for index, tensor in enumerate(tensors):
        by_size.setdefault(tensor.element_size(), []).append(index)
    for indices in by_size.values():
        group = [raw_bits(tensors[i]) for i in indices]
        numels = tuple(bits.numel() for bits in group)
        if not any(numels):
            continue  # only empty tensors: their sums are 0
        layout = _layout(numels, tuple(indices), device)
        running = torch.cat(group).to(torch.int64).mul_(layout.weights).cumsum_(0)
        totals = torch.where(layout.ends_on_device > 0, running[layout.ends_on_device - 1], 0)
        sums[layout.indices] = totals - torch.cat([totals.new_zeros(1), totals[:-1]])
    return sums


class _Layout(NamedTuple):
    weights: torch.Tensor  # device_checksum's weights of each tensor's elements, end to end
    ends_on_device: torch.Tensor  # where each tensor ends in the flat bits
    indices: torch.Tensor  # the tensors' places in the list given


_LAYOUTS: dict[tuple, _Layout] = {}


def _layout(numels: tuple[int, ...], indices: tuple[int, ...], device: torch.device) -> _Layout:
    """Made once per layout: a run's state keeps its layout from check to check."""
    key = (numels, indices, str(device))
    if key not in _LAYOUTS:
        if len(_LAYOUTS) >= 8:  # another model or device: free the old ones' weights
            _LAYOUTS.clear()
        weights = torch.cat([torch.arange(n, device=device, dtype=torch.int64) % 65521 + 1 for n in numels])
        ends = torch.tensor(list(itertools.accumulate(numels)), device=device)
        _LAYOUTS[key] = _Layout(weights, ends, torch.tensor(indices, device=device))
    return _LAYOUTS[key]


def checksums(named: list[tuple[str, torch.Tensor]]) -> list[tuple[str, int]]:
    """(name, checksum) for each named tensor; tensors on a GPU are summed there, then read in
    one transfer for all of them."""
    if named and named[0][1].is_cuda:
        sums = device_checksums([t for _, t in named]).tolist()
    else:
        sums = [host_checksum(t) for _, t in named]
    return [(name, value) for (name, _), value in zip(named, sums)]
