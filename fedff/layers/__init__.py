"""The layer contract (contract.py) and the registry of layer kinds (registry.py)."""

from fedff.layers.contract import (Layer, LayerBatch, LayerConfig, LayerResult, OptimConfig,
                                   Pending)

__all__ = ["Layer", "LayerBatch", "LayerConfig", "LayerResult", "OptimConfig", "Pending"]
