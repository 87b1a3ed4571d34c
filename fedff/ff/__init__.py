"""Forward-Forward (Hinton 2022; Collaborative FF): the goodness layer, its objectives and
the negative data it learns from."""

from fedff.ff.layer import FFLayer

__all__ = ["FFLayer"]
