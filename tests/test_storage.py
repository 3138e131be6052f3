"""Run directories on object storage, against a real S3 API: moto's threaded server, which
pyarrow reaches through AWS_ENDPOINT_URL like any S3-compatible store (MinIO, Ceph).

The driver builds its filesystem from the URI and the environment only, so each test sets the
environment (endpoint, keys) and passes nothing else; the CLI runs as a subprocess that
inherits it, joined to this module's Ray instance.
"""

from __future__ import annotations

import gc
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from distrib import Orchestrator, RunConfig, checkpoint, config, storage
from distrib.errors import ConfigError
from tests.conftest import assert_bit_identical, flat_state

BUCKET = "distrib-runs"


@pytest.fixture(scope="module")
def s3_env():
    """A local S3 server (moto's, in its own process: in this one it would share the interpreter
    lock with the driver under test) with BUCKET, and the environment that points pyarrow (and
    the CLI) at it."""
    import boto3

    from distrib.comm import free_port

    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        deadline = time.monotonic() + 30
        while True:  # until the server answers
            try:
                boto3.client("s3").create_bucket(Bucket=BUCKET)
                break
            except Exception:
                assert server.poll() is None and time.monotonic() < deadline, "moto_server did not start"
                time.sleep(0.2)
        yield env
    finally:
        # No S3 filesystem may outlive pyarrow's S3 finalizer (run at exit): one still held by a
        # reference cycle at interpreter teardown can crash the process after the tests passed.
        gc.collect()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture
def run_uri(s3_env, request) -> str:
    return f"s3://{BUCKET}/{request.node.name.replace('[', '-').rstrip(']')}/run"


def distrib_cli(*args: str, env: dict | None = None, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "distrib", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, **popen)


# ---- checkpoints: the marker, and an upload cut short ------------------------------------------
CFG = RunConfig(steps=10)


def test_checkpoints_on_s3_keep_the_newest_and_a_marker(run_uri):
    for step in (2, 4, 6, 8):
        checkpoint.write(run_uri, step=step, cfg=CFG, payload=b"state" + bytes([step]), keep=2)
    folder = checkpoint.checkpoint_dir(run_uri)
    assert sorted(p.name for p in folder.iterdir()) == [checkpoint.MARKER, "step-00000006.ckpt", "step-00000008.ckpt"]
    assert json.loads((folder / checkpoint.MARKER).read_text())["file"] == "step-00000008.ckpt"
    ckpt, skipped = checkpoint.newest_valid(run_uri)
    assert (ckpt.step, ckpt.payload, skipped) == (8, b"state\x08", [])
    assert str(ckpt.path) == f"{run_uri}/checkpoints/step-00000008.ckpt"


def test_a_checkpoint_newer_than_the_marker_is_never_the_newest(run_uri):
    """What a store without atomic uploads (or a failed one, closed by pyarrow) can leave: a file
    under its final name whose marker was never written. Even one that verifies is skipped."""
    checkpoint.write(run_uri, step=2, cfg=CFG, payload=b"two", keep=3)
    unmarked = storage.locate(f"{run_uri}/other")
    checkpoint.write(unmarked, step=4, cfg=CFG, payload=b"four", keep=3)
    (checkpoint.checkpoint_dir(run_uri) / "step-00000004.ckpt").write_bytes(
        (checkpoint.checkpoint_dir(unmarked) / "step-00000004.ckpt").read_bytes())
    ckpt, skipped = checkpoint.newest_valid(run_uri)
    assert ckpt.step == 2
    assert len(skipped) == 1 and "step-00000004.ckpt is newer than latest.json" in skipped[0]


def test_an_unreadable_marker_is_said_and_every_checkpoint_verified(run_uri):
    checkpoint.write(run_uri, step=2, cfg=CFG, payload=b"two", keep=3)
    storage.write_whole(checkpoint.checkpoint_dir(run_uri) / checkpoint.MARKER, [b"{cut sh"])
    ckpt, skipped = checkpoint.newest_valid(run_uri)
    assert ckpt.step == 2
    assert len(skipped) == 1 and "latest.json is unreadable" in skipped[0]


_UPLOAD = """
import sys
from distrib import checkpoint
from distrib.config import RunConfig
checkpoint.write(sys.argv[1], step=4, cfg=RunConfig(steps=10), payload=b"x" * (256 << 20), keep=3)
"""


def test_an_upload_cut_short_leaves_the_previous_checkpoint_newest(run_uri):
    import boto3

    checkpoint.write(run_uri, step=2, cfg=CFG, payload=b"two", keep=3)
    uploader = subprocess.Popen([sys.executable, "-c", _UPLOAD, run_uri])
    s3 = boto3.client("s3")
    deadline = time.monotonic() + 60
    while not s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads"):  # the upload has begun
        assert uploader.poll() is None and time.monotonic() < deadline, "the upload ended before it could be cut"
        time.sleep(0.01)
    uploader.send_signal(signal.SIGKILL)
    uploader.wait()
    ckpt, skipped = checkpoint.newest_valid(run_uri)
    assert (ckpt.step, ckpt.payload, skipped) == (2, b"two", [])
    assert [p.name for p in checkpoint.on_disk(run_uri)] == ["step-00000002.ckpt"]
    for upload in s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []):  # what a lifecycle rule would do
        s3.abort_multipart_upload(Bucket=BUCKET, Key=upload["Key"], UploadId=upload["UploadId"])


# ---- bad URIs: one line, exit 2, before Ray starts ----------------------------------------------
@pytest.mark.parametrize(("args", "env_change", "message"), [
    (["--set", "run_dir=nosuch://bucket/run"], {},
     "run_dir: 'nosuch://bucket/run' is invalid: unknown scheme 'nosuch'"),
    (["--set", "run_dir=s3://no-such-bucket/run"], {}, "bucket 'no-such-bucket' does not exist"),
    (["--set", f"run_dir=s3://{BUCKET}/run"], {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None},
     "no S3 credentials found"),
    (["--resume", "s3://no-such-bucket/run"], {}, "--resume: 's3://no-such-bucket/run' is invalid: bucket"),
    (["--set", "run_dir=gs://some-bucket/run"], {"NO_GCE_CHECK": "true", "GOOGLE_APPLICATION_CREDENTIALS": None},
     "run_dir: 'gs://some-bucket/run' is invalid: no GCS credentials found"),
])
def test_a_bad_uri_is_one_line_and_exit_2_before_ray_starts(s3_env, tmp_path, args, env_change, message):
    env = {**os.environ, "HOME": str(tmp_path), "RAY_ADDRESS": ""}  # no ~/.aws, no cluster to join
    for name, value in env_change.items():
        env.pop(name, None) if value is None else env.update({name: value})
    started = time.monotonic()
    proc = distrib_cli("train", "--no-progress", *args, env=env)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2, stderr[-3000:]
    assert stderr.count("\n") == 1 and stderr.startswith("distrib: error: ") and message in stderr, stderr
    assert "AWS_SECRET_ACCESS_KEY=" not in stderr and "testing" not in stderr  # no secret in a message
    assert time.monotonic() - started < 20  # a local Ray start alone takes longer than the check


def test_a_store_that_refuses_the_sdks_checksums_is_one_line_with_the_fix(tmp_path, monkeypatch):
    """`rclone serve s3` (as some S3-compatible servers) refuses the AWS SDK's default streamed
    request checksums with MissingContentLength: the run's first write names the setting that
    fixes it, instead of a traceback; with it set, the same store takes the run."""
    from distrib.comm import free_port
    from distrib.rundir import RunDir

    port = free_port()
    (tmp_path / "store" / BUCKET).mkdir(parents=True)
    rclone = str(Path(sys.executable).parent / "rclone")
    server = subprocess.Popen([rclone, "serve", "s3", "--addr", f"127.0.0.1:{port}", "--auth-key", "testing,testing",
                               "--config", "/dev/null", str(tmp_path / "store")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for name, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                        "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_REQUEST_CHECKSUM_CALCULATION", raising=False)
    cfg = RunConfig(run_dir=f"s3://{BUCKET}/run")
    try:
        deadline = time.monotonic() + 30
        while True:  # until the server answers
            try:
                if storage.locate(f"s3://{BUCKET}").exists():
                    break
            except OSError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "rclone serve s3 did not start"
            time.sleep(0.2)
        with pytest.raises(ConfigError) as refused:
            RunDir.create(cfg)
        assert str(refused.value) == (f"run_dir: 's3://{BUCKET}/run' cannot be written: the S3 server refused the "
                                      "upload's checksum encoding (MissingContentLength); set "
                                      "AWS_REQUEST_CHECKSUM_CALCULATION=when_required")
        monkeypatch.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
        RunDir.create(cfg).close()
        assert (tmp_path / "store" / BUCKET / "run" / "config.yaml").is_file()
    finally:
        gc.collect()  # no S3 filesystem may outlive pyarrow's finalizer (see s3_env)
        server.terminate()
        server.wait(timeout=30)


def test_gcs_credentials_are_found_where_googles_default_chain_looks(tmp_path, monkeypatch):
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))
    monkeypatch.setenv("NO_GCE_CHECK", "true")
    assert not storage._gcs_credentials_found()
    (tmp_path / "gcloud").mkdir()
    (tmp_path / "gcloud" / "application_default_credentials.json").write_text("{}")  # what gcloud login writes
    assert storage._gcs_credentials_found()
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "key.json"))
    assert storage._gcs_credentials_found()


# ---- a training run on S3: killed, resumed from the URI, bit-identical ---------------------------
def s3_cfg(run_dir: str, **changes) -> RunConfig:
    """No momentum: its buffers would double each checkpoint (to 90 MB), which moto moves at
    5-11 MB/s; test_stop covers their resume."""
    return RunConfig(num_workers=2, device="cpu", batch_size_per_worker=4, image_size=32, num_classes=10,
                     steps=8, lr=0.05, momentum=0.0, check_every=2, checkpoint_every=4, loader_workers=0,
                     run_dir=run_dir).replace(**changes)


def test_a_run_killed_on_s3_resumes_from_the_uri_bit_identical(s3_env, ray_address, tmp_path):
    import torch

    # The reference runs on local storage: where the files go does not change the numbers.
    with Orchestrator(s3_cfg(str(tmp_path / "reference")), progress=False) as orch:
        orch.train()
        uninterrupted = flat_state(orch.state())

    uri = f"s3://{BUCKET}/killed"
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(config.to_dict(s3_cfg(uri, tensorboard=True))))
    proc = distrib_cli("train", "--config", str(cfg_file), "--no-progress", "--address", ray_address)
    marker = checkpoint.checkpoint_dir(uri) / checkpoint.MARKER
    deadline = time.monotonic() + 180
    while not (marker.is_file() and json.loads(marker.read_text())["step"] >= 4):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint at step 4 in time"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # the driver dies at once: no graceful stop, no final upload
    proc.wait()
    killed_at = json.loads(marker.read_text())["step"]
    assert killed_at < 8

    # From "any machine": nothing but the URI and the environment; this process's files are not used.
    resumed = distrib_cli("train", "--resume", uri, "--no-progress", "--address", ray_address, cwd=str(tmp_path))
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr[-3000:]
    assert f"run directory: {uri}" in stdout
    ckpt, skipped = checkpoint.newest_valid(uri)
    assert ckpt.step == 8 and skipped == []
    final = flat_state(torch.load(io.BytesIO(ckpt.payload), map_location="cpu", weights_only=True))
    assert_bit_identical(final, uninterrupted)
    root = storage.locate(uri)
    steps = [json.loads(line)["step"] for line in (root / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(8))  # every step once: the batched metrics were uploaded before each checkpoint
    # TensorBoard's files too: the resumed writer purges the steps redone after the checkpoint.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (tmp_path / "tb").mkdir()
    for file in (root / "tb").iterdir():
        (tmp_path / "tb" / file.name).write_bytes(file.read_bytes())
    board = EventAccumulator(str(tmp_path / "tb")).Reload()
    assert [e.step for e in board.Scalars("train/loss")] == steps
    assert len(board.Tensors("config/text_summary")) == 1  # the run's start wrote it; the resume did not again
    assert json.loads((root / "summary.json").read_text())["num_workers"] == 2
    assert (root / "config.yaml").is_file() and not Path(tmp_path / "killed").exists()

    # Read from the URI too, and written to the store: the report of the run, its weights as a plain state_dict.
    from distrib.export import export
    from distrib.report import report

    text, written = report([uri], f"s3://{BUCKET}/killed-report")
    assert text.startswith("killed: 8 steps") and written
    assert sorted(p.name for p in storage.locate(f"s3://{BUCKET}/killed-report").iterdir()) == sorted(
        p.name for p in written) and all(p.read_bytes().startswith(b"\x89PNG") for p in written)
    out = export(uri, f"s3://{BUCKET}/models/killed.pth")
    assert json.loads(storage.locate(f"s3://{BUCKET}/models/killed.json").read_text())["step"] == 8
    exported = torch.load(io.BytesIO(out.read_bytes()), map_location="cpu", weights_only=True)
    assert torch.equal(exported["fc.weight"], final["model.fc.weight"])


def test_metrics_on_s3_are_kept_in_parts_so_an_upload_stays_small(run_uri, monkeypatch):
    """An object cannot be appended to: each upload rewrites the log's last part only, so its
    size stays bounded however long the run; a resume goes on in the last part; a rewind cuts
    the parts; `distrib report` reads them all."""
    from distrib import report

    monkeypatch.setattr(storage, "PART_BYTES", 1000)  # about 30 lines a part
    path = storage.locate(run_uri) / "metrics.jsonl"
    lines = [json.dumps({"kind": "step", "step": step, "loss": 1.0 / (step + 1)}) for step in range(100)]
    log = storage.LineLog(path, upload_every_s=0.0, create=True)  # an upload after every line
    for line in lines[:60]:
        log.append(line)
    log.close()
    parts = storage.line_parts(path)
    assert [p.name for p in parts] == ["metrics.jsonl"] + [f"metrics.{i}.jsonl" for i in range(1, len(parts))]
    assert len(parts) >= 2 and all(len(p.read_bytes()) < 1100 for p in parts)
    first = parts[0].read_bytes()
    log = storage.LineLog(path, upload_every_s=0.0, create=True)  # a resume
    for line in lines[60:]:
        log.append(line)
    assert parts[0].read_bytes() == first  # a full part is never uploaded again
    assert storage.read_lines(path) == "".join(line + "\n" for line in lines)
    assert [r["step"] for r in report._load(storage.locate(run_uri), "run").steps] == list(range(100))
    log.keep(lambda line: json.loads(line)["step"] < 30)  # a rewind
    log.append(lines[30])
    log.close()
    assert storage.read_lines(path) == "".join(line + "\n" for line in lines[:31])
    assert len(storage.line_parts(path)) == 2  # the parts past the cut are gone


def test_tensorboard_files_on_s3_start_anew_past_their_size_and_keep_every_step(run_uri, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from distrib import tblog
    from distrib.metrics import StepMetrics

    monkeypatch.setattr(tblog, "ROTATE_BYTES", 10_000)  # about 20 steps (of ~500 bytes) a file
    log = tblog.TensorBoardLog(storage.locate(run_uri) / "tb", CFG, upload_every_s=0.0)  # after every step
    for step in range(60):
        time.sleep(0.065)  # a file per 1.3 s: event file names (which TensorBoard reads in order) hold whole seconds
        log.write(StepMetrics(step=step, finished_at=1e9 + step, loss=1.0 / (step + 1), lr=0.1, images_per_s=1.0,
                              wall_s=1.0, step_s=1.0, data_s=0.1, forward_s=0.2, backward_s=0.3, optimizer_s=0.1))
    log.close()
    files = list((storage.locate(run_uri) / "tb").iterdir())
    assert 2 <= len(files) <= 5  # a new file each ~20 steps, not one per upload
    assert all(len(file.read_bytes()) < 11_000 for file in files)
    for file in files:
        (tmp_path / file.name).write_bytes(file.read_bytes())
    losses = EventAccumulator(str(tmp_path)).Reload().Scalars("train/loss")
    assert [e.step for e in losses] == list(range(60))
    assert [e.value for e in losses] == pytest.approx([1.0 / (step + 1) for step in range(60)], rel=1e-6)
