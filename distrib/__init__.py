"""distrib: synchronized data-parallel resnet18 training on Ray actors."""

from distrib.config import ConfigError, RunConfig
from distrib.config import load as load_config
from distrib.driver import DivergenceError, Orchestrator, PlacementError, ReplicaError, ReplicaTimeout

__all__ = ["ConfigError", "DivergenceError", "Orchestrator", "PlacementError", "ReplicaError", "ReplicaTimeout",
           "RunConfig", "load_config"]
__version__ = "0.1.0"
