# syntax=docker/dockerfile:1
#
# One image with both commands, tether-broker and tether-agent, for every
# architecture the base image has (linux/amd64, linux/arm64, linux/arm/v7):
#
#   docker buildx build --platform linux/amd64,linux/arm64,linux/arm/v7 \
#       -t <registry>/tether:0.1.0 --push .
#
# The broker runs it as a static pod, the agent as a DaemonSet
# (deploy/kubernetes/). The default user is unprivileged (65532); the broker
# static pod overrides that to read root-only keys on the host.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------- build
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
# PyPI has no armv7 wheels for cffi, msgpack and PyYAML: build them here, in
# the build stage only. Every other architecture installs binary wheels.
RUN if [ "$(dpkg --print-architecture)" = "armhf" ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends gcc libc6-dev libffi-dev \
        && rm -rf /var/lib/apt/lists/*; \
    fi
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protocol/ protocol/
COPY broker/ broker/
COPY edge_agent/ edge_agent/
COPY tether/ tether/
RUN python -m venv /opt/tether \
    && /opt/tether/bin/pip install . \
    && /opt/tether/bin/pip uninstall -y pip \
    && /opt/tether/bin/tether-agent --help >/dev/null \
    && /opt/tether/bin/tether-broker --help >/dev/null

# ---------------------------------------------------------------- runtime
# Same base, so the venv's interpreter link (/usr/local/bin/python3.11)
# holds; no compiler, no sources, no pip in the venv.
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="tether" \
      org.opencontainers.image.description="Reverse tunnel for Kubernetes control planes to reach dial-out-only edge nodes" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/tether /opt/tether
ENV PATH=/opt/tether/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 65532:65532
# 8091 agents, 8092 broker health, 8093 agent health. Metrics are on the
# admin ports (broker 8095, agent 8094 with --metrics), bound to 127.0.0.1
# unless --admin-bind-address says otherwise, so they are not exposed here.
EXPOSE 8091 8092 8093
CMD ["tether-agent", "--help"]
