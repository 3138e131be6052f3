"""The run config: one frozen, typed dataclass, loaded from YAML and validated.

Every way a config can be wrong (unknown key, wrong type, value out of range,
missing file, malformed YAML, a key given twice, contradicting fields) raises `ConfigError` with a
one-line message that names the key, the value and the rule. The CLI turns it
into exit code 2. Nothing here imports torch or ray: the driver loads configs
before either is needed.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from distrib import config_rules
from distrib.config_rules import rule
from distrib.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Everything one training run needs; the replica never sees the YAML, only this."""

    num_workers: int = 2
    """Replicas (Ray actors), one per GPU on a GPU cluster."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto` picks cuda when the Ray cluster has GPUs, else cpu."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """torch.distributed backend; `auto` is nccl on cuda, gloo on cpu."""
    gpus_per_worker: float = 1.0
    """GPUs reserved per replica on cuda. Below 1 (e.g. 0.5) several replicas share one GPU
    through Ray's fractional GPUs, to test the multi-replica GPU path on one GPU; they talk
    over gloo with CUDA tensors, since NCCL refuses two ranks on one GPU."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per replica; its torch thread count is the whole part (at least 1)."""
    batch_size_per_worker: int = 32
    """Images per replica per step; the global batch is num_workers times this."""
    image_size: int = 64
    """Height and width of the (square) input images, in pixels."""
    num_classes: int = 1000
    """Output classes of the resnet18 head."""
    steps: int = 60
    """Optimizer steps to run."""
    lr: float = 0.01
    """SGD learning rate (the peak of the schedule; see lr_scaling)."""
    lr_schedule: Literal["constant", "step", "cosine"] = "constant"
    """After warm-up: `constant`; `step` multiplies by lr_gamma at each of lr_milestones;
    `cosine` decays towards 0, reached at step `steps` (one past the last step run)."""
    warmup_steps: int = 0
    """Steps of linear warm-up from lr / warmup_steps to lr (Goyal et al. 2017); 0 = none."""
    lr_milestones: tuple[int, ...] = ()
    """Steps at which lr_schedule: step multiplies the learning rate by lr_gamma, increasing."""
    lr_gamma: float = 0.1
    """Factor of lr_schedule: step at each milestone."""
    lr_scaling: Literal["none", "linear"] = "none"
    """`linear`: the linear scaling rule, lr x global batch / base_batch_size, so the
    learning rate follows num_workers; `none`: lr as given."""
    base_batch_size: int = 256
    """The global batch size at which lr applies as given, under lr_scaling: linear."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 0.0
    """SGD weight decay (L2)."""
    nesterov: bool = False
    """Nesterov momentum (needs momentum > 0)."""
    seed: int = 0
    """Seeds the model init and every step's global batch."""
    loss: Literal["cross_entropy", "sum"] = "cross_entropy"
    """`cross_entropy` is averaged over the global batch; `sum` is the tutorial's
    `(prediction - targets).sum()` over the global batch, with uniform targets."""
    batchnorm: Literal["train", "frozen", "sync"] = "train"
    """`train` normalises with each shard's statistics (standard DDP, as torchvision
    recipes do); `frozen` keeps BatchNorm in eval mode (running statistics, not trained);
    `sync` normalises with the whole global batch's statistics on any backend
    (distrib/syncbn.py): N workers then train like 1 worker, at two small all-reduces
    per BatchNorm layer per step. With `frozen` or `sync` the maths does not depend on
    the sharding."""
    weights: str = "none"
    """`none` (seeded init), `DEFAULT` (torchvision's pretrained weights) or a .pth path."""
    data: Literal["synthetic", "fake", "folder"] = "synthetic"
    """`synthetic`: uniform images as in the tutorial; `fake`: torchvision FakeData;
    `folder`: torchvision ImageFolder at data_dir."""
    data_dir: str = ""
    """Root of the ImageFolder tree (one sub-folder per class); only for data: folder."""
    augment: Literal["standard", "none"] = "standard"
    """Folder data only: `standard` trains on random-resized crops with horizontal flips, each
    seeded by (seed, sample position); `none` resizes and centre-crops, as evaluation does."""
    decoder: Literal["auto", "pil", "torchvision", "nvjpeg"] = "auto"
    """Folder data only: how images are decoded. `torchvision` (`auto`): torchvision.io in the
    loader worker processes (JPEG with libjpeg-turbo, the pixels PIL gives in half the time; PNG,
    WebP). `pil`: PIL in the loader workers (any format PIL reads). `nvjpeg`: JPEG only, each
    shard decoded as one batch with nvJPEG, cropped, resized and flipped on the GPU while the
    step before trains (distrib/jpeg.py). Crops and flips follow the (seed, sample position) contract."""
    val_dir: str = ""
    """An ImageFolder of held-out images with the same classes as data_dir; `` = none."""
    val_fraction: float = 0.0
    """Hold out this fraction of each class of data_dir (a seeded split) for evaluation;
    0 = none. Not with val_dir."""
    eval_every: int = 0
    """Evaluate loss, top-1 and top-5 on the held-out set every this many steps and at the
    end; 0 = never. Synthetic and fake data get a held-out set of eval_size images."""
    eval_size: int = 1024
    """Held-out images for data: synthetic and fake, made like the training data from a
    stream training never reaches."""
    dataset_size: int = 10_000
    """Number of FakeData samples; only for data: fake."""
    loader_workers: int | Literal["auto"] = "auto"
    """DataLoader worker processes per replica for fake and folder data (they decode and crop);
    `auto`: one per CPU of the replica beyond the first (cpus_per_worker - 1), at least 1."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """`auto` is bf16 autocast on cuda and fp32 on cpu; fp16 adds a gradient scaler."""
    channels_last: bool = True
    """NHWC memory layout for the model and its inputs: the fast layout for tensor cores;
    on a CPU, forward is ~15% faster and DDP's backward a little slower (measured at 64 px)."""
    compile: bool = False
    """torch.compile the model (costs start-up time, pays off on long GPU runs)."""
    cudnn_benchmark: bool = True
    """Let cuDNN time its algorithms on the first steps and keep the fastest (cuda only)."""
    deterministic: bool = False
    """cuda: deterministic kernels only (torch.use_deterministic_algorithms, no cuDNN
    benchmarking), so two runs of one config give the same bits, as they do on a CPU; slower.
    Without it a GPU run's replicas stay identical to each other, not to another run."""
    bucket_cap_mb: float = 25.0
    """DDP gradient bucket size; buckets are all-reduced while backward goes on."""
    grad_compression: Literal["none", "fp16", "bf16"] = "none"
    """All-reduce gradients in half precision (half the bytes, rounded gradients)."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """Ray placement-group strategy for the replicas' bundles."""
    steps_per_call: int = 1
    """Lockstep steps run by one driver call; more hides per-call cost on fast GPU steps."""
    calls_in_flight: int = 2
    """Driver calls queued per replica, so replicas never wait on the driver."""
    check_every: int = 10
    """Compare replica fingerprints every this many steps (and at the end); 0 = end only."""
    run_dir: str = "runs/{time}"
    """Where metrics and summaries go; `{time}` becomes the start time."""
    checkpoint_every: int = 100
    """Snapshot the run every this many steps: kept in the driver's memory for recovery and
    written to RUN_DIR/checkpoints for --resume; 0 = never (recovery then restarts at step 0).
    One follows a consistency check and costs rank 0's step stream one copy of its state (~90 MB);
    it is serialised and written beside the steps. On a GPU space them by seconds of training."""
    keep_checkpoints: int = 2
    """Checkpoint files kept on disk (the newest ones)."""
    tensorboard: bool = False
    """Write TensorBoard event files to RUN_DIR/tb (from the driver): per step loss, lr, images/s
    and phase times; per evaluation loss, top-1 and top-5; the config as text."""
    prometheus: bool = True
    """Publish the run's figures (step time, images/s, loss, eval top-1, per-rank phases, recoveries, checks)
    as Prometheus metrics on Ray's metrics endpoint, labelled by run and rank (ray.util.metrics; distrib/prom.py)."""
    straggler_fraction: float = 0.25
    """Name a rank (one line) whose time to its first collective of a step (its batch; forward too unless
    batchnorm: sync) exceeds the fastest rank's by this fraction of the step over STRAGGLER_WINDOW steps; 0 = off."""
    max_restarts: int = 3
    """Recoveries (heals and restarts) after a lost, stalled or failed replica before giving up."""
    recovery: Literal["heal", "restart"] = "heal"
    """`heal`: the surviving replicas keep their state and their place; only the lost ranks are
    replaced (by a hot spare, else a fresh actor) and filled from a healthy peer; no finished
    step is redone. Where a heal cannot be done (no survivor, NCCL) it falls back to a restart.
    `restart`: replace the whole group and go back to the newest snapshot (steps since redone)."""
    spare_workers: int = 0
    """Hot spares: actors placed and started ahead with the model built, outside the process
    group, that replace a lost rank in a heal without an actor start (one bundle each)."""
    min_workers: int = 0
    """Elastic: when a heal cannot have a lost rank's replacement within `elastic_wait_s` (no
    spare, and the cluster cannot place a fresh actor), go on with the survivors down to this
    many ranks, at the same global batch (each survivor takes over lost ranks' logical shards,
    accumulating their gradients), and grow back to num_workers as soon as the replacement
    starts. 0 = num_workers: never shrink (a heal waits start_timeout_s, then restarts). Heals
    run on gloo only: refused with backend: nccl or recovery: restart, and no effect with
    backend: auto on GPUs (NCCL), where a run restarts instead of healing."""
    elastic_wait_s: float = 30.0
    """How long a heal waits for a replacement before it shrinks the group (min_workers)."""
    stall_timeout_s: float = 3.0
    """A rank that stays at one step and phase this long while a peer has moved on is called
    stalled and replaced (once a few steps are timed: at least 3 x the median step); 0 = off.
    The derived hang limit stays the backstop for a whole group that stops."""
    simulate_step_ms: float = 0.0
    """Simulated replicas (distrib/simreplica.py; `distrib simulate`): each step sleeps this
    long instead of training resnet18, to measure the driver at many replicas; 0 = real ones."""
    faults: str = ""
    """Faults to inject, e.g. `kill:1@5, stall:0@8` (rank@step); see distrib/faults.py."""
    start_timeout_s: float = 120.0
    """Limit for placing, starting and connecting all replicas."""
    step_timeout_s: float = 300.0
    """Limit for one driver call (steps_per_call steps) to finish on every replica; applies
    until a few calls have been timed, and caps the derived limit after that."""
    hang_timeout_factor: float = 10.0
    """Once calls have been timed, a call that takes this many times the median is a hang."""
    hang_timeout_min_s: float = 30.0
    """Floor of the derived hang limit (steps vary: a check, a checkpoint, a slow batch)."""
    stop_grace_s: float = 20.0
    """On SIGTERM or SIGINT, the longest the driver waits for the steps in flight and the checkpoint
    at their boundary, then it stops with the newest checkpoint it has. Keep it below the
    platform's own grace (Kubernetes: 30 s by default)."""

    def __post_init__(self) -> None:
        config_rules.check(self)

    @property
    def global_batch_size(self) -> int:
        return self.num_workers * self.batch_size_per_worker

    @property
    def elastic(self) -> bool:
        """Whether a heal may shrink the group below num_workers (min_workers)."""
        return 0 < self.min_workers < self.num_workers

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with `changes` applied and validated (the original is unchanged)."""
        return from_dict({**to_dict(self), **changes})


_FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}
_HINTS = typing.get_type_hints(RunConfig)


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _type_name(hint: Any) -> str:
    """`hint` as the user reads it in "must be ...": `an integer or auto`, never `typing.Union[...]`."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is Literal:
        return ("one of " if len(args) > 1 else "") + " | ".join(map(str, args))
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(map(_type_name, args))
    if typing.get_origin(hint) is tuple:  # tuple[int, ...]: a YAML list
        return "a list, e.g. [30, 60]"
    return _TYPE_NAMES.get(hint, getattr(hint, "__name__", str(hint)))


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """`value` as type `hint`, or ConfigError. ints are accepted for floats, never bools for numbers."""
    if typing.get_origin(hint) is Literal:
        rule(value in typing.get_args(hint), key, value, "must be " + _type_name(hint))
        return value
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _coerce(key, value, option)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} is invalid: must be {_type_name(hint)}")
    if typing.get_origin(hint) is tuple:  # tuple[int, ...]: a YAML list
        rule(isinstance(value, (list, tuple)), key, value, "must be " + _type_name(hint))
        item = typing.get_args(hint)[0]
        return tuple(_coerce(key, v, item) for v in value)
    if hint is bool:
        rule(isinstance(value, bool), key, value, "must be true or false")
    elif hint is int:
        rule(isinstance(value, int) and not isinstance(value, bool), key, value, "must be an integer")
    elif hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        rule(isinstance(value, (int, float)) and not isinstance(value, bool), key, value, "must be a number")
        value = float(value)
    elif hint is str:
        # YAML reads an unquoted value that starts with { as a mapping: `run_dir: {time}/x`.
        rule(isinstance(value, str), key, value,
             "must be a string; quote a value that starts with {, as in run_dir: \"{time}\""
             if isinstance(value, dict) else "must be a string")
    return value


def unknown_key(key: str, known: typing.Iterable[str], *, prefix: str = "") -> ConfigError:
    """The error for a key that is not in `known`, with the closest known one as the fix."""
    known, key = list(known), str(key)  # YAML may give a number (`1: 2`)
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(known)}"
    return ConfigError(f"{prefix}{key}: unknown key{hint}")


def from_dict(values: dict[str, Any]) -> RunConfig:
    """A validated RunConfig from plain values (as YAML gives them)."""
    for key in values:
        if key not in _FIELDS:
            raise unknown_key(key, _FIELDS)
    return RunConfig(**{key: _coerce(key, value, _HINTS[key]) for key, value in values.items()})


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Plain values (tuples as lists), as YAML and JSON hold them."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`["key=value", ...]` from `--set`, each value parsed as YAML (so `lr=0.1` is a float)."""
    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {pair!r} is invalid: write it as key=value, e.g. --set steps=10")
        key = key.strip()
        try:
            values[key] = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            values[key] = text  # a bare string with YAML-special characters, e.g. a path
        # `run_dir={time}` reads as the mapping {time: null}; YAML needs quotes, and the shell
        # needs its own around them, or it strips YAML's.
        if isinstance(values[key], dict) and _HINTS.get(key) is str:
            raise ConfigError(f"{key}: {text!r} is invalid: YAML reads a value that starts with {{ as a mapping; "
                              f"quote it inside the shell's quotes: --set '{key}=\"{text}\"'")
    return values


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping, which PyYAML keeps the last of."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: list[Any] = []  # a list: a key may be unhashable, which SafeLoader itself refuses
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` merges, it is no key
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (else the last would win silently); keep one",
                    key_node.start_mark)
            seen.append(key)
        return super().construct_mapping(node, deep=deep)


def _quote_hint(text: str, err: yaml.YAMLError) -> str:
    """The fix when the line of a YAML error holds `key: {...`, an unquoted value that starts with {."""
    lines = text.splitlines()
    for mark in (getattr(err, "problem_mark", None), getattr(err, "context_mark", None)):
        if mark is not None and mark.line < len(lines):
            key, sep, value = lines[mark.line].partition(":")
            value = value.split(" #")[0].strip()  # without a trailing comment
            if sep and value.startswith("{"):
                return f"; YAML reads a value that starts with {{ as a mapping: quote it, {key.strip()}: \"{value}\""
    return ""


def read_yaml(path: str | Path, *, what: str = "YAML file") -> dict[str, Any]:
    """The mapping in a YAML file ({} for an empty one); ConfigError naming the file, and the
    line and column of a syntax error, when it is missing, malformed (a key given twice in one
    mapping included) or not a mapping."""
    path = Path(path) if isinstance(path, str) else path  # a Path, or a storage.RemotePath
    if not path.is_file():
        raise ConfigError(f"config: {str(path)!r} is invalid: no such file; pass an existing {what}")
    try:
        text = path.read_text()
        loaded = yaml.load(text, Loader=_UniqueKeyLoader)  # safe: a SafeLoader subclass
    except UnicodeDecodeError as err:
        raise ConfigError(f"config: {str(path)!r} is invalid: not UTF-8 text ({err.reason} at byte {err.start}); "
                          f"save it as UTF-8, or pass another {what}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "not valid YAML"
        raise ConfigError(f"config: {str(path)!r} is malformed YAML{where}: {problem}"
                          f"{_quote_hint(text, err)}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"config: {str(path)!r} is invalid: must be a YAML mapping of key: value")
    return loaded or {}


def load(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Load a YAML run config (or the defaults when `path` is None) and apply `--set` overrides."""
    values = read_yaml(path) if path is not None else {}
    values.update(parse_overrides(list(overrides)))
    return from_dict(values)
