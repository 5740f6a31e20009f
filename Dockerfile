# syntax=docker/dockerfile:1
# The gpuaas operator image: the wheel built from this repository plus the runtime dependencies pinned (with
# hashes) in uv.lock, on python:3.11-slim, running as the non-root user 65532.
#   docker build -t gpuaas:0.1.0 .
# The Helm chart runs it as `gpuaas run ...` (operator) and `gpuaas report ...` (monthly report CronJob).

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
# uv at the version the Makefile pins (UV_VERSION).
ARG UV_VERSION=0.13.9
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    UV_NO_CACHE=1 \
    UV_PYTHON_DOWNLOADS=never
RUN pip install --no-cache-dir "uv==${UV_VERSION}"
WORKDIR /src
COPY pyproject.toml uv.lock README.md ./
COPY operator/ operator/
# The runtime dependencies exactly as locked (no dev group), with hashes; then the wheel, without dependencies.
RUN uv export --frozen --no-dev --no-emit-project --format requirements-txt --output-file /tmp/requirements.txt \
 && uv build --wheel --out-dir /tmp/dist \
 && uv venv --python /usr/local/bin/python3 /opt/gpuaas \
 && uv pip install --python /opt/gpuaas/bin/python --require-hashes --no-deps --compile-bytecode \
      --requirement /tmp/requirements.txt \
 && uv pip install --python /opt/gpuaas/bin/python --no-deps --compile-bytecode /tmp/dist/gpuaas-*.whl \
 && /opt/gpuaas/bin/gpuaas --help

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="gpuaas" \
      org.opencontainers.image.description="GPU-as-a-Service control plane for Kubernetes" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0"
# A named user with uid/gid 65532, so getpass resolves a user name.
RUN groupadd --system --gid 65532 gpuaas \
 && useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin gpuaas
COPY --from=build /opt/gpuaas /opt/gpuaas
ENV PATH=/opt/gpuaas/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 65532:65532
# metrics, health (kopf liveness), admission webhook
EXPOSE 8080 8081 9443
ENTRYPOINT ["gpuaas"]
CMD ["run"]
