"""An S3-compatible store spawned as its own process on a free loopback port: moto in server mode.

Why moto: it is the S3 server that installs from the registries this project may use (PyPI, Debian,
npm). MinIO, SeaweedFS and Garage ship no package there, and Debian's radosgw needs a whole Ceph
cluster behind it. moto speaks the S3 REST protocol over HTTP, ranged GETs included, so boto3 talks to
it exactly as to AWS or MinIO; its state lives in memory and dies with the process. Deployments point
EDGEFLEET_S3_ENDPOINT_URL at MinIO (docker-compose) or any other S3.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from edgefleet.ports import free_port, wait_listening
from shared.config import StoreSettings, load

# moto's fixed test credentials: any pair works, but boto3 refuses to sign without one.
ACCESS_KEY_ID, SECRET_ACCESS_KEY = "edgefleet", "edgefleet-secret"


class S3Server:
    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix="edgefleet-s3-"))
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """The settings that point a service or command at this store."""
        return {
            "EDGEFLEET_S3_ENDPOINT_URL": self.url,
            "EDGEFLEET_S3_ACCESS_KEY_ID": ACCESS_KEY_ID,
            "EDGEFLEET_S3_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
        }

    def settings(self, **overrides) -> StoreSettings:
        return load(StoreSettings, None, **{k.removeprefix("EDGEFLEET_").lower(): v for k, v in self.env().items()}, **overrides)

    def start(self, timeout: float = 30.0) -> S3Server:
        server = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
        log = (self.workdir / "moto.log").open("ab")
        self.process = subprocess.Popen(
            [server, "-H", "127.0.0.1", "-p", str(self.port)], stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, env={**os.environ, "MOTO_ALLOW_NONEXISTENT_REGION": "true"},
        )
        try:
            wait_listening(self.process, self.port, timeout, f"moto_server (log: {self.workdir}/moto.log)")
        except (RuntimeError, TimeoutError):
            self.stop()
            raise
        return self

    def pause(self) -> None:
        """SIGSTOP: the store stops answering (connections hang) without losing what it holds."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
