"""Synchronized BatchNorm on every backend: N workers normalise like 1 worker on the global batch.

torch.nn.SyncBatchNorm runs only on GPUs (CUDA + NCCL); this one runs wherever
torch.distributed does, gloo on the CPU included. `convert(model)` swaps every
BatchNorm2d for a SyncBatchNorm2d holding the same parameters and buffers (same
state-dict keys, so checkpoints move between `batchnorm` modes unchanged).

In training mode, with a process group of two or more ranks, each layer costs
one all-reduce in forward (per-channel count, sum and sum of squares: 2C + 1
float64 numbers) and one in backward (per-channel sums of grad_out and of
grad_out * x_hat: 2C float32 numbers). In eval mode, or with no group or a group of
one, the layer is plain BatchNorm2d, bit for bit (like detectron2's comm helpers).

DDP contract, for a loss whose DDP-averaged gradient is the global gradient (the
Trainer's cross-entropy, and its sum loss scaled by the world size): grad_input is
the gradient of the sum over ranks of their losses, so DDP's averaging of the
layers below gives the global gradient; grad_weight and grad_bias are this rank's
own share (local sums), because DDP averages them too. Running statistics are
updated from the global batch identically on every rank: they need no averaging.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def group_size(group=None) -> int:
    """Ranks in `group` (None: the default group), or 1 without a process group."""
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def _per_channel(vector: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A (C,) vector shaped to broadcast against x (N, C, ...)."""
    return vector.view([1, -1] + [1] * (x.dim() - 2))


def global_mean_var(x: torch.Tensor, group=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, biased variance, count) per channel over the whole group's batch, in float64.
    All ranks of `group` must call this, with the same number of channels. One all-reduce.

    Stability: each rank first takes its own mean and its variance about that mean, with the
    kernel BatchNorm2d itself uses (torch.batch_norm_update_stats; 20x faster than
    torch.var_mean on channels_last), so no offset cancels there. The group then sums
    count, count * mean and count * (var + mean^2), and the global variance is
    E[x^2] - E[x]^2 of those sums: Chan et al.'s combination of per-rank (count, mean, M2),
    written as sums so that one all-reduce carries it. Its subtraction still cancels the
    data's offset (mean^2 / var), so it is done in float64: 1e-16 * mean^2 / var relative,
    nothing for activations, where float32 loses every digit once mean^2 / var passes 1e7
    (the test with inputs offset by 1000 fails in float32). A shift by the running mean
    would not have been enough: it is 0 for the first steps of a fresh model.
    """
    compute = x if x.dtype in (torch.float32, torch.float64) else x.float()  # bf16/fp16: float32 stats
    local_mean, local_var = torch.batch_norm_update_stats(compute, None, None, 0.0)  # biased variance
    mean64, var64 = torch.stack([local_mean, local_var]).double()
    sums = torch.cat([mean64.new_ones(1), mean64, torch.addcmul(var64, mean64, mean64)]) * (x.numel() // x.shape[1])
    dist.all_reduce(sums, group=group)
    total_count = sums[:1]
    mean, mean_of_squares = (sums[1:] / total_count).chunk(2)
    return mean, torch.addcmul(mean_of_squares, mean, mean, value=-1).clamp_(min=0), total_count


class SyncBatchNormFunction(torch.autograd.Function):
    """Batch normalisation with the statistics of the whole group's batch. Collective: every
    rank of `group` must run forward, and backward, of the same layers in the same order."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum: float, eps: float, group):
        mean64, var64, count64 = global_mean_var(x, group)
        # float32 statistics for float32, bf16 and fp16 inputs (as BatchNorm2d keeps them), float64 for float64.
        # Running variance: unbiased with the global count (>= 2: two ranks of one value at least).
        stat_dtype = torch.promote_types(x.dtype, torch.float32)
        mean, var, unbiased_var = torch.stack([mean64, var64, var64 * (count64 / (count64 - 1))]).to(stat_dtype)
        if running_mean is not None:  # BatchNorm2d's update, with the same numbers on every rank
            running_mean.lerp_(mean, momentum)
            running_var.lerp_(unbiased_var, momentum)
        # Eval-mode batch_norm with the global statistics: the native (oneDNN / cuDNN) kernel,
        # channels_last kept, and the same (x - mean) * rsqrt(var + eps) * w + b as BatchNorm2d.
        out = torch.nn.functional.batch_norm(x, mean, var, weight, bias, training=False, eps=eps)
        ctx.save_for_backward(x, weight, mean, var, count64.to(stat_dtype))
        ctx.eps, ctx.group = eps, group
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, mean, var, count = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        # Eval-mode BatchNorm backward with the global mean and variance gives, in one fused
        # pass, this rank's sum of grad_out * x_hat (its grad_weight) and sum of grad_out
        # (its grad_bias): DDP then averages them like any parameter's gradient.
        # CUDA's kernel asserts that the saved statistics are given; empty ones mean "use the
        # running ones" (here: the global statistics), as cuDNN's eval-mode backward passes them.
        saved = mean.new_empty(0) if x.is_cuda else None
        _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
            grad_out, x, weight, mean, var, saved, saved, False, ctx.eps, [False, True, True])
        grad_input = None
        if need_input:
            grad_input = _input_grad(grad_out, x, weight, mean, var, count, sum_dy, sum_dy_xhat,
                                     ctx.eps, ctx.group)
        return (grad_input, sum_dy_xhat if need_weight else None, sum_dy if need_bias else None,
                None, None, None, None, None)


def _input_grad(grad_out, x, weight, mean, var, count, sum_dy, sum_dy_xhat, eps: float, group):
    """dL/dx for L = the sum over ranks of their losses, with statistics of the global batch:
    scale * (dy - mean(dy) - x_hat * mean(dy * x_hat)), scale = w * invstd, the means over
    the global batch. Collective (one all-reduce of the two per-channel sums)."""
    sums = torch.cat([sum_dy, sum_dy_xhat]).to(mean.dtype)
    dist.all_reduce(sums, group=group)
    mean_dy, mean_dy_xhat = (sums / count).chunk(2)
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    # -scale * (mean(dy) + x_hat * mean(dy * x_hat)) is itself a batch norm of x with the
    # global statistics (weight -scale * mean(dy * x_hat), bias -scale * mean(dy)): the native
    # kernel does it in one pass, subtracting the mean before scaling, as BatchNorm2d's backward.
    correction = torch.nn.functional.batch_norm(x, mean, var, -scale * mean_dy_xhat, -scale * mean_dy,
                                                training=False, eps=eps)
    return correction.addcmul_(grad_out, _per_channel(scale, x))


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics are those of the whole group's batch.

    A drop-in for nn.BatchNorm2d (same parameters, buffers and state-dict keys). In training
    mode with a group of two or more ranks, forward and backward are collective: all ranks
    must run them together. Otherwise it is BatchNorm2d itself.
    """

    def __init__(self, *args, process_group=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.process_group = process_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or group_size(self.process_group) == 1:
            return super().forward(x)
        self._check_input_dim(x)
        if x.numel() == 0:
            raise ValueError("SyncBatchNorm2d got an empty shard; every rank needs at least one sample")
        momentum = 0.0 if self.momentum is None else self.momentum
        tracked = self.track_running_stats
        if tracked and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as BatchNorm2d
                momentum = 1.0 / float(self.num_batches_tracked)
        return SyncBatchNormFunction.apply(
            x, self.weight, self.bias, self.running_mean if tracked else None,
            self.running_var if tracked else None, momentum, self.eps, self.process_group)


def convert(model: nn.Module, process_group=None) -> nn.Module:
    """`model` with every nn.BatchNorm2d replaced, in place, by a SyncBatchNorm2d that holds
    the very same parameter and buffer tensors (an optimizer built before still applies).
    Returns the model, or the new layer if `model` is itself a BatchNorm2d."""
    if isinstance(model, nn.BatchNorm2d) and not isinstance(model, SyncBatchNorm2d):
        return _sync_copy(model, process_group)
    for name, child in model.named_children():
        converted = convert(child, process_group)
        if converted is not child:
            setattr(model, name, converted)
    return model


def _sync_copy(bn: nn.BatchNorm2d, process_group) -> SyncBatchNorm2d:
    sync = SyncBatchNorm2d(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                           track_running_stats=bn.track_running_stats, process_group=process_group,
                           device="meta")  # no throwaway allocation: every tensor is replaced below
    sync._parameters = bn._parameters
    sync._buffers = bn._buffers
    sync.train(bn.training)
    return sync
