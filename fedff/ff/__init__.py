"""The Forward-Forward engine: layers, objectives, negative data, the in-process network."""

from fedff.ff.layer import FFLayer, Layer, LayerBatch, LayerConfig, LayerResult, ShapeError
from fedff.ff.network import FFNetwork, InputSpec

__all__ = ["FFLayer", "FFNetwork", "InputSpec", "Layer", "LayerBatch", "LayerConfig",
           "LayerResult", "ShapeError"]
