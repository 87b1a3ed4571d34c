"""Layer workers: a block of FF layers served over gRPC, trained on a streamed input."""
