"""One-class Forward-Forward: anomaly detection learnt from normal data only."""
