"""Fail fast: what can never run is a one-line error (exit 2) before Ray starts, and no run
directory is left behind (the CLI, as a user runs it; no Ray instance is started there).
A cluster joined by address with no autoscaler fails as fast, once connected
(`ray.cluster_utils.Cluster`: nodes started by hand, as on a fixed cluster)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import ray
from ray.autoscaler.v2.utils import is_autoscaler_v2
from ray.cluster_utils import Cluster

from distrib import preflight
from distrib.cluster import autoscaler_node_types, has_autoscaler
from distrib.config import RunConfig
from distrib.errors import ConfigError


def train(tmp_path, *overrides: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local instance would be started
    args = [sys.executable, "-m", "distrib", "train", "--no-progress", "--set", "device=cpu"]
    for override in overrides:
        args += ["--set", override]
    return subprocess.run(args, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)


def assert_one_line_error(done: subprocess.CompletedProcess, *parts: str) -> None:
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distrib: error: "), done.stderr[-2000:]
    for part in parts:
        assert part in lines[0], lines[0]
    assert "Started a local Ray instance" not in done.stderr + done.stdout  # Ray never started


def test_more_workers_than_a_local_instance_has_cpus(tmp_path):
    workers = (os.cpu_count() or 1) + 1
    done = train(tmp_path, f"num_workers={workers}", "run_dir=run")
    assert_one_line_error(done, f"{workers} workers x 1 CPU need {workers} CPUs; this machine has {os.cpu_count()}")
    assert not (tmp_path / "run").exists()


def test_spares_count_against_the_local_cpus(tmp_path):
    cpus = os.cpu_count() or 1
    done = train(tmp_path, f"num_workers={cpus}", "spare_workers=1", "run_dir=run")
    assert_one_line_error(done, f"{cpus + 1} workers (with 1 spare) x 1 CPU need {cpus + 1} CPUs")


def test_strict_spread_on_a_local_instance_of_one_node(tmp_path):
    done = train(tmp_path, "placement_strategy=STRICT_SPREAD", "run_dir=run")  # 2 workers, 1 node: never placed
    assert_one_line_error(done, "STRICT_SPREAD puts each of the 2 workers on a node of its own, and a local Ray "
                          "instance is one node: use PACK or SPREAD")
    assert not (tmp_path / "run").exists()


def test_seed_step_checks_before_ray_starts(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-m", "distrib", "seed-step", "--weights", "missing.pth"],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert_one_line_error(done, "weights: 'missing.pth' is invalid: no such file")


def test_run_dir_that_is_a_file(tmp_path):
    (tmp_path / "taken").write_text("not a directory")
    done = train(tmp_path, "run_dir=taken/run")
    assert_one_line_error(done, "run_dir: 'taken/run' is invalid", "is a file, not a folder")


def test_a_run_dir_holding_a_run(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    done = train(tmp_path, "run_dir=run")
    assert_one_line_error(done, "run_dir: 'run' already holds a run (metrics.jsonl)", "resume it with --resume")


def test_device_auto_without_gpus_keeps_the_rules_of_a_cpu_run(tmp_path):
    if preflight.local_gpus() != 0:
        pytest.skip("this machine may have GPUs")
    done = train(tmp_path, "device=auto", "precision=fp16", "run_dir=run")
    assert_one_line_error(done, "fp16 autocast needs device: cuda", "(device: auto is cpu: this machine has no GPU)")


def test_an_address_where_nothing_answers(tmp_path):
    """Ray's own connection would retry for minutes, printing only its warnings."""
    started = time.monotonic()
    args = [sys.executable, "-m", "distrib", "train", "--address", "127.0.0.1:1", "--set", "run_dir=run"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert_one_line_error(done, "--address '127.0.0.1:1' (or RAY_ADDRESS) is invalid: nothing answers at 127.0.0.1:1")
    assert time.monotonic() - started < 60 and not (tmp_path / "run").exists()


def test_missing_weights_file(tmp_path):
    done = train(tmp_path, "weights=missing.pth", "num_classes=10", "run_dir=run")
    assert_one_line_error(done, "weights: 'missing.pth' is invalid: no such file")
    assert not (tmp_path / "run").exists()


def test_a_weights_file_torch_cannot_load(tmp_path):
    (tmp_path / "bad.pth").write_bytes(b"not a torch file")
    done = train(tmp_path, "weights=bad.pth", "num_classes=10", "run_dir=run")
    assert_one_line_error(done, "weights: 'bad.pth' could not be loaded (UnpicklingError)")
    assert not (tmp_path / "run").exists()


def test_cuda_on_a_local_instance_without_gpus(tmp_path):
    if preflight.local_gpus() != 0:
        pytest.skip("this machine may have GPUs")
    done = train(tmp_path, "device=cuda", "precision=bf16", "run_dir=run")
    assert_one_line_error(done, "device: cuda needs 2 GPUs; this machine has 0 (a local Ray instance)")
    done = train(tmp_path, "device=cuda", "gpus_per_worker=0.4", "num_workers=5", "cpus_per_worker=0.2", "run_dir=run")
    assert_one_line_error(done, "device: cuda needs 3 GPUs at 0.4 per worker; this machine has 0")


# ---- a cluster joined by address --------------------------------------------------------------
FAST_MONITOR = {"AUTOSCALER_UPDATE_INTERVAL_S": "1"}  # the head's monitor reports each second, not each 5


def start_cluster(env: dict[str, str] | None = None, **head_args) -> Cluster:
    """A one-machine cluster whose head has 1 CPU; `env` is what its processes (the monitor) see."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {**FAST_MONITOR, **(env or {})}.items():
            patch.setenv(name, value)
        return Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False, **head_args})


def join(cluster: Cluster) -> None:
    """Connect as the driver does, and wait for the monitor's first report on every node."""
    ray.init(address=cluster.address, logging_level="WARNING")
    cluster.wait_for_nodes()
    deadline = time.monotonic() + 60
    while len(autoscaler_node_types()) < len(cluster.list_all_nodes()) and time.monotonic() < deadline:
        time.sleep(0.2)


@pytest.fixture(scope="module")
def fixed_cluster():
    """Two nodes of 1 CPU each, no GPU, no autoscaler."""
    cluster = start_cluster()
    try:
        cluster.add_node(num_cpus=1, include_dashboard=False)
        yield cluster
    finally:
        cluster.shutdown()


@pytest.fixture
def joined(fixed_cluster):
    join(fixed_cluster)
    yield fixed_cluster
    ray.shutdown()


def cluster_cfg(**changes) -> RunConfig:
    return RunConfig(num_workers=2, device="cpu", start_timeout_s=60).replace(**changes)


def fit_error(cfg: RunConfig) -> str:
    """check_cluster_fit's message: one line, at once (well under start_timeout_s)."""
    started = time.monotonic()
    with pytest.raises(ConfigError) as raised:
        preflight.check_cluster_fit(cfg)
    assert time.monotonic() - started < 10
    assert "\n" not in str(raised.value)
    return str(raised.value)


def test_more_workers_than_a_fixed_cluster_has_cpus(joined):
    assert not has_autoscaler()
    preflight.check_cluster_fit(cluster_cfg())  # 2 workers on 2 nodes of 1 CPU: they fit
    assert fit_error(cluster_cfg(num_workers=3)).startswith(
        "num_workers: 3 workers x 1 CPU need 3 CPUs; this cluster (no autoscaler) has 2: "
        "lower num_workers or cpus_per_worker, or add nodes")
    assert "3 workers (with 1 spare) x 1 CPU need 3 CPUs" in fit_error(cluster_cfg(spare_workers=1))


def test_a_worker_that_fits_on_no_node(joined):
    message = fit_error(cluster_cfg(num_workers=1, cpus_per_worker=2))  # 2 CPUs in all, 1 on each node
    assert message == ("cpus_per_worker: one worker needs 2 CPUs on one node; the largest node of this cluster "
                       "(no autoscaler) has 1: lower cpus_per_worker, or add a bigger node")
    # 1.8 CPUs of 2 would do, but a node holds one worker of 0.6 CPU, not two
    assert "3 workers (with 1 spare) x 0.6 CPU (PACK) need 3 places; the nodes of this cluster (no autoscaler) " \
           "have 2" in fit_error(cluster_cfg(spare_workers=1, cpus_per_worker=0.6))
    assert "(STRICT_PACK) need 2 places; the nodes of this cluster (no autoscaler) have 1: lower num_workers or " \
           "cpus_per_worker, use placement_strategy: PACK" in fit_error(cluster_cfg(placement_strategy="STRICT_PACK"))


def test_cuda_on_a_fixed_cluster_without_gpus(joined):
    assert fit_error(cluster_cfg(device="cuda")).startswith(
        "device: cuda needs 2 GPUs; this cluster (no autoscaler) has 0: use device: auto or cpu")
    assert "device: cuda needs 1 GPU at 0.5 per worker;" in fit_error(cluster_cfg(device="cuda", gpus_per_worker=0.5))


def test_a_fixed_cluster_under_autoscaler_v2():
    cluster = start_cluster(_system_config={"enable_autoscaler_v2": True})
    try:
        join(cluster)
        assert is_autoscaler_v2(fetch_from_server=True)
        assert autoscaler_node_types() and not has_autoscaler()
        assert "need 2 CPUs; this cluster (no autoscaler) has 1" in fit_error(cluster_cfg())
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_an_autoscaling_cluster_is_waited_for(tmp_path):
    """The head's monitor runs an autoscaler with a config (the fake multi-node provider that
    ray.cluster_utils.AutoscalingCluster uses; that class runs `ray stop --force`, which would
    end every Ray on the machine, and this Ray's wheel lacks its example.yaml)."""
    config = {
        "cluster_name": "fake", "max_workers": 1, "idle_timeout_minutes": 1, "upscaling_speed": 1.0,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_launch_config_check": True,
                     "disable_node_updaters": True},
        "auth": {"ssh_user": "ubuntu"}, "docker": {}, "head_node_type": "ray.head.default",
        "available_node_types": {"ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
                                 "cpu_node": {"resources": {"CPU": 1}, "node_config": {}, "min_workers": 0,
                                              "max_workers": 1}},
        **{key: [] for key in ("cluster_synced_files", "rsync_exclude", "rsync_filter", "initialization_commands",
                               "setup_commands", "head_setup_commands", "worker_setup_commands",
                               "head_start_ray_commands", "worker_start_ray_commands")},
        "file_mounts": {}, "file_mounts_sync_continuously": False,
    }
    (tmp_path / "autoscaling.json").write_text(json.dumps(config))
    cluster = start_cluster({"RAY_FAKE_CLUSTER": "1"}, autoscaling_config=str(tmp_path / "autoscaling.json"))
    try:
        join(cluster)
        assert set(autoscaler_node_types().values()) == {"ray.head.default"} and has_autoscaler()
        preflight.check_cluster_fit(cluster_cfg(num_workers=3))  # no error: the driver waits, as before
    finally:
        ray.shutdown()
        cluster.shutdown()
