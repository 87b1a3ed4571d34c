"""Generated gRPC code for proto/fedff/v1 (scripts/gen_proto.sh). Do not edit."""
