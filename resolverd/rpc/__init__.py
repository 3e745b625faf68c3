"""The gRPC API: servicer (proto <-> model) and server (listeners, health, reflection)."""
