"""Config loading and validation: every kind of bad input gives one clear line and exit code 2."""

from __future__ import annotations

import math
import subprocess
import sys
import typing

import pytest

from distrib import config
from distrib.config import ConfigError, RunConfig


def write(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_defaults_are_the_local_run():
    cfg = config.load(None)
    assert cfg == RunConfig()
    assert (cfg.num_workers, cfg.device, cfg.data) == (2, "auto", "synthetic")


def test_yaml_and_overrides(tmp_path):
    cfg = config.load(write(tmp_path, "num_workers: 3\nlr: 1\nnesterov: true\n"),
                      ["steps=7", "placement_strategy=SPREAD", "momentum=0.5"])
    assert cfg.num_workers == 3 and cfg.steps == 7 and cfg.placement_strategy == "SPREAD"
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.nesterov and cfg.momentum == 0.5


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        RunConfig().steps = 3


@pytest.mark.parametrize(("text", "overrides", "expected"), [
    ("num_wokers: 2\n", [], "num_wokers: unknown key; did you mean 'num_workers'?"),
    ("steps: ten\n", [], "steps: 'ten' is invalid: must be an integer"),
    ("nesterov: 1\n", [], "nesterov: 1 is invalid: must be true or false"),
    ("lr: -0.1\n", [], "lr: -0.1 is invalid: must be > 0"),
    ("momentum: 1.5\n", [], "momentum: 1.5 is invalid: must be in [0, 1)"),
    ("device: tpu\n", [], "device: 'tpu' is invalid: must be one of auto | cpu | cuda"),
    ("", ["image_size=16"], "image_size: 16 is invalid: must be >= 32"),
    ("", ["lr"], "--set 'lr' is invalid: write it as key=value"),
    ("loss: sum\ndata: fake\n", [], "the sum loss needs uniform targets"),
    ("data: folder\n", [], "data_dir: '' is invalid: data: folder needs data_dir"),
    ("weights: model.bin\n", [], "weights: 'model.bin' is invalid"),
    ("- 1\n- 2\n", [], "must be a YAML mapping"),
    ("gpus_per_worker: 2\n", [], "gpus_per_worker: 2.0 is invalid: must be in (0, 1]"),
    ("gpus_per_worker: 0.5\nbackend: nccl\n", [], "nccl refuses two ranks on one GPU"),
    ("num_workers: 2\nmin_workers: 3\n", [], "min_workers: 3 is invalid: must be in [1, num_workers=2]"),
    ("num_workers: 2\nmin_workers: 1\nbatchnorm: sync\n", [], "batchnorm: sync cannot run shrunk"),
    ("num_workers: 2\nmin_workers: 1\nrecovery: restart\n", [], "a group shrinks in a heal"),
    ("1: 2\n", [], "1: unknown key; known keys: "),
    ("", ["run_dir=runs/{name}"], "run_dir: 'runs/{name}' is invalid: may hold {time} (the start time) and no other"),
    ("", ["run_dir=runs/a{"], "run_dir: 'runs/a{' is invalid: may hold {time}"),
    ("run_dir: {time}\n", [], "must be a string; quote a value that starts with {"),
    ("", ["start_timeout_s=.inf"], "start_timeout_s: inf is invalid: must be a finite number"),
    ("", ["loader_workers=1.5"], "loader_workers: 1.5 is invalid: must be an integer or auto"),
    ("", ["precision=fp64"], "precision: 'fp64' is invalid: must be one of auto | fp32 | bf16 | fp16"),
    ("", ["batch_size_per_worker=1", "image_size=32"], "batch_size_per_worker: 1 is invalid: BatchNorm in training"),
])
def test_bad_values_name_key_value_and_rule(tmp_path, text, overrides, expected):
    with pytest.raises(ConfigError) as err:
        config.load(write(tmp_path, text), overrides)
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("device", "gpus_per_worker", "backend"), [
    ("cuda", 1.0, "nccl"), ("cuda", 0.5, "gloo"), ("cpu", 1.0, "gloo")])
def test_auto_backend_is_gloo_where_replicas_share_a_gpu(device, gpus_per_worker, backend):
    from distrib import comm

    cfg = RunConfig(device=device, gpus_per_worker=gpus_per_worker)
    assert comm.resolve_config(cfg, cluster_gpus=1).backend == backend


def test_missing_file_and_malformed_yaml(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        config.load(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match=r"malformed YAML at line \d+, column \d+"):
        config.load(write(tmp_path, "steps: 3\nlr: [0.1\n"))


FLOAT_FIELDS = [name for name, hint in typing.get_type_hints(RunConfig).items() if hint is float]


def test_float_fields_are_found():
    assert {"lr", "weight_decay", "bucket_cap_mb", "hang_timeout_factor", "simulate_step_ms"} <= set(FLOAT_FIELDS)


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "inf"])
@pytest.mark.parametrize("key", FLOAT_FIELDS)
def test_every_float_field_refuses_inf_and_nan(key, value):
    """No field gives inf or nan a meaning: lr=.inf trained to a NaN loss and exited 0."""
    with pytest.raises(ConfigError, match=rf"^{key}: -?(inf|nan) is invalid: must be a finite number"):
        config.load(None, [f"{key}={value}"])
    with pytest.raises(ConfigError, match=rf"^{key}: nan is invalid: must be a finite number"):
        RunConfig(**{key: math.nan})  # the Python API too, not only the parsing


@pytest.mark.parametrize("key", list(typing.get_type_hints(RunConfig)))
def test_every_field_names_its_type_readably(key):
    """A value of no type (YAML's empty `key:`) shows the field's type as a user reads it."""
    with pytest.raises(ConfigError) as err:
        config.from_dict({key: None})
    assert str(err.value).startswith(f"{key}: None is invalid: must be ")
    assert not any(word in str(err.value) for word in ("typing", "Union", "Literal", "<class", "NoneType"))


def test_a_key_given_twice_in_a_file_is_refused(tmp_path):
    path = write(tmp_path, "steps: 3\nlr: 0.1\nsteps: 4\n")
    with pytest.raises(ConfigError) as err:
        config.load(path)
    assert str(err.value).startswith(f"config: {str(path)!r} is malformed YAML at line 3, column 1: key 'steps'")
    assert "\n" not in str(err.value)
    assert config.read_yaml(write(tmp_path, "a: &b {steps: 3}\nc:\n  <<: *b\n  steps: 2\n"))["c"] == {"steps": 2}


def test_a_value_that_starts_with_a_brace_gets_the_quoting_fix(tmp_path):
    """Unquoted, YAML reads {time} as a mapping: a file and --set each name the quoting that fixes it."""
    with pytest.raises(ConfigError) as err:
        config.load(write(tmp_path, "steps: 3\nrun_dir: {time}/x  # where\n"))
    assert str(err.value).endswith('as a mapping: quote it, run_dir: "{time}/x"')
    assert config.load(write(tmp_path, 'run_dir: "{time}/x"\n')).run_dir == "{time}/x"
    with pytest.raises(ConfigError) as err:
        config.load(None, ["run_dir={time}"])
    assert str(err.value).endswith("""quote it inside the shell's quotes: --set 'run_dir="{time}"'""")
    assert config.load(None, ['run_dir="{time}"']).run_dir == "{time}"  # what the shell passes for the fix


def test_a_file_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes(b"steps: 3\nlr: \xff\n")
    with pytest.raises(ConfigError, match=r"not UTF-8 text \(invalid start byte at byte 13\); save it as UTF-8"):
        config.load(path, [])


def test_a_number_yaml_reads_as_a_string_is_a_number(tmp_path):
    """YAML 1.1 reads 1e-3 (no dot) as a string; a float key takes it as 0.001."""
    assert config.load(write(tmp_path, "lr: 1e-3\nweight_decay: 5e-4\n")).lr == 0.001
    assert config.load(write(tmp_path, "batch_size_per_worker: 1\nimage_size: 64\n")).batch_size_per_worker == 1


def test_cli_refuses_a_bad_address_and_a_moved_run_dir_in_one_line(tmp_path, capsys):
    from distrib import cli

    assert cli.main(["train", "--address", "nonsense", "--set", f"run_dir={tmp_path / 'run'}"]) == 2
    assert "--address 'nonsense' (or RAY_ADDRESS) is invalid: Invalid address format" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.yaml").write_text("steps: 3\n")
    assert cli.main(["train", "--resume", str(tmp_path / "old"), "--set", "run_dir=elsewhere"]) == 2
    assert "--set run_dir with --resume: a resumed run stays in the directory it resumes" in capsys.readouterr().err


def test_run_dir_may_hold_time_and_literal_braces():
    assert RunConfig(run_dir="runs/{time}-{{a}}").run_dir == "runs/{time}-{{a}}"


def test_replace_validates():
    assert RunConfig().replace(steps=5).steps == 5
    with pytest.raises(ConfigError, match="num_workers"):
        RunConfig().replace(num_workers=0)


@pytest.mark.parametrize("command", ["check", "train"])
def test_cli_bad_config_exits_2_with_one_line(tmp_path, command):
    path = write(tmp_path, "batch_size_per_worker: 0\n")
    done = subprocess.run([sys.executable, "-m", "distrib", command, "--config", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == ("distrib: error: batch_size_per_worker: 0 is invalid: must be >= 1")
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_readme_documents_every_key_with_its_default():
    import dataclasses
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| .*? \| `([^`]*)` \|", readme, flags=re.M))
    for field in dataclasses.fields(RunConfig):
        assert field.name in rows, f"README lacks {field.name}"
        assert rows[field.name] == str(field.default), f"README default of {field.name}"


def test_shipped_configs_load(tmp_path):
    from pathlib import Path

    for path in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"):
        if "sweep" not in path.name:  # folder.yaml names a placeholder data_dir for the user to replace
            config.load(path, [f"data_dir={tmp_path}"] if "folder" in path.name else [])
