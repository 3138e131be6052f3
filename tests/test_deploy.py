"""The cluster path: cluster.yaml through Ray's own validator, the KubeRay manifest, the
container recipe, and a real `ray job submit` to a multi-node Ray cluster on this machine."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def ray_validate(config: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


def test_cluster_yaml_passes_rays_validation():
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    ray_validate(config)
    broken = copy.deepcopy(config)
    broken["available_node_types"]["ray.worker.gpu"]["min_wrokers"] = 1
    with pytest.raises(Exception, match="min_wrokers"):
        ray_validate(broken)


def test_cluster_yaml_keeps_ray_ports_closed_and_installs_distrib():
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    # No group for the launcher to create (it would open SSH to 0.0.0.0/0): see the next test.
    assert "security_group" not in config["provider"]
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert any("pip install" in c and "/home/ray/distrib" in c for c in config["setup_commands"])
    assert config["available_node_types"]["ray.worker.gpu"]["min_workers"] == 0


def readme_section(title: str = "## On a Ray cluster") -> str:
    text = (REPO / "README.md").read_text()
    start = text.index(title + "\n")
    end = text.find("\n## ", start + len(title))
    return text[start:end if end >= 0 else None]


def test_cluster_yaml_leaves_security_groups_to_the_user(monkeypatch):
    """A group Ray's launcher creates always gets SSH from 0.0.0.0/0 (ray/autoscaler/_private/
    aws/config.py); with SecurityGroupIds on every node type it creates none and adds no rule."""
    from ray.autoscaler._private.aws import config as aws_config
    from ray.autoscaler._private.util import prepare_config

    config = prepare_config(yaml.safe_load((REPO / "cluster.yaml").read_text()))
    for name, node_type in config["available_node_types"].items():
        groups = node_type["node_config"].get("SecurityGroupIds")
        assert groups and all(isinstance(g, str) and g.startswith("sg-") for g in groups), name

    def would_open_ssh(*args, **kwargs):
        raise AssertionError("the launcher would create or change a security group (SSH from 0.0.0.0/0)")

    monkeypatch.setattr(aws_config, "_upsert_security_groups", would_open_ssh)
    aws_config._configure_security_group(copy.deepcopy(config))  # returns before any AWS call
    broken = copy.deepcopy(config)
    del broken["available_node_types"]["ray.worker.gpu"]["node_config"]["SecurityGroupIds"]
    with pytest.raises(AssertionError, match="SSH from 0.0.0.0/0"):
        aws_config._configure_security_group(broken)
    # The README makes that group: SSH from one network (not the internet), and the group to itself.
    section = readme_section()
    ingress = re.findall(r"authorize-security-group-ingress(.*?)#", section, re.S)
    assert len(ingress) == 2, ingress
    ssh, internal = (" ".join(rule.replace("\\", " ").split()) for rule in ingress)
    assert "--protocol tcp --port 22 --cidr" in ssh and "0.0.0.0/0" not in ssh
    assert '--protocol all --source-group "$SG"' in internal and '--group-id "$SG"' in internal
    assert "SecurityGroupIds" in section


def test_every_key_of_cluster_yaml_is_commented():
    """Each key (outside list items) has a comment on the line above or at its end."""
    lines = (REPO / "cluster.yaml").read_text().splitlines()
    list_indent = None
    for number, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        indent = len(line) - len(line.lstrip())
        if stripped.startswith("- "):
            list_indent = indent
            continue
        if list_indent is not None and indent > list_indent:
            continue
        list_indent = None
        if re.match(r"^[\w.\-/]+:", stripped):
            above = next(text.strip() for text in reversed(lines[:number]) if text.strip())
            assert above.startswith("#") or " # " in line, f"cluster.yaml line {number + 1} lacks a comment: {line}"


def test_kuberay_rayjob_has_what_kuberay_requires():
    job = yaml.safe_load((REPO / "deploy" / "kuberay-rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["metadata"]["name"] and job["spec"]["entrypoint"].startswith("distrib train")
    cluster = job["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert head["template"]["spec"]["containers"][0]["image"]
    for group in cluster["workerGroupSpecs"]:
        assert group["groupName"] and isinstance(group["rayStartParams"], dict)
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        (container,) = group["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    entry_config = re.search(r"--config (\S+)", job["spec"]["entrypoint"])[1]
    assert (REPO / "configs" / Path(entry_config).name).is_file()


def test_dockerfile_lints_clean():
    dockerfile = REPO / "deploy" / "Dockerfile"
    instructions = [text.split()[0] for text in dockerfile.read_text().splitlines()
                    if text.strip() and not text.startswith("#")]
    assert instructions[0] == "FROM"
    for line in dockerfile.read_text().splitlines():
        if line.startswith("COPY"):
            for source in line.split()[2:-1]:
                assert (REPO / source).exists(), f"COPY source {source} missing"
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed; the parse checks above ran")
    done = subprocess.run([hadolint, str(dockerfile)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def torch_pins(text: str) -> list[str]:
    return sorted(set(re.findall(r"\b(torch(?:vision)?==[\w.+]+)", text)))


def test_every_node_installs_the_same_torch():
    makefile = torch_pins((REPO / "Makefile").read_text())
    assert len(makefile) == 2, makefile  # torch and torchvision
    assert torch_pins((REPO / "deploy" / "Dockerfile").read_text()) == makefile
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    assert torch_pins(" ".join(config["setup_commands"])) == makefile


def test_dockerfile_installs_dependencies_before_the_code():
    lines = [line for line in (REPO / "deploy" / "Dockerfile").read_text().splitlines() if not line.startswith("#")]
    code = next(n for n, line in enumerate(lines) if line.startswith("COPY") and " distrib " in f"{line} ")
    torch = next(n for n, line in enumerate(lines) if "pip install" in line and "torch==" in line)
    assert torch < code, "editing distrib/ would re-install torch"
    before = [line for line in lines[:torch] if line.startswith("COPY")]
    assert before and all(line.split()[-2] == "pyproject.toml" for line in before), before
    ignored = {line.strip().rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()}
    assert {".venv", "runs", ".git"} <= ignored and ignored & {"__pycache__", "**/__pycache__"}


def test_one_image_tag_everywhere():
    version = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)[1]
    image = f"YOUR-REGISTRY/distrib:{version}"
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    manifest_text = (REPO / "deploy" / "kuberay-rayjob.yaml").read_text()
    section = readme_section()
    for name, text in [("Dockerfile", dockerfile), ("manifest", manifest_text), ("README", section)]:
        tags = set(re.findall(r"[\w./-]*distrib:[\w.-]+", text))
        assert tags == {image}, f"{name}: {tags}"
        assert f"docker build -f deploy/Dockerfile -t {image} ." in text, name
        assert f"docker push {image}" in text, name
    cluster = yaml.safe_load(manifest_text)["spec"]["rayClusterSpec"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    assert {c["image"] for g in groups for c in g["template"]["spec"]["containers"]} == {image}


def test_kuberay_job_stop_leaves_time_for_the_checkpoint():
    submit = (REPO / "deploy" / "submit.sh").read_text()
    wait = re.search(r'"RAY_JOB_STOP_WAIT_TIME_S": "(\d+)"', submit)[1]
    assert int(wait) > 20  # the driver's stop_grace_s
    job = yaml.safe_load((REPO / "deploy" / "kuberay-rayjob.yaml").read_text())
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert runtime_env["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"] == wait
    (head,) = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]
    assert {"name": "RAY_JOB_STOP_WAIT_TIME_S", "value": wait} in head["env"]


def test_port_forward_hints_find_the_rayjobs_cluster():
    finds = "kubectl get rayjob distrib-train -o jsonpath='{.status.rayClusterName}'"
    for text in [(REPO / "deploy" / "kuberay-rayjob.yaml").read_text(), readme_section()]:
        flat = " ".join(text.replace("#", " ").replace("\\", " ").split())
        assert "port-forward" in flat and finds in flat
        assert "distrib-train-head-svc" not in flat


def test_gpu_configs_wait_for_cold_nodes_and_write_outside_the_job_dir():
    from distrib import config
    from distrib.scale import load_sweep

    default = config.from_dict({}).start_timeout_s
    gpu = config.load(REPO / "configs" / "gpu.yaml")
    sweep = load_sweep(REPO / "configs" / "sweep-gpu.yaml")
    for cfg in (gpu, sweep.base):
        assert cfg.start_timeout_s >= 600 > default  # boot, image pull and torch install take minutes
    # gpu.yaml's run_dir stays relative (a workstation, a Ray Client laptop): submit.sh moves a
    # submitted job's to /home/ray/runs (test_submit_sh_puts_runs_outside_the_jobs_working_dir).
    assert not gpu.run_dir.startswith("/") and sweep.out_dir.startswith("/home/ray/runs/")


def test_rsync_down_hints_copy_the_contents():
    """`ray rsync-down cluster.yaml /home/ray/runs ./runs` would give ./runs/runs/."""
    files = ["README.md", "cluster.yaml", "deploy/submit.sh"]
    hints = [(name, hint) for name in files
             for hint in re.findall(r"ray rsync-down \S+ ([^\s`]+ [^\s`]+)", (REPO / name).read_text())]
    assert {name for name, _ in hints} == set(files)
    for name, hint in hints:
        assert all(path.endswith("/") for path in hint.split()), f"{name}: {hint}"


def fake_ray(tmp_path: Path, fail_on: str = "") -> dict:
    """A `ray` on PATH that records each call's arguments (NUL-separated) and starts nothing."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "ray"
    script.write_text(f'''#!/bin/sh
printf '%s\\0' "$@" --end-- >> "$FAKE_RAY_LOG"
case "$*" in *{fail_on or "@never@"}*) exit 1;; esac
''')
    script.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path),
           "FAKE_RAY_LOG": str(tmp_path / "ray.log"), "RAY_ADDRESS": "http://127.0.0.1:9"}
    env.pop("DISTRIB_JOB_RUNS", None)
    return env


def ray_calls(tmp_path: Path) -> list[list[str]]:
    words = (tmp_path / "ray.log").read_text().split("\0")
    calls, call = [], []
    for word in words[:-1]:
        if word == "--end--":
            calls.append(call)
            call = []
        else:
            call.append(word)
    return calls


@pytest.mark.parametrize("args, run_dir", [
    (["--config", "configs/local.yaml"], "/home/ray/runs/{time}"),  # relative in the config
    (["--set", "steps=3"], "/home/ray/runs/{time}"),  # the default, runs/{time}
    (["--config", "configs/gpu.yaml"], "/home/ray/runs/{time}"),  # relative in the config too
    (["--config=configs/local.yaml", "--set", "run_dir=/data/x"], None),
    (["--resume", "/home/ray/runs/a"], None),
    (["scale", "--config", "configs/sweep-gpu.yaml"], None),
])
def test_submit_sh_puts_runs_outside_the_jobs_working_dir(tmp_path, args, run_dir):
    env = fake_ray(tmp_path)
    done = subprocess.run([str(REPO / "deploy" / "submit.sh"), *args], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    (call,) = ray_calls(tmp_path)
    assert call[:2] == ["job", "submit"]
    runtime_env = json.loads(call[call.index("--runtime-env-json") + 1])
    assert runtime_env["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"] == "60"
    command = call[call.index("--") + 1:]
    expected = ["python", "-m", "distrib", *([] if args[0] == "scale" else ["train"]), *args]
    assert command == expected + (["--set", f"run_dir={run_dir}"] if run_dir else [])


def test_local_cluster_start_stops_what_it_started_on_failure(tmp_path):
    env = fake_ray(tmp_path, fail_on="local_node_2")
    script = str(REPO / "deploy" / "local-cluster.sh")
    done = subprocess.run([script, "start", "3", "1"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    calls = ray_calls(tmp_path)
    starts = [call for call in calls if call[0] == "start"]
    assert len(starts) == 3 and "--head" in starts[0]  # the head, node 1, and node 2 that failed
    assert calls[-1] == ["stop", "--force"]
    usage = subprocess.run([script], env=env, capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "ray stop --force" in usage.stderr and "every Ray" in usage.stderr


@pytest.fixture(scope="module")
def local_cluster():
    """deploy/local-cluster.sh: a head and two 1-CPU worker nodes on this machine, stopped afterwards."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "DISTRIB_GCS_PORT": "6391", "DISTRIB_DASHBOARD_PORT": "8291"}
    env.pop("RAY_ADDRESS", None)
    script = str(REPO / "deploy" / "local-cluster.sh")
    try:
        subprocess.run([script, "start", "2", "1"], env=env, check=True, capture_output=True, timeout=180)
        yield env
    finally:
        subprocess.run([script, "stop"], env=env, capture_output=True, timeout=120)


def test_job_submission_to_a_local_multi_node_cluster(local_cluster, tmp_path):
    env = {**local_cluster, "RAY_ADDRESS": "http://127.0.0.1:8291"}
    run_dir = tmp_path / "job-run"
    done = subprocess.run(
        [str(REPO / "deploy" / "submit.sh"), "--config", "configs/local.yaml", "--set", "steps=4",
         "--set", "image_size=32", "--set", "batch_size_per_worker=8", "--set", "placement_strategy=SPREAD",
         "--set", f"run_dir={run_dir}"],
        env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout + done.stderr
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3]
    assert json.loads((run_dir / "summary.json").read_text())["num_workers"] == 2


def test_ray_job_stop_saves_the_run(local_cluster, tmp_path):
    """`ray job stop` sends SIGTERM: the driver checkpoints at the step reached and ends cleanly."""
    env = {**local_cluster, "RAY_ADDRESS": "http://127.0.0.1:8291"}
    run_dir = tmp_path / "job-run"
    submit = subprocess.Popen(
        [str(REPO / "deploy" / "submit.sh"), "--config", "configs/local.yaml", "--set", "steps=200",
         "--set", "image_size=32", "--set", "batch_size_per_worker=8", "--set", "placement_strategy=SPREAD",
         "--set", f"run_dir={run_dir}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        metrics = run_dir / "metrics.jsonl"
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            assert time.monotonic() < deadline and submit.poll() is None, "the job never reached step 3"
            time.sleep(0.2)
        listed = subprocess.run(["ray", "job", "list"], env=env, capture_output=True, text=True, timeout=60)
        running = [job for job in listed.stdout.split("JobDetails(") if "RUNNING" in job]
        (job_id,) = [re.search(r"submission_id='(raysubmit_\w+)'", job)[1] for job in running]
        stopped = subprocess.run(["ray", "job", "stop", job_id], env=env, capture_output=True, text=True, timeout=120)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        output, _ = submit.communicate(timeout=120)
    finally:
        submit.kill()
    match = re.search(r"distrib: stopped by SIGTERM after (\d+) steps; checkpoint (step-\d+\.ckpt) written", output)
    assert match, output[-3000:]
    done = int(match[1])
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir())[-1] == match[2]
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == list(range(done))
    assert "SIGTERM received" not in output  # no crash dump from Ray for an orderly stop
