"""fedff: Forward-Forward learning across processes, machines and organisations."""

__version__ = "0.1.0"
