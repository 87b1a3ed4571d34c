"""Unsupervised Forward-Forward: label-free layer cells and their probes."""
