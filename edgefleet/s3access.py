"""Least privilege in the S3 store: each device gets its own key, which can only read the model registry.

A device's sync service makes exactly two kinds of S3 request (services/sync/download.py and
shared.registry.read_bounded): HeadObject and ranged GetObject of `models/<name>/<version>/*` in the
registry bucket. IAM authorises both as s3:GetObject. The policy also allows s3:ListBucket, but only
for prefixes under `models/`: with it, a HeadObject of a missing key answers 404 rather than 403 (AWS
and MinIO hide absence from whoever may not list), and the registry's listing (edgefleet.publish.versions)
works with a device's key. Nothing else: no write, no delete, no other prefix, no telemetry bucket, no IAM.
That is the AWS S3 user-policy design ("grant least privilege", per-user keys) that MinIO implements
with the same policy documents.

`deploy/s3/device-policy.json` is `device_policy("edgefleet-models")`, for `mc admin policy create`;
a test keeps the two equal.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from pydantic import SecretStr

from edgefleet.errors import ToolError
from shared import registry, s3
from shared.config import StoreSettings
from shared.topics import check_id

USER_PREFIX = "edgefleet-device-"
POLICY_NAME = "edgefleet-device-read-models"
ACCESS_KEY_FILE, SECRET_KEY_FILE = "access-key", "secret-key"  # what docker-compose.yml's secrets name
IAM_USER_NAME_MAX = 64
DEFAULT_KEYS_DIR = Path("var/s3")
# Answers that mean "this pair is not (or no longer) a key here".
_DEAD_KEY = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidClientTokenId", "AccessDenied", "403"}


class DeviceKeyError(ToolError, RuntimeError):
    """The key could not be made: no IAM API at the endpoint, admin credentials refused, a bad device id."""


@dataclass(frozen=True)
class DeviceKey:
    user: str
    access_key_id: str
    folder: Path
    created: bool  # False: the key already in the folder works and was kept
    revoked: tuple[str, ...] = ()  # the user's other key ids, deleted when a new key was made


def device_policy(bucket: str) -> dict:
    """The IAM policy of a device key: read `models/*` and `plugins/*` of the registry bucket, nothing else.

    :param bucket: the registry bucket (StoreSettings.registry_bucket).
    """
    roots = (registry.ROOT, registry.PLUGIN_ROOT)
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "ReadModels",
                "Effect": "Allow",
                "Action": ["s3:GetObject"],  # GetObject and HeadObject, ranged or not
                "Resource": [f"arn:aws:s3:::{bucket}/{root}/*" for root in roots],
            },
            {
                "Sid": "ListModels",
                "Effect": "Allow",
                "Action": ["s3:ListBucket"],
                "Resource": [f"arn:aws:s3:::{bucket}"],
                "Condition": {"StringLike": {"s3:prefix": [f"{root}/*" for root in roots]}},
            },
        ],
    }


def user_name(device: str) -> str:
    """The IAM user of a device: edgefleet-device-<device>.

    :raises DeviceKeyError: for a device id that is not a valid id, or too long for an IAM user name.
    """
    try:
        check_id("device", device)
    except ValueError as exc:
        raise DeviceKeyError(str(exc)) from None
    name = USER_PREFIX + device
    if len(name) > IAM_USER_NAME_MAX:
        raise DeviceKeyError(f"device id {device!r} is too long: IAM user names ({name}) are at most "
                             f"{IAM_USER_NAME_MAX} characters")
    return name


def issue(settings: StoreSettings, device: str, folder: Path) -> DeviceKey:
    """Makes (or keeps) the device's read-only key and writes it to folder/access-key and folder/secret-key.

    With the store's admin credentials (settings), through the IAM API at settings.s3.endpoint_url
    (AWS IAM; moto): creates the user edgefleet-device-<device> if missing and (re)puts its inline
    policy, so a rerun also brings an old user's policy up to date. If the folder already holds a key
    of this user that the store accepts, it is kept. Otherwise a new key is made, written (files 0600,
    folder 0700), and the user's other keys are deleted: their secrets are in no file this command
    wrote, so nobody can account for them.

    :raises DeviceKeyError: a bad device id, no IAM API at the endpoint, the admin credentials refused.
    """
    name = user_name(device)
    iam = _iam(settings)
    policy = json.dumps(device_policy(settings.registry_bucket))
    try:
        try:
            iam.create_user(UserName=name, Tags=[{"Key": "edgefleet:device", "Value": device}])
        except ClientError as exc:
            if _code(exc) != "EntityAlreadyExists":
                raise
        iam.put_user_policy(UserName=name, PolicyName=POLICY_NAME, PolicyDocument=policy)
        existing = [k["AccessKeyId"] for k in iam.list_access_keys(UserName=name)["AccessKeyMetadata"]]
        kept = _stored(folder)
        if kept is not None and kept[0] in existing and key_works(settings, *kept):
            return DeviceKey(name, kept[0], folder, created=False)
        for old in existing:  # AWS allows two keys per user; a device has one
            iam.delete_access_key(UserName=name, AccessKeyId=old)
        made = iam.create_access_key(UserName=name)["AccessKey"]
    except ClientError as exc:
        raise DeviceKeyError(f"the store refused {exc.operation_name} ({_code(exc)}): are these its admin credentials, "
                             f"and does it speak the IAM API? (MinIO does not: use `mc admin`, see README)") from None
    except BotoCoreError as exc:
        raise DeviceKeyError(f"the store's IAM API did not answer: {exc}") from None
    write_key(folder, made["AccessKeyId"], made["SecretAccessKey"])
    return DeviceKey(name, made["AccessKeyId"], folder, created=True, revoked=tuple(existing))


def key_works(settings: StoreSettings, access_key_id: str, secret: str) -> bool:
    """Whether the store accepts the pair for what a device does: listing `models/` of the registry."""
    device = settings.model_copy(update={"s3": settings.s3.model_copy(
        update={"access_key_id": access_key_id, "secret_access_key": SecretStr(secret)})})
    try:
        s3.client(device, attempts=1).list_objects_v2(Bucket=settings.registry_bucket, Prefix=f"{registry.ROOT}/",
                                                      MaxKeys=1)
    except ClientError as exc:
        if _code(exc) in _DEAD_KEY:
            return False
        if _code(exc) == "NoSuchBucket":  # signed and authorised; only the registry is not made yet
            return True
        raise
    return True


def write_key(folder: Path, access_key_id: str, secret: str) -> None:
    """folder/access-key and folder/secret-key, mode 0600 in a 0700 folder, each replaced atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    for name, value in ((ACCESS_KEY_FILE, access_key_id), (SECRET_KEY_FILE, secret)):
        staging = folder / f".{name}.tmp"
        staging.unlink(missing_ok=True)
        fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(value)
            out.flush()
            os.fsync(out.fileno())
        os.replace(staging, folder / name)


def _stored(folder: Path) -> tuple[str, str] | None:
    try:
        pair = ((folder / ACCESS_KEY_FILE).read_text().strip(), (folder / SECRET_KEY_FILE).read_text().strip())
    except FileNotFoundError:
        return None
    return pair if all(pair) else None


def _iam(settings: StoreSettings):
    secret = settings.s3.secret_access_key.get_secret_value() if settings.s3.secret_access_key else None
    return boto3.client(
        "iam", endpoint_url=settings.s3.endpoint_url, region_name=settings.s3.region,
        aws_access_key_id=settings.s3.access_key_id, aws_secret_access_key=secret,
        config=Config(connect_timeout=10, read_timeout=10, retries={"max_attempts": 3, "mode": "standard"}),
    )


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))
