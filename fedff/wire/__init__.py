"""Tensors on the wire: frames, chunking and validation for the layer-worker protocol."""
