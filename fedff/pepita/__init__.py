"""PEPITA: forward learning with a top-down error (layer.py)."""
