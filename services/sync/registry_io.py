"""The registry side of a rollout: size-capped reads of signed manifests, resumable downloads (a cascade's
document, then its members, each held to its pin), the backoff between retries and the pause a paced
rollout asks for. Every wait ends early when the rollout is superseded or the owner shuts down.

It owns no thread, no MQTT link and no process state beyond what it is given, so the sync service
(service.py) composes one, and so can a caller that runs many devices in one process (each with its own
store, report callback and `changed` condition, sharing one S3 client).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from botocore.exceptions import BotoCoreError, ClientError

from services.sync.download import Cancelled, DownloadFailed, DownloadInterrupted, download
from services.sync.job import Job
from services.sync.membership import requested
from services.sync.rollout import StepFailed, Superseded
from services.sync.store import ModelStore, StagedMember
from shared import registry
from shared.cascade import CascadeMember, CascadeSpec, is_cascade
from shared.config import SyncSettings
from shared.lifecycle import Progress
from shared.manifest import MODEL_FILE, ModelManifest
from shared.schemas import CanaryVerdict, ModelRef, Rollout, SyncState

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from mypy_boto3_s3 import S3Client


class Report(Protocol):
    """Publishes the device's sync state for a model rollout (rollout.Io.report's shape)."""

    def __call__(self, state: SyncState, rollout_id: str | None, target: ModelRef | None = None,
                 reason: str | None = None, canary: CanaryVerdict | None = None,
                 progress: int | None = None) -> None: ...


class RegistryIo:
    """Reads and downloads from the model registry for one device's rollouts: the registry half of
    rollout.Io (fetch_manifest, download, download_members, pause), and the primitives (read_object,
    download_object, wait) the plugin rollouts use with their own Job.

    :param settings: the device's sync settings: registry_bucket, download (chunk_bytes, limit_bytes_s,
        timeout_s, retry_max_s).
    :param s3: the S3 client (one attempt per call: retries are this class's, with backoff); may be shared
        by many RegistryIo objects (boto3 clients are thread-safe).
    :param trusted: the operators' public keys a manifest's signature must verify against, by key id.
    :param store: the device's model store, where staging (.part) files live.
    :param superseded: whether a newer rollout message or shutdown ends this rollout (polled between steps
        and whenever `changed` is notified).
    :param changed: notified (notify_all) whenever `superseded` may have become true; every wait here
        (a backoff, a pause) waits on it, so a new rollout or a shutdown ends the wait at once.
    :param progress: the rollout worker's Progress, ticked before each bounded wait.
    :param report: publishes the device's sync state (RECEIVED while retrying, DOWNLOADING with progress).
    :param downloaded: called with the number of bytes each download step fetched (metrics).
    """

    def __init__(self, settings: SyncSettings, s3: S3Client, trusted: dict[str, Ed25519PublicKey],
                 store: ModelStore, superseded: Callable[[Rollout], bool], changed: threading.Condition,
                 progress: Progress, report: Report, downloaded: Callable[[int], None]) -> None:
        self.settings, self.s3, self.trusted, self.store = settings, s3, trusted, store
        self._superseded, self._changed, self._progress = superseded, changed, progress
        self._report, self._downloaded = report, downloaded
        self._s3_call_s = 2 * settings.download.timeout_s  # one attempt: connect, then read, each within the timeout

    def job(self, rollout: Rollout) -> Job:
        """The model rollout as read_object and download_object take it."""
        def report(state: SyncState, target: ModelRef, reason: str | None, progress: int | None) -> None:
            self._report(state, rollout.rollout_id, target=target, reason=reason, progress=progress)

        return Job(rollout.rollout_id, requested(rollout), lambda: self._superseded(rollout), self._progress, report)

    def fetch_manifest(self, rollout: Rollout) -> tuple[ModelManifest, bytes, bytes]:
        """The rollout's manifest, signed by a trusted key and naming the rollout's model and version; its
        bytes and its signature.

        :raises StepFailed: missing, over its cap, not signed by a trusted key, or another model's.
        :raises Superseded: a newer rollout or shutdown.
        """
        bucket = self.settings.registry_bucket
        try:
            document_key = registry.key(rollout.model, rollout.version, registry.MANIFEST_OBJECT)
            signature_key = registry.key(rollout.model, rollout.version, registry.SIGNATURE_OBJECT)
        except ValueError as exc:
            raise StepFailed(f"refused the rollout's model name or version: {exc}") from None
        document = self.read_object(self.job(rollout), document_key, registry.MAX_MANIFEST_BYTES)
        signature = self.read_object(self.job(rollout), signature_key, registry.MAX_SIGNATURE_BYTES)
        try:
            manifest = registry.verify(document, signature, self.trusted)
        except (registry.SignatureError, ValueError) as exc:
            raise StepFailed(f"refused s3://{bucket}/{rollout.model}/{rollout.version}: {exc}") from None
        if (manifest.name, manifest.version) != (rollout.model, rollout.version):
            raise StepFailed(f"the signed manifest is for {manifest.name} v{manifest.version}, not the rollout's")
        return manifest, document, signature

    def read_object(self, job: Job, key: str, max_bytes: int) -> bytes:
        """A registry object read whole, but only if it is at most max_bytes; retried while the store is away.

        :raises StepFailed: missing, forbidden or over the cap.
        :raises Superseded: a newer rollout or shutdown.
        """
        delay = 1.0
        while True:
            job.check()
            job.progress.tick(self._s3_call_s)
            try:
                return registry.read_bounded(self.s3, self.settings.registry_bucket, key, max_bytes)
            except registry.ObjectTooLarge as exc:
                raise StepFailed(f"refused s3://{self.settings.registry_bucket}/{key}: {exc}") from None
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code")
                if code in ("NoSuchKey", "404", "NoSuchBucket", "AccessDenied", "403"):
                    raise StepFailed(f"s3://{self.settings.registry_bucket}/{key}: {code}") from None
                reason = str(exc)
            except (BotoCoreError, OSError) as exc:
                reason = str(exc)
            job.report(SyncState.RECEIVED, job.target, f"registry unreachable, retrying in {delay:.0f} s: {reason}",
                       None)
            delay = self._backoff(job, delay)

    def download(self, rollout: Rollout, manifest: ModelManifest) -> Path:
        """The verified artifact (model.onnx or cascade.json) in a staging file.

        :raises StepFailed: missing, or not what its manifest says.
        :raises Superseded: a newer rollout or shutdown.
        """
        part = self.store.part_file(manifest.name, manifest.version, manifest.sha256)
        if not is_cascade(manifest):  # a cascade's members' parts are known, and kept, once its document is read
            self.store.discard_parts(keep={part})
        key = registry.key(manifest.name, manifest.version, manifest.file)
        return self.download_object(self.job(rollout), manifest.ref(), key, part, manifest.size_bytes,
                                    manifest.sha256)

    def download_members(self, rollout: Rollout, cascade: ModelManifest, spec: CascadeSpec) -> list[StagedMember]:
        """A cascade's members, stage 1 then stage 2: each one's signed manifest verified and equal to its
        pin, then its model downloaded and verified.

        :raises StepFailed: naming the member.
        :raises Superseded: a newer rollout or shutdown.
        """
        # Every member's signature and pin first: a refused member costs two small reads, not a model download.
        signed = [self._member_manifest(rollout, pin) for pin in spec.stages]
        parts = [self.store.part_file(pin.name, pin.version, pin.sha256) for pin in spec.stages]
        self.store.discard_parts(keep={self.store.part_file(cascade.name, cascade.version, cascade.sha256), *parts})
        staged = []
        for pin, part, (member, document, signature) in zip(spec.stages, parts, signed, strict=True):
            key = registry.key(member.name, member.version, member.file)
            self.download_object(self.job(rollout), cascade.ref(), key, part, member.size_bytes, member.sha256,
                                 note=f"{pin.folder}: {member.name} v{member.version}")
            staged.append(StagedMember(pin.folder, part, document, signature))
        return staged

    def _member_manifest(self, rollout: Rollout, pin: CascadeMember) -> tuple[ModelManifest, bytes, bytes]:
        """A member's signed manifest from the registry, verified and held to the cascade's pin.

        :raises StepFailed: missing, not signed by a trusted key, or not the model the pin names.
        """
        what = f"the cascade's {pin.folder} member {pin.name} v{pin.version}"
        try:
            job = self.job(rollout)
            document = self.read_object(job, registry.key(pin.name, pin.version, registry.MANIFEST_OBJECT),
                                        registry.MAX_MANIFEST_BYTES)
            signature = self.read_object(job, registry.key(pin.name, pin.version, registry.SIGNATURE_OBJECT),
                                         registry.MAX_SIGNATURE_BYTES)
        except StepFailed as exc:
            raise StepFailed(f"{what}: {exc}") from None
        try:
            member = registry.verify(document, signature, self.trusted)
        except (registry.SignatureError, ValueError) as exc:
            raise StepFailed(f"refused {what}: {exc}") from None
        if member.file != MODEL_FILE:
            raise StepFailed(f"refused {what}: it is {member.file}, a member is one ONNX model")
        signed = (member.name, member.version, member.sha256, member.size_bytes)
        if signed != (pin.name, pin.version, pin.sha256, pin.size_bytes):
            raise StepFailed(f"refused {what}: the cascade pins SHA-256 {pin.sha256[:16]}… ({pin.size_bytes} bytes), "
                             f"the registry's signed manifest is {member.name} v{member.version} with "
                             f"{member.sha256[:16]}… ({member.size_bytes} bytes)")
        return member, document, signature

    def download_object(self, job: Job, target: ModelRef, key: str, part: Path, size: int, sha256: str,
                        note: str | None = None) -> Path:
        """One registry object into its staging file, resumed and retried while the store is away.

        :param target: what the reports name (the rollout's model, also while a cascade's member downloads).
        :param note: what is downloading, when that is not `target` itself (a cascade's member).
        :raises StepFailed: the object is missing or not what its manifest says.
        :raises Superseded: a newer rollout or shutdown.
        """
        s = self.settings
        resumed = part.stat().st_size if part.exists() else 0
        job.report(SyncState.DOWNLOADING, target, _joined(note, f"resuming at byte {resumed}" if resumed else None),
                   resumed)
        last = [time.monotonic()]
        counted = [resumed]  # bytes a previous attempt (or process) fetched are not counted again
        throttle_s = s.download.chunk_bytes / s.download.limit_bytes_s if s.download.limit_bytes_s else 0
        chunk_s = self._s3_call_s + throttle_s

        def progress(done: int) -> None:
            job.progress.tick(chunk_s)
            self._downloaded(max(0, done - counted[0]))
            counted[0] = done
            if time.monotonic() - last[0] >= 1.0:
                last[0] = time.monotonic()
                job.report(SyncState.DOWNLOADING, target, note, done)

        delay = 1.0
        while True:
            job.progress.tick(chunk_s)
            try:
                return download(self.s3, s.registry_bucket, key, part, size, sha256,
                                s.download.chunk_bytes, s.download.limit_bytes_s, progress, job.superseded)
            except Cancelled:
                raise Superseded() from None
            except DownloadFailed as exc:
                part.unlink(missing_ok=True)
                raise StepFailed(str(exc)) from None
            except DownloadInterrupted as exc:
                have = part.stat().st_size if part.exists() else 0
                job.report(SyncState.DOWNLOADING, target,
                           _joined(note, f"interrupted, retrying in {delay:.0f} s from byte {have}: {exc}"), have)
                delay = self._backoff(job, delay)

    def pause(self, rollout: Rollout, seconds: float) -> None:
        """Waits `seconds` before a paced rollout's download (rollout.Io.pause).

        :raises Superseded: a newer rollout or shutdown ends the wait.
        """
        self.wait(self.job(rollout), seconds)

    def wait(self, job: Job, seconds: float) -> None:
        """Waits `seconds`, or less if the job is superseded first (`changed` wakes it).

        :raises Superseded: the job is superseded (before, during or at the end of the wait).
        """
        job.check()
        job.progress.tick(seconds)
        with self._changed:
            self._changed.wait_for(job.superseded, timeout=seconds)
        job.check()

    def _backoff(self, job: Job, delay: float) -> float:
        self.wait(job, delay)
        return min(delay * 2, self.settings.download.retry_max_s)


def _joined(*parts: str | None) -> str | None:
    return "; ".join(p for p in parts if p) or None


class RegistrySteps:
    """The rollout.Io steps that are RegistryIo's own (fetch, download, members, the paced wait), for an Io
    that keeps one as `registry`: SyncService, and the simulator's devices (edgefleet/simulate), so both
    hand the state machine the same registry code."""

    registry: RegistryIo

    def fetch_manifest(self, rollout: Rollout) -> tuple[ModelManifest, bytes, bytes]:
        return self.registry.fetch_manifest(rollout)

    def download(self, rollout: Rollout, manifest: ModelManifest) -> Path:
        return self.registry.download(rollout, manifest)

    def download_members(self, rollout: Rollout, cascade: ModelManifest, spec: CascadeSpec) -> list[StagedMember]:
        return self.registry.download_members(rollout, cascade, spec)

    def pause(self, rollout: Rollout, seconds: float) -> None:
        self.registry.pause(rollout, seconds)
