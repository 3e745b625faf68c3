"""Generated gRPC code lives below; `make protos` writes it."""
