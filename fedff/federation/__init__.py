"""Federation: a Flower coordinator that aggregates each FF layer across data owners."""
