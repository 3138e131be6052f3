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
import io
import json
import os
import time
from pathlib import Path

import torch
import torchvision

from distrib import checkpoint, evaluation, storage
from distrib.data import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from distrib.errors import ConfigError
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
    `out` may be a URI: both are then uploaded, each object whole. Either way both appear whole
    or not at all."""
    target = None
    if out is not None and storage.is_uri(str(out)):
        storage.check_writable(str(out), what="--out")
        target = storage.locate(str(out), what="--out")
    state, meta = from_run(run_dir)
    if target is not None:
        weights = io.BytesIO()
        torch.save(state, weights)
        storage.write_whole(target, [weights.getvalue()])
        storage.write_whole(target.with_suffix(".json"), [json.dumps(meta, indent=2).encode() + b"\n"])
        return target
    if out is None:
        out = Path("model.pth") if storage.is_uri(str(run_dir)) else Path(run_dir) / "model.pth"
    out = Path(out)
    _write_atomically(out, lambda f: torch.save(state, f))
    _write_atomically(out.with_suffix(".json"), lambda f: f.write(json.dumps(meta, indent=2).encode() + b"\n"))
    return out


def _write_atomically(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("wb") as f:
            write(f)
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):  # nothing half-written left behind, where there is a folder
            tmp.unlink()
        raise ConfigError(f"--out: {str(path)!r} cannot be written ({err.strerror}); "
                          "choose a path in a writable folder") from None


def load(source: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict, metadata) from a run directory or an exported .pth with its .json beside it."""
    if storage.is_uri(str(source)):
        return from_run(source)
    source = Path(source)
    if source.is_dir():
        return from_run(source)
    sidecar = source.with_suffix(".json")
    if not source.is_file() or not sidecar.is_file():
        raise ConfigError(f"model: {str(source)!r} is invalid: give a run directory or a file written by "
                          "distrib export (a .pth with its .json beside it)")
    return torch.load(source, map_location="cpu", weights_only=True), json.loads(sidecar.read_text())


def evaluate_folder(source: str | Path, data_dir: str | Path, *, batch_size: int = 64,
                    loader_workers: int = 2) -> EvalMetrics:
    """Loss, top-1 and top-5 of the model at `source` on the ImageFolder at `data_dir`, whose
    classes must be the model's (by name)."""
    state, meta = load(source)
    transform = eval_transform(meta["image_size"], normalize=meta["mean"] is not None)
    if not Path(data_dir).is_dir():
        raise ConfigError(f"--data: {str(data_dir)!r} is invalid: no such directory; give an ImageFolder root")
    dataset = torchvision.datasets.ImageFolder(str(data_dir), transform=transform)
    if dataset.classes != meta["classes"]:
        differ = sorted(set(meta["classes"]) ^ set(dataset.classes))
        raise ConfigError(f"--data: {str(data_dir)!r} is invalid: its classes are not the model's (first "
                          f"difference: {differ[0] if differ else 'their order'!r}); give the same class folders")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = torchvision.models.resnet18(num_classes=meta["num_classes"])
    model.load_state_dict(state)
    model.to(device).eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=loader_workers)
    batches = ((images.to(device), targets.to(device)) for images, targets in loader)
    started = time.perf_counter()
    counts = evaluation.evaluate(model, batches)
    return combine_evals(step=meta["step"] - 1, rank_records=[counts], eval_s=time.perf_counter() - started,
                         finished_at=time.time())
