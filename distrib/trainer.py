"""One replica's maths: resnet18 under DDP, SGD with momentum, the step loop, fingerprints.

Runs inside a Replica actor once the process group exists. Steps stay on the
device: synthetic data is made there, losses and phase timings are kept on the
device (CUDA events on a GPU) and read once per `run_steps` call, so a call of
k steps synchronises with the host once, not k times.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import os
import statistics
import time
import zlib

import torch
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from distrib import comm, evaluation, syncbn
from distrib.config import RunConfig
from distrib.data import HeldOutSource, ShardSource
from distrib.faults import Fault, fire
from distrib.model import StateDict, build_model
from distrib.protocol import PHASES, EvalRecord, Position, StepRecord
from distrib.schedule import lr_at

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class _Clock:
    """Marks points in a step; CUDA events on a GPU (no host sync until read), wall time on CPU."""

    def __init__(self, device: torch.device):
        self._cuda = device.type == "cuda"

    def mark(self):
        if not self._cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start, end) -> float:
        return start.elapsed_time(end) / 1e3 if self._cuda else end - start


class Trainer:
    """Holds the replica; every method that touches gradients or buffers is collective.

    All ranks must call `run_steps` with the same arguments, and `fingerprint` together.
    """

    def __init__(self, cfg: RunConfig, *, world_rank: int, weights: StateDict | None,
                 faults: list[Fault] = ()):
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device: cuda, but this worker sees no GPU (CUDA_VISIBLE_DEVICES="
                               f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
        self.cfg = cfg
        self.world_rank = world_rank
        self.world_size = comm.world_size()
        self.device = torch.device("cuda", 0) if cfg.device == "cuda" else torch.device("cpu")
        # Ray reserves cpus_per_worker for this process; more threads would oversubscribe the node.
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
        self._memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format

        self.model = build_model(num_classes=cfg.num_classes, seed=cfg.seed, weights=weights)
        if cfg.batchnorm == "sync":  # before DDP and the optimizer see the model: same tensors, new layers
            syncbn.convert(self.model)
        self.model.to(self.device, memory_format=self._memory_format)
        self._set_train_mode()
        self._comm = _AllReduceHook(world_size=self.world_size, dtype=_AMP_DTYPES.get(cfg.grad_compression))
        # With one rank there is nothing to all-reduce (DDP would divide by 1): the plain
        # module gives the same numbers without DDP's per-step hooks and launches.
        self.ddp_module = self._wrap_ddp(cfg) if self.world_size > 1 else self.model
        self._forward = torch.compile(self.ddp_module) if cfg.compile else self.ddp_module
        # fused: one kernel for the whole update on a GPU instead of a few per parameter group;
        # not with fp16's gradient scaler (fp16 steps went NaN in one of two runs with it on an
        # H200, torch 2.11; never without).
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay, nesterov=cfg.nesterov,
                                         fused=self.device.type == "cuda" and cfg.precision != "fp16")
        # The scaler's skip decision reads gradients after DDP's all-reduce, which are
        # identical on every rank, so every rank skips the same steps.
        self.scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
        self._amp_dtype = _AMP_DTYPES.get(cfg.precision)
        # DDP averages gradients over ranks. The sum loss is defined on the global batch, so each
        # rank's share is scaled by the world size to make the average equal the global gradient.
        self._loss_scale = float(self.world_size) if cfg.loss == "sum" else 1.0
        self.data = ShardSource(cfg, world_rank=world_rank, device=self.device)
        self._held_out: HeldOutSource | None = None  # built at the first evaluation
        self._clock = _Clock(self.device)
        self._faults = {f.step: f for f in faults if f.rank == world_rank}
        self.next_step = 0
        self.position = Position(-1, "idle")
        """Where this rank is; read by the driver's hang probe from another thread."""

    def _set_train_mode(self) -> None:
        """Training mode, with BatchNorm in eval mode under batchnorm: frozen."""
        self.model.train()
        if self.cfg.batchnorm == "frozen":
            for module in self.model.modules():
                if isinstance(module, _BatchNorm):
                    module.eval()

    def _wrap_ddp(self, cfg: RunConfig) -> DistributedDataParallel:
        # No buffer broadcast at each forward: under `train`, BatchNorm running stats are
        # averaged over ranks before every fingerprint and state read instead (see
        # sync_buffers), saving a collective per step; under `sync` and `frozen` they are
        # identical already. Newer torch renamed the switch.
        no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                          inspect.signature(DistributedDataParallel).parameters else {"broadcast_buffers": False})
        ddp = DistributedDataParallel(
            self.model, device_ids=[0] if self.device.type == "cuda" else None,
            bucket_cap_mb=cfg.bucket_cap_mb, gradient_as_bucket_view=True, **no_buffer_sync)
        # Our hook times the all-reduce window (exact with gloo) and can compress; on GPUs
        # without compression DDP keeps its built-in C++ hook, with no Python per bucket.
        if self.device.type == "cpu" or self._comm.dtype is not None:
            ddp.register_comm_hook(state=None, hook=self._comm.hook)
        return ddp

    def _loss(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self._amp_dtype or torch.float32,
                            enabled=self._amp_dtype is not None):
            outputs = self._forward(images)
        if self.cfg.loss == "sum":
            return (outputs.float() - targets).sum()
        return torch.nn.functional.cross_entropy(outputs.float(), targets)

    def run_steps(self, first_step: int, num_steps: int) -> list[StepRecord]:
        """Train steps first_step .. first_step + num_steps - 1; one record per step.

        Each record holds this rank's loss on its shard (mean or sum, as the config says)
        and the seconds spent in each phase.
        """
        if first_step != self.next_step:  # calls must arrive in order; say so loudly if they do not
            raise RuntimeError(f"asked for step {first_step}, but the next step here is {self.next_step}")
        losses, marks, comm_windows = [], [], []
        for step in range(first_step, first_step + num_steps):
            self.position = Position(step, "data")
            if step in self._faults:
                fire(self._faults.pop(step))
            for group in self.optimizer.param_groups:
                group["lr"] = lr_at(self.cfg, step)
            t0 = self._clock.mark()
            images, targets = self.data.batch(step)
            images = images.contiguous(memory_format=self._memory_format)
            t1 = self._clock.mark()
            self.position = Position(step, "forward")
            loss = self._loss(images, targets)
            t2 = self._clock.mark()
            self.position = Position(step, "backward")
            scaled = loss * self._loss_scale if self._loss_scale != 1.0 else loss
            if self.scaler is not None:
                self.scaler.scale(scaled).backward()
            else:
                scaled.backward()
            t3 = self._clock.mark()
            self.position = Position(step, "optimizer")
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
            t4 = self._clock.mark()
            marks.append((t0, t1, t2, t3, t4))
            comm_windows.append(self._comm.pop_window_s())
        self.next_step = first_step + num_steps
        self.position = Position(self.next_step - 1, "done")
        # The one host synchronisation of the call; it also completes the last step's events.
        loss_values = torch.stack(losses).tolist()
        records = []
        for step, loss_value, m, comm_s in zip(range(first_step, first_step + num_steps), loss_values, marks,
                                               comm_windows):
            phases = [self._clock.seconds(a, b) for a, b in zip(m, m[1:])]
            records.append(StepRecord(step=step, loss=loss_value, **dict(zip(PHASES, phases)), comm_s=comm_s))
        return records

    def evaluate(self) -> EvalRecord:
        """Counts over this rank's slice of the held-out set, BatchNorm in eval mode. Collective:
        under batchnorm: train the running statistics are averaged over ranks for it, and
        every buffer is put back afterwards, bit for bit, so training goes on as without it."""
        if self._held_out is None:
            self._held_out = HeldOutSource(self.cfg, world_rank=self.world_rank, world_size=self.world_size,
                                           device=self.device)
        self.position = Position(self.next_step - 1, "eval")
        saved = [buffer.clone() for buffer in self.model.buffers()]
        self.sync_buffers()
        self.model.eval()
        try:
            return evaluation.evaluate(self.model, self._held_out.batches(), amp_dtype=self._amp_dtype,
                                       memory_format=self._memory_format)
        finally:
            for buffer, value in zip(self.model.buffers(), saved):
                buffer.copy_(value)
            self._set_train_mode()
            self.position = Position(self.next_step - 1, "done")

    @property
    def allreduce_bytes(self) -> int:
        """Bytes each rank all-reduces per step: every gradient, in the wire dtype (0 alone)."""
        return self._wire_gradients().nbytes if self.world_size > 1 else 0

    def _wire_gradients(self) -> torch.Tensor:
        """A flat tensor the size and dtype of one step's all-reduced gradients (meta: no memory)."""
        numel = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return torch.empty(numel, dtype=self._comm.dtype or torch.float32, device="meta")

    def profile(self, step: int, repeats: int = 3) -> dict:
        """Time what a step's overlap hides. Collective; leaves the model as it was.

        backward_compute_s: forward and backward of `step`'s batch without any all-reduce
        (DDP's no_sync; under `batchnorm: sync` the BatchNorm layers' own small all-reduces
        still run, as they are part of the maths), median of `repeats`; allreduce_s: one plain all-reduce of a flat
        tensor of allreduce_bytes on this group (the microbenchmark), median of `repeats`.
        """
        buffers = [b.clone() for b in self.model.buffers()]
        images, targets = self.data.batch(step)
        images = images.contiguous(memory_format=self._memory_format)
        no_sync = self.ddp_module.no_sync() if self.world_size > 1 else contextlib.nullcontext()
        backward = []
        with no_sync:
            for _ in range(repeats):
                loss = self._loss(images, targets)
                t0 = self._clock.mark()
                loss.backward()
                t1 = self._clock.mark()
                self.optimizer.zero_grad(set_to_none=True)
                self._synchronize()
                backward.append(self._clock.seconds(t0, t1))
        for buffer, saved in zip(self.model.buffers(), buffers):
            buffer.copy_(saved)
        allreduce = []
        if self.world_size > 1:
            flat = torch.zeros_like(self._wire_gradients(), device=self.device)
            for _ in range(repeats):
                torch.distributed.barrier()
                start = time.perf_counter()
                torch.distributed.all_reduce(flat)
                self._synchronize()
                allreduce.append(time.perf_counter() - start)
        return {"backward_compute_s": statistics.median(backward),
                "allreduce_s": statistics.median(allreduce) if allreduce else 0.0,
                "allreduce_bytes": self.allreduce_bytes}

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def sync_buffers(self) -> None:
        """Under `batchnorm: train`, average floating-point buffers (BatchNorm running stats)
        over ranks; otherwise nothing. Collective.

        In train mode each rank's running stats follow its own shard; forward never reads them,
        so they are reconciled only where they are observed: fingerprints and saved state.
        Under `sync` every rank updates them from the same global statistics and under
        `frozen` they never change, so they must already agree bit for bit: averaging would
        only hide a divergence from the fingerprints.
        """
        buffers = [b for b in self.model.buffers() if b.is_floating_point()]
        if self.cfg.batchnorm != "train" or self.world_size == 1 or not buffers:
            return
        flat = torch.cat([b.reshape(-1) for b in buffers])
        comm.all_reduce_mean_(flat)
        for buffer, averaged in zip(buffers, flat.split([b.numel() for b in buffers])):
            buffer.copy_(averaged.view_as(buffer))

    def state(self) -> dict:
        """Model and optimizer state dicts, copied to the CPU. Call after fingerprint (which
        reconciles BatchNorm buffers under `train`) so every rank would give the same answer."""
        to_cpu = lambda tree: _map_tensors(tree, lambda t: t.detach().to("cpu", copy=True))  # noqa: E731
        return {"model": to_cpu(self.model.state_dict()), "optimizer": to_cpu(self.optimizer.state_dict())}

    def snapshot(self) -> bytes:
        """state() serialised with torch.save, for checkpoints; restore() takes it back."""
        state = self.state()
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        buffer = io.BytesIO()
        torch.save(state, buffer)
        return buffer.getvalue()

    def restore(self, payload: bytes, *, step: int) -> None:
        """Load a snapshot taken after `step` steps; the next run_steps starts there."""
        state = torch.load(io.BytesIO(payload), map_location=self.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self.next_step = step

    def named_state_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """Parameters, momentum buffers and module buffers, in a fixed order with names."""
        tensors = [(f"param:{n}", p) for n, p in self.model.named_parameters()]
        for name, param in self.model.named_parameters():
            momentum = self.optimizer.state.get(param, {}).get("momentum_buffer")
            if momentum is not None:
                tensors.append((f"momentum:{name}", momentum))
        tensors += [(f"buffer:{n}", b) for n, b in self.model.named_buffers()]
        return tensors

    def fingerprint(self) -> list[tuple[str, int]]:
        """(name, checksum of the raw bits) for every state tensor, after sync_buffers (which
        averages BatchNorm buffers under `train` only). Collective.

        Any change confined to one element of up to 4 bytes always changes the checksum
        (see _host_checksum, _device_checksum); several changes cancelling out is vanishingly unlikely.
        """
        self.sync_buffers()
        named = self.named_state_tensors()
        if self.device.type == "cuda":  # on the device, then one transfer for all tensors
            sums = torch.stack([_device_checksum(t) for _, t in named]).tolist()
        else:
            sums = [_host_checksum(t) for _, t in named]
        return [(name, value) for (name, _), value in zip(named, sums)]


def _map_tensors(tree, fn):
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, dict):
        return {k: _map_tensors(v, fn) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_map_tensors(v, fn) for v in tree)
    return tree


class _AllReduceHook:
    """DDP's communication hook: averages each gradient bucket over ranks, like DDP's own
    default (divide, then all-reduce a sum), optionally sent in fp16/bf16, and records the
    step's communication window: from the first bucket handed over to the last one done.

    The window is host time: exact with gloo, where the callback runs when the bytes have
    arrived; with NCCL it marks when the work was queued, so sweeps report it on CPU only.
    """

    def __init__(self, *, world_size: int, dtype: torch.dtype | None):
        self.world_size, self.dtype = world_size, dtype
        self._first = self._last = None

    def hook(self, state, bucket):  # no annotations: DDP checks them against its own types
        if self._first is None:
            self._first = time.perf_counter()
        grads = bucket.buffer()
        wire = grads.to(self.dtype) if self.dtype is not None else grads
        wire.div_(self.world_size)
        future = torch.distributed.all_reduce(wire, async_op=True).get_future()

        def done(fut: torch.futures.Future) -> torch.Tensor:
            self._last = time.perf_counter()
            reduced = fut.value()[0]
            if self.dtype is not None:
                grads.copy_(reduced)
                return grads
            return reduced

        return future.then(done)

    def pop_window_s(self) -> float:
        window = (self._last - self._first) if self._first is not None and self._last is not None else 0.0
        self._first = self._last = None
        return window


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bit patterns as a flat integer tensor (bf16 and friends included)."""
    return tensor.detach().contiguous().reshape(-1).view(_INT_OF_SIZE[tensor.element_size()])


def _host_checksum(tensor: torch.Tensor) -> int:
    """CRC-32 of a CPU tensor's bytes: catches every change within 32 contiguous bits, at
    memory speed (10x faster on a CPU than the weighted sum below)."""
    return zlib.crc32(memoryview(_bits(tensor).numpy()).cast("B"))


def _device_checksum(tensor: torch.Tensor) -> torch.Tensor:
    """sum_i bits_i * (i mod 65521 + 1) in int64, on the tensor's device (no copy to the host).
    For one changed element of up to 4 bytes, |difference| * weight < 2**48: never 0 mod 2**64."""
    bits = _bits(tensor).to(torch.int64)
    weights = torch.arange(bits.numel(), device=bits.device, dtype=torch.int64) % 65521 + 1
    return (bits * weights).sum()
