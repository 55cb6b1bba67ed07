# A stand-in for minio/minio behind the compose file's `minio` service, where MinIO cannot be installed
# (it ships no Debian or PyPI package): moto in server mode with IAM policies enforced and a fixed root
# key pair, started by edgefleet/s3server.py, which takes MinIO's command line (`server /data
# --console-address :9001`), its root-key files (MINIO_ROOT_USER_FILE, MINIO_ROOT_PASSWORD_FILE) and,
# through the `mc` shim, the compose health check `mc ready local`. Its objects live in memory: a
# restart of this container empties the store, which real MinIO would not. Built by scripts/images.sh.
FROM python:3.11-slim
# psutil: edgefleet/ports.py, which s3server.py imports, reads who listens on a port with it.
RUN python3 -m venv /opt/s3 && /opt/s3/bin/pip install --no-cache-dir --quiet "moto[server]>=5" "psutil>=6.0" \
    && printf '#!/bin/sh\nexec /opt/s3/bin/python -m edgefleet.s3server mc "$@"\n' > /usr/local/bin/mc \
    && chmod 755 /usr/local/bin/mc \
    && useradd --uid 10001 --no-create-home edgefleet
# The server needs these three files of edgefleet and nothing else of it (no shared/, no pydantic).
COPY edgefleet/__init__.py edgefleet/ports.py edgefleet/s3server.py /opt/s3/app/edgefleet/
USER edgefleet
ENV PYTHONPATH=/opt/s3/app PYTHONUNBUFFERED=1 PATH=/opt/s3/bin:$PATH
ENTRYPOINT ["python", "-m", "edgefleet.s3server"]
CMD ["server", "/data"]
