"""Generated from protos/resolverd/api/v1/resolver.proto by `make protos`. Never edit."""
