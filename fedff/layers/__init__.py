"""The layer contract (contract.py), the registry of layer kinds (registry.py) and the
layers' optimiser and schedule (optim.py)."""

from fedff.layers.contract import Layer, LayerBatch, LayerConfig, LayerResult, Pending
from fedff.layers.optim import OptimConfig

__all__ = ["Layer", "LayerBatch", "LayerConfig", "LayerResult", "OptimConfig", "Pending"]
