"""distrib: synchronized data-parallel resnet18 training on Ray actors."""

from distrib.config import RunConfig
from distrib.config import load as load_config
from distrib.errors import (
    CheckpointError,
    ConfigError,
    DivergenceError,
    PlacementError,
    ReplicaError,
    ReplicaTimeout,
    StoppedAtOnce,
    WriteError,
)

__all__ = ["CheckpointError", "ConfigError", "DivergenceError", "Orchestrator", "PlacementError", "ReplicaError",
           "ReplicaTimeout", "RunConfig", "StoppedAtOnce", "WriteError", "keep_warm", "load_config"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """Orchestrator and keep_warm on first use: every replica process imports this package
    (Ray loads distrib.replica there), and the driver's modules (object storage's pyarrow
    among them) cost each replica ~0.3 CPU-seconds it never uses."""
    if name == "Orchestrator":
        from distrib.driver import Orchestrator

        return Orchestrator
    if name == "keep_warm":
        from distrib.warm import keep_warm

        return keep_warm
    raise AttributeError(f"module 'distrib' has no attribute {name!r}")
