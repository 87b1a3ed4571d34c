"""The engine: a block of consecutive layers (what one process runs), the softmax head,
the in-process network and its evaluation. It runs any layer kind of the registry."""
