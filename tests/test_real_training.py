"""Training a model a user keeps, on real images (scikit-learn's digits), with real Ray and gloo:
held-out evaluation, learning-rate schedules, seeded augmentation, export, and bad input."""

from __future__ import annotations

import io
import json
import shutil

import pytest
import torch
import torchvision

from distrib import ConfigError, Orchestrator, RunConfig, checkpoint, cli
from distrib.data import training_dataset
from distrib.model import load_weights
from distrib.schedule import lr_at
from tests.conftest import all_rank_states, assert_bit_identical, flat_state

pytestmark = pytest.mark.usefixtures("ray_local")


def digits_cfg(digits_folder, run_dir, **changes) -> RunConfig:
    return RunConfig(num_workers=2, device="cpu", data="folder", data_dir=str(digits_folder), num_classes=10,
                     image_size=32, batch_size_per_worker=16, steps=48, lr=0.1, warmup_steps=5,
                     lr_schedule="cosine", val_fraction=0.2, eval_every=24, augment="none", loader_workers=1,
                     check_every=12, checkpoint_every=24, run_dir=str(run_dir)).replace(**changes)


def records(run_dir, kind: str) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r["kind"] == kind]


def test_learns_real_images_then_exports_a_plain_torchvision_model(digits_folder, tmp_path, capsys):
    run_dir = tmp_path / "run"
    cfg = digits_cfg(digits_folder, run_dir, tensorboard=True)
    with Orchestrator(cfg, progress=False) as orch:
        orch.train()
    evals = records(run_dir, "eval")
    assert [e["step"] for e in evals] == [23, 47]
    # val_fraction 0.2 of each class (174 to 183 images) rounds to 35, 36 or 37: 359 in all
    assert all(e["count"] == 359 for e in evals)
    assert evals[-1]["top1"] > 0.3 and evals[-1]["top5"] >= evals[-1]["top1"]  # chance is 0.1
    steps = records(run_dir, "step")
    assert [s["lr"] for s in steps] == [lr_at(cfg, s["step"]) for s in steps]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_top1"] == evals[-1]["top1"] and summary["best_top1"] == max(e["top1"] for e in evals)

    # TensorBoard's own reader sees what metrics.jsonl says (as float32)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(run_dir / "tb")).Reload()
    assert [e.step for e in board.Scalars("train/loss")] == [s["step"] for s in steps]
    assert [e.value for e in board.Scalars("train/loss")] == pytest.approx([s["loss"] for s in steps], rel=1e-6)
    assert [e.value for e in board.Scalars("train/lr")] == pytest.approx([s["lr"] for s in steps], rel=1e-6)
    assert [e.value for e in board.Scalars("eval/top1")] == pytest.approx([e["top1"] for e in evals], rel=1e-6)
    assert {"train/images_per_s", "phase/data_s", "phase/backward_s", "phase/comm_s"} <= set(board.Tags()["scalars"])
    assert b"num_workers: 2" in board.Tensors("config/text_summary")[0].tensor_proto.string_val[0]

    # In this process, where torch is imported already (a subprocess would take ~5 CPU-seconds to import it):
    # the `python -m distrib` entry point itself is run as a subprocess by test_training and test_stop.
    assert cli.main(["export", str(run_dir), "--out", str(tmp_path / "digits.pth")]) == 0, capsys.readouterr().err
    model = torchvision.models.resnet18(num_classes=10)
    model.load_state_dict(torch.load(tmp_path / "digits.pth", weights_only=True))
    meta = json.loads((tmp_path / "digits.json").read_text())
    assert meta["classes"] == [str(i) for i in range(10)] and meta["image_size"] == 32 and meta["step"] == 48
    assert load_weights(str(tmp_path / "digits.pth"), num_classes=10).keys() == model.state_dict().keys()

    scores = []
    for source in (tmp_path / "digits.pth", run_dir):  # the same weights, from the file and from the run
        capsys.readouterr()
        assert cli.main(["evaluate", str(source), "--data", str(digits_folder)]) == 0, capsys.readouterr().err
        scores.append(capsys.readouterr().out.strip().splitlines()[-1])
    assert scores[0] == scores[1] and scores[0].startswith("1797 images: loss ")


def test_weights_reach_every_replica_and_evaluation_is_exact_for_any_number_of_workers(digits_folder, tmp_path):
    torch.manual_seed(7)
    weights = tmp_path / "w.pth"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), weights)
    conv1 = torch.load(weights, weights_only=True)["conv1.weight"]
    results = {}
    for workers in (1, 2):
        cfg = digits_cfg(digits_folder, tmp_path / f"w{workers}", num_workers=workers, weights=str(weights))
        with Orchestrator(cfg, progress=False) as orch:
            for state in all_rank_states(orch):
                assert torch.equal(state["model"]["conv1.weight"], conv1)  # the file's, not a seeded init
            results[workers] = orch.evaluate()
    one, two = results[1], results[2]
    assert (one.count, one.top1, one.top5) == (two.count, two.top1, two.top5) and one.count == 359
    assert one.loss == pytest.approx(two.loss, rel=1e-6)  # per-image losses summed in another order


def test_training_is_bit_identical_with_and_without_evaluation(small_cfg, tmp_path):
    """Evaluation averages BatchNorm's running statistics for itself and puts every bit back."""
    states = []
    for eval_every in (0, 2):
        cfg = small_cfg.replace(eval_every=eval_every, eval_size=24, run_dir=str(tmp_path / f"e{eval_every}"))
        with Orchestrator(cfg, progress=False) as orch:
            orch.train()
            states.append(flat_state(orch.state()))
            assert len(orch.evals) == (2 if eval_every else 0)
    assert_bit_identical(states[0], states[1])


def test_a_resume_evaluates_where_it_goes_on_unless_that_evaluation_ran(small_cfg, tmp_path):
    """A driver that died between the checkpoint at step 4 and the evaluation queued behind it
    left no record of that evaluation (cut here from a finished run's metrics): the resume
    runs it before step 4. Where the record is there, it does not run again; nor after the
    restart back to step 4 that a kill at step 5 makes (recovery: restart)."""
    cfg = small_cfg.replace(eval_every=2, eval_size=8, checkpoint_every=2)
    done = tmp_path / "done"
    with Orchestrator(cfg.replace(run_dir=str(done)), progress=False) as orch:
        orch.train()
    crashed = tmp_path / "crashed"
    shutil.copytree(done, crashed)
    metrics = crashed / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text("".join(line for line in lines if (json.loads(line)["kind"], json.loads(line)["step"])
                               != ("eval", 3)))
    for run_dir, evaluated in ((done, [5]), (crashed, [3, 5])):
        resumed = cfg.replace(steps=6, run_dir=str(run_dir), faults="kill:1@5", recovery="restart")
        with Orchestrator(resumed, progress=False, resume_dir=run_dir) as orch:
            orch.train()
        assert orch.restarts == 1 and [m.step for m in orch.evals] == evaluated
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if r["kind"] == "eval"] == [1, 3, 5]


def test_augmentation_is_seeded_by_sample_position(digits_folder):
    cfg = RunConfig(data="folder", data_dir=str(digits_folder), num_classes=10, image_size=32, augment="standard")
    dataset = training_dataset(cfg)
    first, again, elsewhere = dataset[(5, 100)], dataset[(5, 100)], dataset[(5, 101)]
    assert torch.equal(first[0], again[0]) and first[1] == again[1] == 0
    assert not torch.equal(first[0], elsewhere[0])  # another position draws another crop
    plain = training_dataset(cfg.replace(augment="none"))[(5, 100)]
    assert not torch.equal(first[0], plain[0]) and first[0].shape == plain[0].shape == (3, 32, 32)


def test_augmented_n_workers_equal_one_worker(digits_folder, tmp_path):
    """As in test_training: BatchNorm frozen, NCHW, float32 summation order only."""
    base = RunConfig(device="cpu", data="folder", data_dir=str(digits_folder), num_classes=10, image_size=32,
                     augment="standard", batchnorm="frozen", channels_last=False, steps=2, lr=0.05,
                     loader_workers=0, check_every=1)
    results = {}
    for workers, batch in ((2, 4), (1, 8)):
        cfg = base.replace(num_workers=workers, batch_size_per_worker=batch, run_dir=str(tmp_path / f"w{workers}"))
        with Orchestrator(cfg, progress=False) as orch:
            losses = [m.loss for m in orch.train()]
            results[workers] = (flat_state(orch.state()), losses)
            with pytest.raises(ConfigError, match="data: folder has no held-out set; set val_dir or val_fraction"):
                orch.evaluate()
    (two, two_losses), (one, one_losses) = results[2], results[1]
    assert two_losses == pytest.approx(one_losses, rel=1e-5)
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-6)


def _digits_subset(digits_folder, root, classes, images_per_class=None):
    for name in classes:
        (root / name).mkdir(parents=True)
        for path in sorted((digits_folder / name).iterdir())[:images_per_class]:
            shutil.copy(path, root / name / path.name)
    return root


@pytest.mark.parametrize(("sets", "message"), [
    (["val_dir=VAL/none", "eval_every=4"], "val_dir: '{VAL}/none' is invalid: no such directory"),
    (["val_dir=VAL/empty", "eval_every=4"], "val_dir: '{VAL}/empty' is invalid: it has no class folders"),
    (["val_dir=VAL/fewer", "eval_every=4"], "its classes differ from data_dir's (val_dir lacks '9')"),
    (["data_dir=VAL/single", "num_classes=2", "val_fraction=0.5"], "it leaves class '1' (1 image) with none"),
    (["val_fraction=1.5"], "val_fraction: 1.5 is invalid: must be in (0, 1)"),
    (["warmup_steps=48"], "warmup_steps: 48 is invalid: must be >= 0 and shorter than the run (steps=48)"),
    (["lr_schedule=step", "lr_milestones=[30, 10]"], "lr_milestones: [30, 10] is invalid: must be in increasing"),
    (["lr_schedule=step", "lr_milestones=[10, 48]"], "lr_milestones: [10, 48] is invalid: each must be a step"),
    (["eval_every=4"], "data: folder needs a held-out set to evaluate"),
])
def test_bad_input_is_one_line_exit_2_and_leaves_no_run_dir(digits_folder, tmp_path, capsys, sets, message):
    val = tmp_path / "val"
    (val / "empty").mkdir(parents=True)
    _digits_subset(digits_folder, val / "fewer", [str(i) for i in range(9)], images_per_class=2)
    _digits_subset(digits_folder, val / "single", ["0"], images_per_class=3)
    _digits_subset(digits_folder, val / "single", ["1"], images_per_class=1)
    config = tmp_path / "cfg.yaml"
    config.write_text(f"data: folder\ndata_dir: {digits_folder}\nnum_classes: 10\nsteps: 48\n"
                      f"run_dir: {tmp_path / 'run'}\n")
    args = ["train", "--config", str(config)] + [a for s in sets for a in ("--set", s.replace("VAL", str(val)))]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("distrib: error: ") and "\n" not in err
    assert message.replace("{VAL}", str(val)) in err, err
    assert not (tmp_path / "run").exists()


def test_export_errors_are_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "empty-run").mkdir()
    assert cli.main(["export", str(tmp_path / "empty-run")]) == 2
    assert "no valid checkpoint in" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("")
    run_dir = tmp_path / "run"
    with Orchestrator(RunConfig(num_workers=1, device="cpu", batch_size_per_worker=2, image_size=32, num_classes=10,
                                steps=1, checkpoint_every=1, run_dir=str(run_dir)), progress=False) as orch:
        orch.train()
    assert cli.main(["export", str(run_dir), "--out", str(tmp_path / "a-file" / "model.pth")]) == 2
    # Ray prints its own processes' warnings to this process's stderr (a disk nearly full, in CI once).
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "(raylet)" not in line]
    assert len(err) == 1 and "cannot be written" in err[0], err
    assert cli.main(["export", str(run_dir)]) == 0 and (run_dir / "model.pth").is_file()


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory):
    """A run directory holding one checkpoint of an untrained 2-class resnet18, written directly:
    export and evaluate read it as a trained run's, with no training (and no Ray) to make it."""
    run_dir = tmp_path_factory.mktemp("resnet") / "run"
    payload = io.BytesIO()
    torch.save({"model": torchvision.models.resnet18(num_classes=2).state_dict()}, payload)
    checkpoint.write(run_dir, step=1, cfg=RunConfig(num_classes=2, image_size=32, steps=1),
                     payload=payload.getvalue(), keep=1)
    return run_dir


def one_line_error(capsys) -> str:
    """The command's one line on stderr (less Ray's own processes' warnings, as above)."""
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "(raylet)" not in line]
    assert len(err) == 1 and err[0].startswith("distrib: error: "), err
    return err[0]


def test_export_refuses_an_out_ending_in_json(resnet_run, tmp_path, capsys):
    """The metadata goes to --out with .json: a .json --out would be the same file, the weights lost."""
    assert cli.main(["export", str(resnet_run), "--out", str(tmp_path / "model.json")]) == 2
    assert "give a path ending in .pth" in one_line_error(capsys)
    assert list(tmp_path.iterdir()) == []


def test_export_writes_both_files_or_changes_neither(resnet_run, tmp_path, capsys):
    out = tmp_path / "model.pth"
    out.write_bytes(b"an older export")
    (tmp_path / "model.json").mkdir()  # the metadata cannot be written: the weights must not be either
    assert cli.main(["export", str(resnet_run), "--out", str(out)]) == 2
    assert out.read_bytes() == b"an older export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.pth"]  # no temporary file left
    assert f"'{tmp_path / 'model.json'}' is a folder" in one_line_error(capsys)
    (tmp_path / "model.json").rmdir()
    assert cli.main(["export", str(resnet_run), "--out", str(out)]) == 0, capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.pth"]
    assert json.loads((tmp_path / "model.json").read_text())["step"] == 1
    torchvision.models.resnet18(num_classes=2).load_state_dict(torch.load(out, weights_only=True))


@pytest.mark.parametrize(("model", "data", "more", "message"), [
    ("RUN", "good", ["--batch-size", "0"], "--batch-size: 0 is invalid: must be >= 1"),
    ("RUN", "empty", [], "--data: '{TMP}/empty' is invalid: it has no class folders"),
    ("RUN", "no-images", [], "--data: '{TMP}/no-images' is invalid: class folder '0' holds no images"),
    ("bad.pth", "good", [], "model: '{TMP}/bad.pth' is unreadable: torch.load fails (UnpicklingError)"),
    ("three.pth", "good", [], "model: '{TMP}/three.pth' is not a resnet18 with 2 classes (Error(s) in loading"),
    ("torn.pth", "good", [], "model: '{TMP}/torn.pth' is not the weights '{TMP}/torn.json' describes (an export "
                             "was cut short between its two files); run distrib export again"),
    ("nometa.pth", "good", [], "model: '{TMP}/nometa.json' is not what distrib export writes (no 'classes')"),
    ("tensor.pth", "good", [], "model: '{TMP}/tensor.pth' holds a Tensor, not a state_dict"),
    ("RUN", "good", [], "--data: {TMP}/good/0/a.png cannot be decoded by PIL (cannot identify image file"),
])
def test_evaluate_bad_input_is_one_line_exit_2(resnet_run, tmp_path, capsys, model, data, more, message):
    for name in ("0", "1"):  # the model's classes; no image is read before these errors
        (tmp_path / "good" / name).mkdir(parents=True)
        (tmp_path / "good" / name / "a.png").write_bytes(b"")
        (tmp_path / "no-images" / name).mkdir(parents=True)
    (tmp_path / "empty").mkdir()
    meta = {"classes": ["0", "1"], "num_classes": 2, "image_size": 32, "mean": None, "std": None, "step": 1}
    for name in ("bad", "three", "tensor"):
        (tmp_path / f"{name}.json").write_text(json.dumps(meta))
    (tmp_path / "bad.pth").write_bytes(b"not a torch file\n")
    (tmp_path / "nometa.pth").write_bytes(b"")
    (tmp_path / "nometa.json").write_text("{}\n")
    torch.save(torch.zeros(2), tmp_path / "tensor.pth")
    if model == "three.pth":  # weights of a 3-class head, described as 2 classes
        torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), tmp_path / model)
    if model == "torn.pth":  # an export cut short between its renames: new weights, the old export's .json
        assert cli.main(["export", str(resnet_run), "--out", str(tmp_path / model)]) == 0
        torch.save(torchvision.models.resnet18(num_classes=2).state_dict(), tmp_path / model)
    model = str(resnet_run) if model == "RUN" else str(tmp_path / model)
    assert cli.main(["evaluate", model, "--data", str(tmp_path / data), *more]) == 2
    assert message.replace("{TMP}", str(tmp_path)) in one_line_error(capsys)
