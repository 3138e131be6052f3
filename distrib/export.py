"""`distrib export` and `distrib evaluate`: take a trained model away, and score one on an ImageFolder.

    distrib export RUN_DIR [--out model.pth]       # plain resnet18 state_dict + model.json beside it
    distrib evaluate RUN_DIR_OR_MODEL --data DIR    # loss, top-1, top-5 on an ImageFolder

RUN_DIR and --out may be object-storage URIs (storage.py); without --out the exported files
are local (./model.pth for a URI RUN_DIR).

The exported file loads with plain torchvision, and `weights:` takes it:

    model = torchvision.models.resnet18(num_classes=K)
    model.load_state_dict(torch.load("model.pth", weights_only=True))

The sidecar JSON holds what inference needs besides the weights: the class names in
output order, the image size, the normalisation and the step the weights are from.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import time
from pathlib import Path

import torch
import torchvision
from PIL import Image

from distrib import checkpoint, evaluation, folders, storage
from distrib.data import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from distrib.errors import CheckpointError, ConfigError, first_line
from distrib.metrics import EvalMetrics, combine_evals
from distrib.storage import RemotePath


def from_run(run_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict, metadata) of the newest valid checkpoint in `run_dir`; CheckpointError if none."""
    run_dir = storage.locate(run_dir, what="RUN_DIR")
    ckpt, _ = checkpoint.newest_valid(run_dir)
    state = torch.load(io.BytesIO(ckpt.payload), map_location="cpu", weights_only=True)["model"]
    cfg = ckpt.config
    classes_file = run_dir / "classes.json"
    classes = (json.loads(classes_file.read_text()) if classes_file.is_file()
               else [str(i) for i in range(cfg["num_classes"])])
    normalized = cfg["data"] == "folder"  # synthetic and fake images are fed as they are, in [0, 1]
    meta = {"classes": classes, "num_classes": cfg["num_classes"], "image_size": cfg["image_size"],
            "mean": list(IMAGENET_MEAN) if normalized else None, "std": list(IMAGENET_STD) if normalized else None,
            "step": ckpt.step, "checkpoint": str(ckpt.path)}
    # contiguous: a channels_last replica's tensors keep their strides through torch.save
    return {name: tensor.contiguous() for name, tensor in state.items()}, meta


def export(run_dir: str | Path, out: str | Path | None = None) -> Path | RemotePath:
    """Write the run's newest valid weights as a plain resnet18 state_dict at `out` (default
    RUN_DIR/model.pth; ./model.pth for a URI), with its metadata at the same path ending in .json.
    ConfigError, with nothing written, for an `out` ending in .json (the two would be one file) or
    whose .pth or .json is a folder. Each file appears whole, the .json after the .pth (renamed
    locally, uploaded whole to object storage); the .json holds the .pth's sha256, so a pair
    left half-replaced by a crash between the two is refused by load()."""
    if out is None:
        out = Path("model.pth") if storage.is_uri(str(run_dir)) else Path(run_dir) / "model.pth"
    target = storage.locate(str(out), what="--out")
    if target.name.lower().endswith(".json"):
        raise ConfigError(f"--out: {str(out)!r} is invalid: the metadata is written beside the weights as .json, "
                          "so the weights cannot be .json too; give a path ending in .pth")
    storage.check_writable(str(out), what="--out")  # a URI only: no credentials, no bucket
    state, meta = from_run(run_dir)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    weights = buffer.getvalue()
    # The .json names its .pth by digest: a pair cut short between its two writes (new weights,
    # old metadata) is refused by load() rather than read as one model.
    meta["weights_sha256"] = hashlib.sha256(weights).hexdigest()
    meta_bytes = json.dumps(meta, indent=2).encode() + b"\n"
    if isinstance(target, RemotePath):
        storage.write_whole(target, [weights])
        storage.write_whole(target.with_suffix(".json"), [meta_bytes])
        return target
    _write_pair(target, weights, meta_bytes)
    return target


def _write_pair(out: Path, weights: bytes, meta_bytes: bytes) -> None:
    """`weights` at `out` and `meta_bytes` at `out` with .json: each written to a temporary file
    beside it, then both renamed, so each appears whole or not at all (ConfigError if not). A crash
    between the two renames leaves new weights beside old metadata: load() refuses that pair."""
    sidecar = out.with_suffix(".json")
    for path in (out, sidecar):
        if path.is_dir():  # a rename onto a folder fails: after the first rename, that would be half a pair
            raise ConfigError(f"--out: {str(path)!r} is a folder, where export writes a file; remove it "
                              "or give another --out")
    temps = [out.with_name(out.name + ".tmp"), sidecar.with_name(sidecar.name + ".tmp")]
    try:
        temps[0].write_bytes(weights)
        temps[1].write_bytes(meta_bytes)
        os.replace(temps[0], out)
        os.replace(temps[1], sidecar)
    except OSError as err:
        raise ConfigError(f"--out: {str(out)!r} cannot be written ({err.strerror}); "
                          "choose a path in a writable folder") from None
    finally:  # nothing half-written left behind, whatever stopped it (after a success, none is left)
        for tmp in temps:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)


META_KEYS = ("classes", "num_classes", "image_size", "mean", "step")
"""What `distrib evaluate` reads from an exported model's .json."""


def load(source: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict, metadata) from a run directory or an exported .pth with its .json beside it
    (either may be on object storage); CheckpointError for a .pth or .json that cannot be read."""
    if storage.is_uri(str(source)):
        source = storage.locate(str(source), what="model")
        if not source.name.endswith(".pth"):  # no folders there: a URI not naming a .pth is a run
            return from_run(source)
    else:
        source = Path(source)
        if source.is_dir():
            return from_run(source)
    sidecar = source.with_suffix(".json")
    if not source.is_file() or not sidecar.is_file():
        raise ConfigError(f"model: {str(source)!r} is invalid: give a run directory or a file written by "
                          "distrib export (a .pth with its .json beside it)")
    try:
        meta = json.loads(sidecar.read_text())
    except (ValueError, OSError) as err:
        raise CheckpointError(f"model: {str(sidecar)!r} is unreadable ({first_line(err)}); give the .json "
                              "distrib export wrote beside the .pth") from None
    missing = [key for key in META_KEYS if key not in meta] if isinstance(meta, dict) else list(META_KEYS)
    if missing:
        raise CheckpointError(f"model: {str(sidecar)!r} is not what distrib export writes (no {missing[0]!r}); "
                              "give the .json distrib export wrote beside the .pth")
    try:
        weights = source.read_bytes()
    except OSError as err:
        raise CheckpointError(f"model: {str(source)!r} is unreadable ({first_line(err)}); give a .pth written by "
                              "distrib export") from None
    expected = meta.get("weights_sha256")
    if expected is not None and hashlib.sha256(weights).hexdigest() != expected:
        raise CheckpointError(f"model: {str(source)!r} is not the weights {str(sidecar)!r} describes (an export "
                              "was cut short between its two files); run distrib export again")
    try:
        state = torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        # torch's own message runs to many lines: the file and the error's type say enough
        raise CheckpointError(f"model: {str(source)!r} is unreadable: torch.load fails ({type(err).__name__}); "
                              "give a .pth written by distrib export") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"model: {str(source)!r} holds a {type(state).__name__}, not a state_dict; "
                              "give a .pth written by distrib export")
    return state, meta


UNDECODABLE = "cannot be decoded by PIL"


def _pil_image(path: str) -> Image.Image:
    """ImageFolder's own loader (PIL, RGB), naming a file it cannot decode."""
    try:
        with open(path, "rb") as file:
            return Image.open(file).convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"--data: {path} {UNDECODABLE} ({first_line(err)}); re-encode or remove it") from None


def evaluate_folder(source: str | Path, data_dir: str | Path, *, batch_size: int = 64,
                    loader_workers: int = 2) -> EvalMetrics:
    """Loss, top-1 and top-5 of the model at `source` on the ImageFolder at `data_dir`, whose
    classes must be the model's (by name). ConfigError or CheckpointError, one line, for bad input;
    the cheap checks come before the model is read."""
    if batch_size < 1:
        raise ConfigError(f"--batch-size: {batch_size} is invalid: must be >= 1; give the images per batch")
    folders.nonempty_tree("--data", str(data_dir))  # the check training makes of data_dir
    state, meta = load(source)
    transform = eval_transform(meta["image_size"], normalize=meta["mean"] is not None)
    dataset = torchvision.datasets.ImageFolder(str(data_dir), transform=transform, loader=_pil_image)
    if dataset.classes != meta["classes"]:
        differ = sorted(set(meta["classes"]) ^ set(dataset.classes))
        raise ConfigError(f"--data: {str(data_dir)!r} is invalid: its classes are not the model's (first "
                          f"difference: {differ[0] if differ else 'their order'!r}); give the same class folders")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = torchvision.models.resnet18(num_classes=meta["num_classes"])
    try:
        model.load_state_dict(state)
    except RuntimeError as err:  # torch lists every key and shape that differs, over many lines
        raise CheckpointError(f"model: {str(source)!r} is not a resnet18 with {meta['num_classes']} classes "
                              f"({first_line(err)}); give a .pth written by distrib export") from None
    model.to(device).eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=loader_workers)
    batches = ((images.to(device), targets.to(device)) for images, targets in loader)
    started = time.perf_counter()
    try:
        counts = evaluation.evaluate(model, batches)
    except ValueError as err:  # from a loader process: torch wraps _pil_image's line in a traceback
        line = str(err).strip().splitlines()[-1].removeprefix("ValueError: ")
        if UNDECODABLE not in line:
            raise
        raise ConfigError(line) from None
    return combine_evals(step=meta["step"] - 1, rank_records=[counts], eval_s=time.perf_counter() - started,
                         finished_at=time.time())
