"""distrib: synchronized data-parallel resnet18 training on Ray actors."""

from distrib.config import RunConfig
from distrib.config import load as load_config
from distrib.driver import Orchestrator
from distrib.errors import (
    CheckpointError,
    ConfigError,
    DivergenceError,
    PlacementError,
    ReplicaError,
    ReplicaTimeout,
    StoppedAtOnce,
)

__all__ = ["CheckpointError", "ConfigError", "DivergenceError", "Orchestrator", "PlacementError", "ReplicaError",
           "ReplicaTimeout", "RunConfig", "StoppedAtOnce", "load_config"]
__version__ = "0.1.0"
