"""The Ray cluster a run uses: connecting to it, what it has (GPUs, an autoscaler, nodes being drained),
and reserving the bundles of a run's replicas."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

from distrib.config import RunConfig
from distrib.errors import ConfigError, PlacementError, first_line

log = logging.getLogger(__name__)

PLACEMENT_POLL_S = 5.0
"""While waiting for resources, say what is missing this often."""
PLACEMENT_SLICE_S = 0.5
"""`check_abort` runs between slices of the wait this long."""

DRAIN_POLL_S = 1.0
"""How often a DrainWatch asks Ray which nodes are being drained (a preemption notice)."""
DRAIN_STOP_TIMEOUT_S = 30.0
"""How long DrainWatch.stop() waits for a poll in flight (a GCS call) to return."""


def connect_ray(address: str | None = None) -> bool:
    """Join the Ray cluster at `address` (or $RAY_ADDRESS); without one, start a local
    instance with this machine's CPUs (and GPUs). Returns True when it started a local one."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        fix = "give HOST:PORT of a Ray head (GCS port, 6379 by default), auto, or ray://HOST:10001"
        if reason := _unreachable(address):  # ray.init would retry for minutes, printing only its own warnings
            raise ConfigError(f"--address {address!r} (or RAY_ADDRESS) is invalid: {reason}; start the cluster, or "
                              f"{fix}")
        try:
            ray.init(address=address, logging_level=logging.WARNING)
        except (ValueError, ConnectionError) as err:  # a malformed address, or nothing answers there
            raise ConfigError(f"--address {address!r} (or RAY_ADDRESS) is invalid: {first_line(err)}; {fix}") from None
        return False
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level=logging.WARNING)
    return True


CONNECT_PROBE_S = 5.0
"""How long the TCP probe of a Ray address waits for an answer."""


def _unreachable(address: str) -> str | None:
    """Why nothing can answer at a HOST:PORT or ray://HOST:PORT address (one TCP connection,
    CONNECT_PROBE_S at most), or None: it answers, or it is not of that form (auto, malformed:
    ray.init says what is wrong with it)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return None
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_PROBE_S).close()
    except OSError as err:
        return f"nothing answers at {host}:{port} ({err.strerror or type(err).__name__})"
    return None


def cluster_gpus() -> float:
    """GPUs in the connected Ray cluster (what `device: auto` is resolved against)."""
    return ray.cluster_resources().get("GPU", 0)


def has_autoscaler() -> bool:
    """Whether the connected cluster can add nodes. False only where Ray's own view says every node
    was started by hand (no cluster launcher, no KubeRay autoscaler); True where it cannot tell,
    so that a caller waits for resources as it would for an autoscaler."""
    try:
        from ray.autoscaler._private.util import format_readonly_node_type

        node_types = autoscaler_node_types()
    except Exception as err:  # a private Ray API that moved, a GCS hiccup: wait, as before
        log.debug("cannot tell whether the cluster has an autoscaler (%r); assuming it has one", err)
        return True
    if not node_types:
        log.debug("no autoscaler report yet; assuming the cluster has an autoscaler")
        return True
    return any(node_type != format_readonly_node_type(node_id) for node_id, node_type in node_types.items())


def autoscaler_node_types() -> dict[str, str]:
    """Node id (hex) -> node type, as the autoscaler sees them (what `ray status` shows); {} until
    the head's monitor first reports, up to AUTOSCALER_UPDATE_INTERVAL_S (5 s) after it starts.

    Every head runs an autoscaler monitor. Without an autoscaling config (a cluster started by
    hand, a local instance) it runs a read-only provider that names each node's type
    `node_<node id>` (format_readonly_node_type); autoscaler v2 gives that name to any node
    started without RAY_NODE_TYPE_NAME, which the cluster launcher and KubeRay set on every node
    they start. A real autoscaler names types after its config (ray.head.default, worker groups).
    (A head started by hand with a v2 autoscaling config would look fixed until its first worker.)
    No public API says this: these are the private ones `ray status` reads, checked on Ray 2.60.
    """
    from ray.autoscaler.v2.utils import is_autoscaler_v2

    if is_autoscaler_v2(fetch_from_server=True):
        from ray.autoscaler.v2.sdk import get_cluster_status

        status = get_cluster_status(ray.get_runtime_context().gcs_address)
        return {node.node_id: node.ray_node_type_name for node in status.active_nodes + status.idle_nodes}
    from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
    from ray.experimental.internal_kv import _internal_kv_get

    status = _internal_kv_get(DEBUG_AUTOSCALING_STATUS)
    report = json.loads(status).get("autoscaler_report") if status else None
    return (report or {}).get("node_type_mapping") or {}


def draining_nodes() -> dict[str, int]:
    """Nodes Ray is draining (preemption, scale-down): node id (hex) -> deadline in ms since the
    epoch, 0 for none. Ray 2.60 has no public API for it; Ray Train v2 reads this same one."""
    return ray._private.state.state.get_draining_nodes() or {}


class DrainWatch:
    """Polls Ray on a thread (no cost to the loop) for the nodes of `node_ids()` being drained.

    stop() returns once the thread has ended: a thread still inside a Ray call when the driver
    shuts Ray down, or when the process exits, can crash the process (ray#31145)."""

    def __init__(self, node_ids: Callable[[], set[str]]):
        self._node_ids = node_ids
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self.draining: dict[str, int] = {}
        """Node id -> the drain's deadline (ms since the epoch, 0: none), as of the last poll."""

    def start(self) -> None:
        self._thread = threading.Thread(target=self._watch, name="drain-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop polling and wait for the thread to end; safe to call twice, or before start()."""
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(DRAIN_STOP_TIMEOUT_S)
            if self._thread.is_alive():
                log.warning("the drain watch did not stop within %g s", DRAIN_STOP_TIMEOUT_S)

    def _watch(self) -> None:
        while not self._stopped.wait(DRAIN_POLL_S):
            try:
                drained = draining_nodes()
            except Exception as err:  # a GCS hiccup: try again at the next poll
                log.debug("drain poll failed: %s", err)
                continue
            node_ids = self._node_ids()
            self.draining = {node: deadline for node, deadline in drained.items() if node in node_ids}


def kill_actors(actors: list) -> None:
    """ray.kill each of `actors`, for good; those already dead are skipped."""
    for actor in actors:
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # already dead: nothing left to free
            pass


def end_actors(actors: list, timeout_s: float) -> None:
    """Let each of `actors` exit on its own (idle ones do at once), and kill those that have not
    within timeout_s. Not ray.kill first: it sends SIGTERM, and Ray's handler for it, landing
    inside a garbage-collector callback, prints a traceback that reaches the driver's terminal
    after the run's last line."""
    leaving = [actor.__ray_terminate__.remote() for actor in actors]
    ended, _ = ray.wait(leaving, num_returns=len(leaving), timeout=timeout_s)
    for ref in ended:
        try:
            ray.get(ref)
        except ray.exceptions.RayError:  # the exit reads as the actor's death: as meant
            pass
    kill_actors([actor for actor, ref in zip(actors, leaving) if ref not in ended])


def place_bundles(cfg: RunConfig, *, say: Callable[[str], None], check_abort: Callable[[], None]) -> PlacementGroup:
    """Reserve one bundle per worker and per spare; say what is missing while waiting, then
    fail clearly after start_timeout_s."""
    bundle = {"CPU": cfg.cpus_per_worker}
    if cfg.device == "cuda":
        bundle["GPU"] = cfg.gpus_per_worker
    placement = placement_group([bundle] * (cfg.num_workers + cfg.spare_workers), strategy=cfg.placement_strategy)
    deadline = time.monotonic() + cfg.start_timeout_s
    ready = placement.ready()
    polled = time.monotonic()
    try:
        while not ray.wait([ready], timeout=min(PLACEMENT_SLICE_S, max(0.0, deadline - time.monotonic())))[0]:
            check_abort()
            if time.monotonic() < min(deadline, polled + PLACEMENT_POLL_S):
                continue
            polled = time.monotonic()
            spares = f" + {cfg.spare_workers} spare" if cfg.spare_workers else ""
            want = f"{cfg.num_workers}{spares} x {bundle} ({cfg.placement_strategy})"
            have = {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
            if time.monotonic() >= deadline:
                raise PlacementError(
                    f"could not place {want} within {cfg.start_timeout_s:g} s; the cluster has {have} free: "
                    "lower num_workers, spare_workers or cpus_per_worker, add nodes, or raise start_timeout_s")
            say(f"waiting for resources: {want}; free now: {have}")
    except BaseException:
        # A request left pending would take its bundles once they free up, for as long as this driver
        # lives (a sweep's next points, a notebook): withdraw it.
        remove_placement_group(placement)
        raise
    return placement
