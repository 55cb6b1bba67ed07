# One Dockerfile, one target per service (docker build --target inference|sync|telemetry|cloud-ingest|console|camera).
# Every image: python:3.11-slim (multi-arch: linux/amd64 and linux/arm64), the packages installed into a
# virtual environment in a build stage and only that environment copied on, non-root (uid 10001), a
# health check, and the entry command the tests run (`edgefleet <service>`).
# No image carries torch, tests, pip or build tools: models are built once elsewhere
# (`edgefleet model build`) and mounted or delivered by sync. onnxruntime, opencv-python-headless,
# numpy, cryptography and psutil all publish manylinux aarch64 wheels, so no stage compiles anything.
# Sizes: `edgefleet bench images` (README, "Deployment").
# No `# syntax=` line and no RUN --mount: the engine's built-in frontend and the classic builder both
# build this file, so it builds where no frontend image can be pulled.

FROM python:3.11-slim AS build
RUN python3 -m venv /opt/edgefleet
WORKDIR /src
# The dependencies first, in a layer of their own that a change of edgefleet's code does not invalidate.
COPY pyproject.toml README.md ./
RUN python3 -c "import tomllib; print('\\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > requirements.txt \
    && /opt/edgefleet/bin/pip install --no-cache-dir -r requirements.txt
COPY shared shared
COPY services services
COPY edgefleet edgefleet
# pip and setuptools leave with the build stage: nothing installs at run time. Trimmed (measured in
# the built image): botocore's models of every AWS service but S3, STS and IAM (28 MB -> 0.5 MB; only
# those are called), onnxruntime's transformer-optimisation scripts (5.6 MB; never imported), tests.
RUN /opt/edgefleet/bin/pip install --no-cache-dir --no-deps . \
    && /opt/edgefleet/bin/pip uninstall --yes --quiet pip setuptools wheel \
    && cd /opt/edgefleet/lib/python3*/site-packages \
    && find botocore/data -mindepth 1 -maxdepth 1 -type d ! -name s3 ! -name sts ! -name iam -exec rm -rf {} + \
    && rm -rf onnxruntime/transformers \
    && find . -depth -type d -name tests -exec rm -rf {} +

# The camera simulator's stills: the photographs bundled in scikit-image, written out as JPEG files
# here so the camera image carries the photos and not scikit-image and SciPy (~150 MB).
FROM python:3.11-slim AS photos
RUN python3 -m venv /opt/photos && /opt/photos/bin/pip install --no-cache-dir --quiet scikit-image opencv-python-headless
COPY edgefleet/photos.py /opt/photos/
RUN mkdir /photos && cd /opt/photos && bin/python -c "from pathlib import Path; import photos; \
[Path('/photos', name + '.jpg').write_bytes(data) for name, data in photos.bundled_jpegs()]"

FROM python:3.11-slim AS runtime
# The writable paths exist in the image, owned by the service user, so an empty named volume mounted
# there starts owned by uid 10001 too (Docker copies a path's ownership into a new volume).
RUN useradd --uid 10001 --create-home edgefleet \
    && mkdir -p /var/lib/edgefleet/store /var/lib/edgefleet/telemetry /var/lib/edgefleet/plugins \
       /var/lib/edgefleet/plugin-cache \
    && chown -R edgefleet:edgefleet /var/lib/edgefleet
COPY --from=build /opt/edgefleet /opt/edgefleet
USER edgefleet
WORKDIR /var/lib/edgefleet
# Metrics (EDGEFLEET_METRICS_PORT, set per service by docker-compose.yml and k3s/) on every interface of
# the container's own network, so a published port or Prometheus in the cluster reaches them.
ENV PATH=/opt/edgefleet/bin:$PATH \
    EDGEFLEET_LOG_FORMAT=json \
    EDGEFLEET_HEALTH_FILE=/tmp/edgefleet.alive \
    EDGEFLEET_METRICS_HOST=0.0.0.0 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# Unhealthy once the heartbeat is 15 s old (a dead broker link or a stuck worker loop); a process frozen
# whole for 45 s more is SIGKILLed by the check itself, and the restart policy brings the container
# back (Docker restarts on exit, never on `unhealthy`). Needs `init: true`: the service is not PID 1.
# `python -m shared.health` is `edgefleet health` without the CLI's imports (0.13 CPU-s a probe, not 0.6:
# shared/health.py), so a 5 s interval costs 2.6 % of a core and a started container is healthy ~5 s in.
HEALTHCHECK --interval=5s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-m", "shared.health", "/tmp/edgefleet.alive", "--max-age", "15", "--kill-after", "45"]
ENTRYPOINT ["edgefleet"]

FROM runtime AS inference
ENV EDGEFLEET_MODEL_DIR=/var/lib/edgefleet/store/current \
    EDGEFLEET_PLUGINS_DIR=/var/lib/edgefleet/plugins \
    EDGEFLEET_PLUGINS_CACHE_DIR=/var/lib/edgefleet/plugin-cache
CMD ["inference"]

FROM runtime AS sync
ENV EDGEFLEET_MODEL_STORE=/var/lib/edgefleet/store \
    EDGEFLEET_PLUGINS_DIR=/var/lib/edgefleet/plugins \
    EDGEFLEET_SEED_MODEL_DIR=/models/efficientnet-lite0 \
    EDGEFLEET_TRUSTED_KEYS_DIR=/run/secrets/edgefleet-keys
CMD ["sync"]

FROM runtime AS telemetry
ENV EDGEFLEET_OUTBOX_PATH=/var/lib/edgefleet/telemetry/outbox.db
CMD ["telemetry"]

FROM runtime AS cloud-ingest
CMD ["cloud-ingest"]

FROM runtime AS console
# The fleet console's page (services/console/page, in the package) on 8080, on every interface of the
# container's network: docker-compose.yml publishes it on the host's loopback.
ENV EDGEFLEET_CONSOLE_HOST=0.0.0.0
EXPOSE 8080
CMD ["console"]

FROM runtime AS camera
# Publishes frames; the broker is its only contact, so a heartbeat would say nothing the broker does not.
HEALTHCHECK NONE
COPY --from=photos /photos /opt/edgefleet-photos
ENV EDGEFLEET_SOURCE=/opt/edgefleet-photos
CMD ["camera"]
