"""resolverd: a service-discovery DNS sidecar."""

__version__ = "0.1.0"
