"""One replica's maths: resnet18 under DDP, SGD with momentum, the step loop, fingerprints.

Runs inside a Replica actor once the process group exists. Steps stay on the
device: synthetic data is made there, losses and phase timings are kept on the
device (CUDA events on a GPU) and read once per `run_steps` call, so a call of
k steps synchronises with the host once, not k times.
"""

from __future__ import annotations

import contextlib
import io
import os

import torch
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from distrib import allreduce, bnstats, cadence, comm, ddp, digest, evaluation, profiling, syncbn
from distrib.config import RunConfig
from distrib.data import HeldOutSource, ShardSource
from distrib.faults import Fault, fire
from distrib.hostcopy import HostSnapshots, map_tensors, to_bytes
from distrib.jpeg import JpegShardSource
from distrib.model import StateDict, build_model
from distrib.protocol import PHASES, EvalRecord, HostState, Position, StepRecord
from distrib.schedule import lr_at

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Trainer:
    """Holds the replica; every method that touches gradients or buffers is collective.

    All ranks must call `run_steps` with the same arguments, and `fingerprint` together.
    """

    def __init__(self, cfg: RunConfig, *, weights: StateDict | None):
        """Build the model and optimizer; no process group is needed yet (a hot spare builds
        them ahead). `join` then makes it a rank of a group."""
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device: cuda, but this worker sees no GPU (CUDA_VISIBLE_DEVICES="
                               f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
        self.cfg = cfg
        self.device = torch.device("cuda", 0) if cfg.device == "cuda" else torch.device("cpu")
        # Ray reserves cpus_per_worker for this process; more threads would oversubscribe the node.
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cudnn.benchmark = cfg.cudnn_benchmark and not cfg.deterministic
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS reads it at its first use
        # Set either way: a kept replica (warm.py) may come from a run that set it. warn_only: the pooling
        # backward of resnet18's head has no deterministic CUDA kernel; its 1x1 output sums in a fixed order.
        torch.use_deterministic_algorithms(cfg.deterministic, warn_only=True)
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format

        self.model = build_model(num_classes=cfg.num_classes, seed=cfg.seed, weights=weights)
        if cfg.batchnorm == "sync":  # before DDP and the optimizer see the model: same tensors, new layers
            syncbn.convert(self.model)
        self.model.to(self.device, memory_format=self.memory_format)
        self._set_train_mode()
        # fused: one kernel for the whole update on a GPU instead of a few per parameter group; not
        # with fp16's gradient scaler (fp16 steps went NaN in one of two runs with it, H200, torch 2.11).
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay, nesterov=cfg.nesterov,
                                         fused=self.device.type == "cuda" and cfg.precision != "fp16")
        # The scaler's skip decision reads gradients after DDP's all-reduce, which are
        # identical on every rank, so every rank skips the same steps.
        self.scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
        self._amp_dtype = _AMP_DTYPES.get(cfg.precision)
        self.clock = profiling.Clock(self.device)
        self._snapshots = HostSnapshots(self.device)
        # What a step changes before its all-reduce (BatchNorm running stats, under train and
        # sync), copied as each step starts, so a step broken by a lost peer can be dropped.
        self._buffers = [b for b in self.model.buffers()] if cfg.batchnorm != "frozen" else []
        self._buffers_at_step_start = [b.clone() for b in self._buffers]
        self._float_buffers = [b for b in self._buffers if b.is_floating_point()]
        self._observed: bnstats.Observed | None = None  # under `train`: the last fingerprint's
        self._shard_buffer_sums: list[torch.Tensor] = []
        self.world_rank, self.world_size = -1, 1
        self.ddp_module = self._forward = self.model
        self.comm_hook = allreduce.AllReduceHook(world_size=1, dtype=_AMP_DTYPES.get(cfg.grad_compression))
        self._loss_scale = 1.0
        self.shards: list[int] = []
        """The logical shards of each global batch this rank trains on: [world_rank] at full
        size; more in a group shrunk below num_workers (min_workers)."""
        self.data: list[ShardSource | JpegShardSource] = []
        self._held_out: HeldOutSource | None = None  # built at the first evaluation
        self._faults: list[Fault] = []
        self.next_step = 0
        self.broken: str | None = None
        """Why this rank left its process group (a step failed); None while it is a member."""
        self._recent: dict[int, StepRecord] = {}
        """The latest steps' records, by step: a recovery asks for those the driver never got."""
        self.position = Position(-1, "idle")
        """Where this rank is; read by the driver's hang probe from another thread."""

    def join(self, *, world_rank: int, shards: list[int], faults: list[Fault] | None) -> None:
        """Become `world_rank` of the process group this process has just joined, training on
        logical `shards` of each global batch: (re)build DDP, the loss scale and the data
        sources, which depend on the rank and the group. Collective where it settles DDP's
        buckets (ddp.settle_buckets) and on a torch without init_sync (ddp.wrap). A rank that was
        in an earlier group keeps its model, optimizer and armed faults (`faults` None); a new
        one gets `faults`."""
        cfg = self.cfg
        self.ddp_module = self._forward = None  # the old DDP's autograd hooks go with it
        self.world_rank, self.world_size = world_rank, comm.world_size()
        self.comm_hook = allreduce.AllReduceHook(world_size=self.world_size, dtype=self.comm_hook.dtype)
        # With one rank there is nothing to all-reduce (DDP would divide by 1): the plain
        # module gives the same numbers without DDP's per-step hooks and launches.
        self.ddp_module = ddp.wrap(self.model, cfg, self.device, self.comm_hook) if self.world_size > 1 else self.model
        self._forward = torch.compile(self.ddp_module) if cfg.compile else self.ddp_module
        # DDP averages gradients over ranks. The sum loss is defined on the global batch, so each
        # shard's is scaled by the world size to make the average equal the global gradient; the mean
        # loss is the mean over num_workers shards: each shard's scaled by world_size / num_workers.
        self._loss_scale = float(self.world_size) if cfg.loss == "sum" else self.world_size / cfg.num_workers
        for source in self.data:
            source.close()
        self.shards = list(shards)
        source_class = JpegShardSource if cfg.data == "folder" and cfg.decoder == "nvjpeg" else ShardSource
        self.data = [source_class(cfg, shard=shard, device=self.device) for shard in self.shards]
        self._held_out = None
        if faults is not None:
            self._faults = [f for f in faults if f.rank == world_rank]
        if self.world_size > 2 and self.next_step > 0:  # two values sum the same in either order
            ddp.settle_buckets(self)
        self.broken = None
        self.position = Position(self.next_step - 1, "idle")

    def _set_train_mode(self) -> None:
        """Training mode, with BatchNorm in eval mode under batchnorm: frozen."""
        self.model.train()
        if self.cfg.batchnorm == "frozen":
            for module in self.model.modules():
                if isinstance(module, _BatchNorm):
                    module.eval()

    def loss(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self._amp_dtype or torch.float32,
                            enabled=self._amp_dtype is not None):
            outputs = self._forward(images)
        if self.cfg.loss == "sum":
            return (outputs.float() - targets).sum()
        return torch.nn.functional.cross_entropy(outputs.float(), targets)

    def run_steps(self, first_step: int, num_steps: int) -> list[StepRecord]:
        """Train steps first_step .. first_step + num_steps - 1; one record per step.

        Each record holds this rank's loss on its shard (mean or sum, as the config says)
        and the seconds spent in each phase. When a step fails (a peer lost mid-collective,
        an error here), it is dropped: this rank is left at the last step it finished, with
        the failed step's BatchNorm updates undone, keeps the finished steps' records (see
        `records_since`), and leaves the process group, which makes every peer's collective
        fail at once too. It then refuses collective calls until it joins a new group. Calls
        must arrive in order: one that does not is said loudly, and this rank leaves too."""
        self._refuse_if_broken()
        if first_step != self.next_step:
            self._leave(why := f"asked for step {first_step}, but the next step here is {self.next_step}")
            raise RuntimeError(why)
        losses, marks, comm_windows = [], [], []
        try:
            for step in range(first_step, first_step + num_steps):
                losses.append(self._step(step, marks))
                comm_windows.append(self.comm_hook.pop_window_s())
                self.next_step = step + 1
        except Exception as err:
            self._drop_step(err)
            self._records(first_step, losses, marks, comm_windows)
            raise
        self.position = Position(self.next_step - 1, "done")
        if self.world_rank == 0 and self.cfg.checkpoint_every:  # the state's shapes are known after a step
            self._snapshots.prepare(self._snapshot_state)
        return self._records(first_step, losses, marks, comm_windows)

    def records_since(self, step: int) -> list[StepRecord]:
        """This rank's records of the steps from `step` on that it finished (the latest few):
        after a failure, the steps every rank finished whose results never reached the driver."""
        return [self._recent[s] for s in sorted(self._recent) if s >= step]

    def _step(self, step: int, marks: list) -> torch.Tensor:
        """One training step; appends its clock marks to `marks`, returns its loss (on the device)."""
        self.position = Position(step, "data")
        if self._buffers:
            torch._foreach_copy_(self._buffers_at_step_start, self._buffers)
        for fault in [f for f in self._faults if f.step == step and f.kind != "slow"]:
            if fault.kind != "error":  # an error fault stands for a deterministic failure: it stays
                self._faults.remove(fault)
            fire(fault)
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.cfg, step)
        t0 = self.clock.mark()
        for fault in [f for f in self._faults if f.kind == "slow" and f.step <= step]:
            fire(fault)  # inside the data phase, as a slow loader would be
        batches = [source.batch(step) for source in self.data]
        t1 = self.clock.mark()
        self.position = Position(step, "forward")
        # All shards but the last: forward and backward without an all-reduce, their gradients
        # accumulating (a shrunk group only; their backward counts as forward time).
        shard_losses = [self._accumulate(images, targets) for images, targets in batches[:-1]]
        images, targets = batches[-1]
        loss = self.loss(images.contiguous(memory_format=self.memory_format), targets)
        t2 = self.clock.mark()
        self.position = Position(step, "backward")
        self._backward(loss)
        if len(batches) > 1:
            self._average_shard_buffers(len(batches))
        t3 = self.clock.mark()
        self.position = Position(step, "optimizer")
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        t4 = self.clock.mark()
        marks.append((t0, t1, t2, t3, t4))
        # What the driver adds (sum) or averages over ranks (mean) must come to the global batch's: in a
        # shrunk group every rank's mean, of one shard or several, is scaled (at full size the scale is 1).
        total = torch.stack([*shard_losses, loss.detach()]).sum() if shard_losses else loss.detach()
        return total if self.cfg.loss == "sum" or self._loss_scale == 1.0 else total * self._loss_scale

    def _backward(self, loss: torch.Tensor) -> None:
        scaled = loss * self._loss_scale if self._loss_scale != 1.0 else loss
        if self.scaler is not None:
            self.scaler.scale(scaled).backward()
        else:
            scaled.backward()

    def _accumulate(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Forward and backward of one shard of several, without DDP's all-reduce (the last
        shard's backward does it, for all of them). Its BatchNorm running statistics go to the
        sums that _average_shard_buffers averages, and the step-start values come back, so
        each shard updates them from the same start, as a rank of its own would."""
        no_sync = self.ddp_module.no_sync() if isinstance(self.ddp_module, DistributedDataParallel) else \
            contextlib.nullcontext()
        with no_sync:
            loss = self.loss(images.contiguous(memory_format=self.memory_format), targets)
            self._backward(loss)
        if self._float_buffers:
            if self._shard_buffer_sums:
                torch._foreach_add_(self._shard_buffer_sums, self._float_buffers)
            else:
                self._shard_buffer_sums = [b.clone() for b in self._float_buffers]
            torch._foreach_copy_(self._buffers, self._buffers_at_step_start)
        return loss.detach()

    def _average_shard_buffers(self, num_shards: int) -> None:
        """BatchNorm running statistics: the mean of the shards' updates (see _accumulate), which
        bnstats.observe weighs by the number of shards; the integer counters advanced once."""
        if self._float_buffers:
            torch._foreach_add_(self._float_buffers, self._shard_buffer_sums)
            torch._foreach_div_(self._float_buffers, float(num_shards))
            self._shard_buffer_sums = []

    def _records(self, first_step: int, losses: list[torch.Tensor], marks: list, comm_windows: list[float]
                 ) -> list[StepRecord]:
        """The records of the steps finished from `first_step`; the one host synchronisation of a
        call, which also completes the last step's events."""
        loss_values = torch.stack(losses).tolist() if losses else []
        records = []
        for step, loss_value, m, comm_s in zip(range(first_step, first_step + len(losses)), loss_values, marks,
                                               comm_windows):
            phases = [self.clock.seconds(a, b) for a, b in zip(m, m[1:])]
            records.append(StepRecord(step=step, loss=loss_value, **dict(zip(PHASES, phases)), comm_s=comm_s))
        self._recent.update((r["step"], r) for r in records)
        kept = cadence.records_kept(self.cfg)
        self._recent = {s: r for s, r in self._recent.items() if s >= self.next_step - kept}
        return records

    def _drop_step(self, err: Exception) -> None:
        """Undo what the failed step changed (its BatchNorm updates, its gradients) and leave the
        process group. No optimizer step is undone: SGD's step runs after the step's last
        collective, so a step that failed never reached it."""
        if self._buffers:
            torch._foreach_copy_(self._buffers, self._buffers_at_step_start)
        self._shard_buffer_sums = []
        self.optimizer.zero_grad(set_to_none=True)
        self.comm_hook.pop_window_s()
        self._leave(f"{type(err).__name__} at step {self.next_step}")

    def _leave(self, why: str) -> None:
        """Leave the process group after a failed collective: peers blocked in one with this rank
        fail at once (their connections close) instead of waiting out the group's timeout."""
        self.broken = why
        self.position = Position(self.next_step - 1, "broken")
        self.ddp_module = self._forward = None
        comm.leave_process_group()

    def _refuse_if_broken(self) -> None:
        if self.broken is not None:
            raise RuntimeError(f"rank {self.world_rank} left its process group ({self.broken}); "
                               "it waits to join a new one")

    @contextlib.contextmanager
    def _collective(self, what: str):
        """Run a collective other than steps: refused when broken; on failure, leave the group."""
        self._refuse_if_broken()
        try:
            yield
        except Exception as err:
            self._leave(f"{type(err).__name__} in {what} after step {self.next_step - 1}")
            raise

    def evaluate(self) -> EvalRecord:
        """Counts over this rank's slice of the held-out set, BatchNorm in eval mode. Collective:
        under batchnorm: train it uses the running statistics' mean over ranks, and every
        buffer is put back afterwards, bit for bit, so training goes on as without it."""
        with self._collective("evaluate"):
            return self._evaluate()

    def _evaluate(self) -> EvalRecord:
        if self._held_out is None:
            self._held_out = HeldOutSource(self.cfg, world_rank=self.world_rank, world_size=self.world_size,
                                           device=self.device)
        self.position = Position(self.next_step - 1, "eval")
        saved = [buffer.clone() for buffer in self.model.buffers()]
        self._observe_buffers(adopt=True)
        self.model.eval()
        try:
            return evaluation.evaluate(self.model, self._held_out.batches(), amp_dtype=self._amp_dtype,
                                       memory_format=self.memory_format)
        finally:
            for buffer, value in zip(self.model.buffers(), saved):
                buffer.copy_(value)
            self._set_train_mode()
            self.position = Position(self.next_step - 1, "done")

    def profile(self, step: int, repeats: int = 3) -> dict:
        """Time what a step's overlap hides. Collective; leaves the model as it was.

        backward_compute_s: forward and backward of `step`'s batch without any all-reduce
        (DDP's no_sync; under `batchnorm: sync` the BatchNorm layers' own small all-reduces
        still run, as they are part of the maths), median of `repeats`; allreduce_s: one plain all-reduce of a flat
        tensor of allreduce_bytes on this group (the microbenchmark), median of `repeats`.
        """
        with self._collective("profile"):
            return profiling.measure_overlap(self, step, repeats)

    def _observe_buffers(self, *, adopt: bool) -> bnstats.Observed | None:
        """Collective. Under `batchnorm: train` with 2+ ranks, the ranks' running statistics and their mean,
        made every rank's own if `adopt` or the group is shrunk (bnstats.py); else None (`sync`, `frozen`)."""
        if self.cfg.batchnorm != "train" or self.world_size == 1 or not self._float_buffers:
            return None
        return bnstats.observe(self._float_buffers, step=self.next_step, num_shards=len(self.shards),
                               num_workers=self.cfg.num_workers, adopt=adopt or self.world_size < self.cfg.num_workers)

    def _observed_buffers(self) -> dict[str, torch.Tensor]:
        """The buffers' mean over ranks as the fingerprint at this step observed it, by name; or {}."""
        seen = self._observed
        if seen is None or seen.step != self.next_step:
            return {}
        return dict(zip([n for n, b in self.model.named_buffers() if b.is_floating_point()], seen.mean))

    def state(self) -> dict:
        """Model and optimizer state dicts, copied to the CPU. Call after fingerprint (which
        observes BatchNorm buffers under `train`) so every rank would give the same answer."""
        state = self._snapshot_state()
        return map_tensors({"model": state["model"], "optimizer": state["optimizer"]},
                           lambda t: t.detach().to("cpu", copy=True))

    def begin_snapshot(self) -> None:
        """Start a snapshot of the state as of now, costing the step stream one copy
        (hostcopy.py); take_snapshot(next_step) gives it. Call after fingerprint, as for state()."""
        self._snapshots.begin(self._snapshot_state(), key=self.next_step)

    def _snapshot_state(self) -> dict:
        """Model (BatchNorm buffers: as observed at this step), optimizer and scaler state; and
        every rank's own buffers where the ranks kept them (bnstats.py), for `restore`."""
        observed = self._observed_buffers()
        state = {"model": self.model.state_dict() | observed, "optimizer": self.optimizer.state_dict()}
        if observed and self._observed.own is not None:
            state["rank_buffers"] = self._observed.own
        return state | ({"scaler": self.scaler.state_dict()} if self.scaler is not None else {})

    def take_snapshot(self, step: int) -> HostState:
        """The snapshot begun after `step` steps (waits for it); hostcopy.to_bytes makes the bytes
        restore() takes. Safe to call from a thread other than the steps'."""
        return self._snapshots.take(step)

    def snapshot(self) -> bytes:
        """A snapshot begun and taken at once, as the bytes restore() takes."""
        self.begin_snapshot()
        return to_bytes(self.take_snapshot(self.next_step))

    def restore(self, payload: bytes, *, step: int, world_rank: int | None) -> None:
        """Load a snapshot taken after `step` steps; the next run_steps starts there. `world_rank`:
        the rank this replica is about to be in a full-size group (None otherwise), whose own
        BatchNorm buffers it takes back where the snapshot has them (bnstats.py)."""
        state = torch.load(io.BytesIO(payload), map_location=self.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        bnstats.give_back(self._float_buffers, state.get("rank_buffers"), world_rank)
        self._observed = None
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self.next_step = step

    def named_state_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """Parameters, momentum buffers and module buffers (as observed at this step), in a fixed
        order with names."""
        tensors = [(f"param:{n}", p) for n, p in self.model.named_parameters()]
        for name, param in self.model.named_parameters():
            momentum = self.optimizer.state.get(param, {}).get("momentum_buffer")
            if momentum is not None:
                tensors.append((f"momentum:{name}", momentum))
        observed = self._observed_buffers()
        tensors += [(f"buffer:{n}", observed.get(n, b)) for n, b in self.model.named_buffers()]
        return tensors

    def fingerprint(self) -> list[tuple[str, int]]:
        """(name, checksum of the raw bits) for every state tensor, BatchNorm buffers under
        `train` as their mean over ranks (bnstats.py). Collective.

        Any change confined to one element of up to 4 bytes always changes the checksum
        (see digest.py); several changes cancelling out is vanishingly unlikely.
        """
        with self._collective("fingerprint"):
            self._observed = self._observe_buffers(adopt=cadence.averages_buffers(self.cfg, self.next_step))
        return digest.checksums(self.named_state_tensors())
