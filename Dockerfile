# resolverd's container image. Build from the repository root:
#
#   docker build -t resolverd:0.1.0 .          # or: podman build -t resolverd:0.1.0 .
#   kind load docker-image resolverd:0.1.0     # for a kind cluster
#
# The daemon reads /etc/resolverd/resolverd.yaml (mount a ConfigMap there, see
# examples/kubernetes/) and keeps its state under /var/lib/resolverd.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: install the package and its runtime dependencies into a venv -----
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/resolverd
WORKDIR /src
# What the package build reads: the metadata (README.md is its `readme`) and
# the sources. No tests, no test extra.
COPY pyproject.toml README.md ./
COPY resolverd ./resolverd
RUN /opt/resolverd/bin/pip install . \
 && /opt/resolverd/bin/resolverd version

# --- runtime: the venv on a clean base, as an unprivileged user --------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="resolverd" \
      org.opencontainers.image.description="Service-discovery DNS sidecar" \
      org.opencontainers.image.licenses="Apache-2.0"
# A numeric user, so that Kubernetes' runAsNonRoot can check it.
RUN groupadd --system --gid 10001 resolverd \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /var/lib/resolverd --shell /usr/sbin/nologin resolverd \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/resolverd \
 && install -d -m 0755 /etc/resolverd
COPY --from=build /opt/resolverd /opt/resolverd
# STATE_DIRECTORY: where registrations.json goes when the config names no
# state_file. The bytecode is compiled at install time; the root filesystem
# may be read-only.
ENV PATH=/opt/resolverd/bin:$PATH \
    STATE_DIRECTORY=/var/lib/resolverd \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /var/lib/resolverd
# DNS, the gRPC API, and the HTTP metrics/health listener (metrics.listen).
# Binding 53 as this user needs net.ipv4.ip_unprivileged_port_start <= 53 in
# the container's network namespace (a pod sysctl, or docker run --sysctl).
EXPOSE 53/udp 53/tcp 50051 9153
ENTRYPOINT ["resolverd", "run", "-c", "/etc/resolverd/resolverd.yaml"]
