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
    ingress = config["provider"]["security_group"]["IpPermissions"]
    assert [(rule["FromPort"], rule["ToPort"]) for rule in ingress] == [(22, 22)]
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert any("pip install" in c and "/home/ray/distrib" in c for c in config["setup_commands"])
    assert config["available_node_types"]["ray.worker.gpu"]["min_workers"] == 0


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
