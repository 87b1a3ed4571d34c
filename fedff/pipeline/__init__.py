"""The driver side of a layer-worker chain: streaming data in, running epochs, launching."""
