# syntax=docker/dockerfile:1
# One Dockerfile, one target per service (docker build --target inference|sync|telemetry|cloud-ingest|camera).
# Every image: python:3.11-slim (multi-arch: linux/amd64 and linux/arm64), wheels built in a separate
# stage, non-root, a health check, and the entry command the tests run (`edgefleet <service>`).
# No image carries torch: models are built once elsewhere (`edgefleet model build`) and mounted or
# delivered by sync. onnxruntime, opencv-python-headless, numpy, cryptography and psutil all publish
# manylinux aarch64 wheels, so no stage compiles anything.
# Expected size of every target (uncompressed), ~460 MB: python:3.11-slim ~130 MB, opencv-headless
# 153 MB, onnxruntime 78 MB, numpy 73 MB, botocore 32 MB, cryptography 16 MB, the rest ~25 MB
# (package sizes measured in this project's virtual environment; no Docker engine here to build one).

FROM python:3.11-slim AS wheels
WORKDIR /src
COPY pyproject.toml README.md ./
COPY shared shared
COPY services services
COPY edgefleet edgefleet
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim AS runtime
RUN useradd --uid 10001 --create-home edgefleet \
    && mkdir -p /var/lib/edgefleet && chown edgefleet /var/lib/edgefleet
COPY --from=wheels /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER edgefleet
WORKDIR /var/lib/edgefleet
ENV EDGEFLEET_LOG_FORMAT=json \
    EDGEFLEET_HEALTH_FILE=/tmp/edgefleet.alive \
    PYTHONUNBUFFERED=1
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 CMD ["edgefleet", "health", "/tmp/edgefleet.alive"]
ENTRYPOINT ["edgefleet"]

FROM runtime AS inference
ENV EDGEFLEET_MODEL_DIR=/var/lib/edgefleet/store/current
CMD ["inference"]

FROM runtime AS sync
ENV EDGEFLEET_MODEL_STORE=/var/lib/edgefleet/store \
    EDGEFLEET_SEED_MODEL_DIR=/models/efficientnet-lite0 \
    EDGEFLEET_TRUSTED_KEYS_DIR=/run/secrets/edgefleet-keys
CMD ["sync"]

FROM runtime AS telemetry
ENV EDGEFLEET_OUTBOX_PATH=/var/lib/edgefleet/telemetry/outbox.db
CMD ["telemetry"]

FROM runtime AS cloud-ingest
CMD ["cloud-ingest"]

FROM runtime AS camera
# Publishes frames; the broker is its only contact, so a heartbeat would say nothing the broker does not.
HEALTHCHECK NONE
CMD ["camera"]
