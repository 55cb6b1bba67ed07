"""An S3-compatible store spawned as its own process on a free loopback port: moto in server mode; and,
run as `python -m edgefleet.s3server`, the same store as a stand-in for MinIO that enforces keys.

Why moto: it is the S3 server that installs from the registries this project may use (PyPI, Debian,
npm). MinIO, SeaweedFS and Garage ship no package there, and Debian's radosgw needs a whole Ceph
cluster behind it. moto speaks the S3 REST protocol over HTTP, ranged GETs and conditional PUTs
included, so boto3 talks to it exactly as to AWS or MinIO. Deployments point EDGEFLEET_S3_ENDPOINT_URL
at MinIO (docker-compose) or any other S3.

Its data lives in memory: a restart of the process (or of its container) loses every bucket, object,
user and key, whatever the data folder says. That is acceptable for a test stand-in, never for a
store anyone relies on.

Two modes:

- `S3Server()` (the tests' and the local stack's default): plain `moto_server`, no authentication, any
  key pair is accepted.
- `S3Server(root_credentials=(id, secret))`, and `python -m edgefleet.s3server serve|server`: keys are
  enforced as MinIO and AWS enforce them. moto can check SigV4 signatures and IAM policies
  (moto.core.authorization), but it only ever issues random key ids, so the root pair MinIO takes from
  MINIO_ROOT_USER / MINIO_ROOT_PASSWORD cannot be created through its API. The entry below therefore
  runs moto in-process and, before the first request, creates an IAM user with an allow-all policy
  through moto's backend and gives its access key the root pair; only then is enforcement switched on
  (INITIAL_NO_AUTH_ACTION_COUNT = 0) and the port opened. Keys for devices are then made through the
  IAM API at the same endpoint (`edgefleet s3 device-key`), as on AWS.

  Two gaps in moto are closed here, so the stand-in refuses what MinIO and AWS refuse:
  - moto evaluates no condition of an S3 user policy (its evaluator knows only StringEquals, and only
    for role trust policies), so `"Condition": {"StringLike": {"s3:prefix": ...}}` would let a device
    list every prefix. S3 requests are judged by `_evaluate` below instead, which applies the policy
    language's rules (explicit Deny wins, else an Allow must match action, resource and every
    condition; an operator it does not know fails closed).
  - moto's `/moto-api/` endpoints (reset the store, switch authentication off) answer anyone; they are
    refused here. `/minio/health/live` and `/minio/health/ready` answer 200, unauthenticated, as MinIO's do.

The command line is MinIO's, so an image of this module can stand in for minio/minio behind the same
compose service: `server /data --console-address :9001` with MINIO_ROOT_USER(_FILE) and
MINIO_ROOT_PASSWORD(_FILE), listening on :9000 (or `--address`); there is no console. The compose
health check `mc ready local` is answered by `python -m edgefleet.s3server mc ready local` (an image
puts a two-line `mc` script on PATH that runs it), probing /minio/health/ready as MinIO's client does.
The server needs only this module, edgefleet/ports.py, edgefleet/__init__.py, `moto[server]` and psutil
(which ports.py imports).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from edgefleet.ports import free_port, wait_listening

if TYPE_CHECKING:
    from shared.config import StoreSettings

# moto's fixed test credentials: any pair works, but boto3 refuses to sign without one.
ACCESS_KEY_ID, SECRET_ACCESS_KEY = "edgefleet", "edgefleet-secret"
# The IAM user that holds the root pair in the enforcing stand-in (MinIO's root is no IAM user; here it must be one).
ROOT_USER_NAME = "edgefleet-store-root"
ALLOW_ALL = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
# MinIO refuses shorter root credentials at start; so does the stand-in, so a deployment that works here works there.
MIN_ROOT_USER, MIN_ROOT_PASSWORD = 3, 8
MINIO_PORT = 9000
# `serve` is the container's server: like MinIO it listens on every interface unless told a host.
ALL_INTERFACES = "0.0.0.0"  # noqa: S104 binding all interfaces is the point of a server in a container


class S3Server:
    """A store in its own process on a loopback port.

    :param port: the port (default: a free one).
    :param root_credentials: (access key id, secret): start the enforcing stand-in with this root pair;
        None (the default): plain moto_server, where any pair is accepted.
    """

    def __init__(self, port: int | None = None, root_credentials: tuple[str, str] | None = None) -> None:
        self.port = port or free_port()
        self.root_credentials = root_credentials
        self.workdir = Path(tempfile.mkdtemp(prefix="edgefleet-s3-"))
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, **overrides) -> dict[str, str]:
        """The environment that points a child command at this store: settings() as EDGEFLEET_* names."""
        from shared.config import environment

        return environment(self.settings(**overrides))

    def settings(self, **overrides) -> StoreSettings:
        """The settings that point a service or command at this store (the root pair, if enforcing);
        an override wins over this store's own keys (e.g. a device's key pair instead of the root's)."""
        from shared.config import StoreSettings, load

        key_id, secret = self.root_credentials or (ACCESS_KEY_ID, SECRET_ACCESS_KEY)
        own = {"s3_endpoint_url": self.url, "s3_access_key_id": key_id, "s3_secret_access_key": secret}
        return load(StoreSettings, None, **{**own, **overrides})

    def _command(self) -> list[str]:
        if self.root_credentials is None:
            server = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
            return [server, "-H", "127.0.0.1", "-p", str(self.port)]
        files = []
        for name, value in zip(("root-user", "root-password"), self.root_credentials, strict=True):
            path = self.workdir / name
            path.touch(mode=0o600)
            path.write_text(value)
            files.append(str(path))
        return [sys.executable, "-m", "edgefleet.s3server", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                "--root-user-file", files[0], "--root-password-file", files[1], "--data", str(self.workdir)]

    def start(self, timeout: float = 30.0) -> S3Server:
        log = (self.workdir / "moto.log").open("ab")
        self.process = subprocess.Popen(
            self._command(), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, env={**os.environ, "MOTO_ALLOW_NONEXISTENT_REGION": "true"},
        )
        try:
            # The enforcing entry opens its port only after the root user exists and enforcement is on.
            wait_listening(self.process, self.port, timeout, f"moto_server (log: {self.workdir}/moto.log)")
        except BaseException:
            self.stop()  # whatever ended the wait, no server is left running
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


# -- the enforcing stand-in (this process is the server) -------------------------------------------


def _evaluate(documents: list[dict], action: str, resource: str, context: dict[str, str]) -> bool:
    """Whether IAM policies allow `action` on `resource`: an explicit Deny wins, else an Allow must apply
    (AWS's evaluation logic, the part a user policy uses; MinIO follows it).

    :param documents: the policy documents (parsed JSON) of the caller.
    :param action: e.g. "s3:GetObject"; resource: e.g. "arn:aws:s3:::bucket/key".
    :param context: condition keys of the request, e.g. {"s3:prefix": "models/"}.
    """
    allowed = False
    for document in documents:
        statements = document.get("Statement", [])
        for statement in statements if isinstance(statements, list) else [statements]:
            if not _applies(statement, action, resource, context):
                continue
            if statement.get("Effect") == "Deny":
                return False
            allowed = allowed or statement.get("Effect") == "Allow"
    return allowed


def _applies(statement: dict, action: str, resource: str, context: dict[str, str]) -> bool:
    deny = statement.get("Effect") == "Deny"
    if "Action" in statement:
        hit = _any_match(statement["Action"], action, case=False)
    else:
        hit = not _any_match(statement.get("NotAction", []), action, case=False)
    if "Resource" in statement:
        hit = hit and _any_match(statement["Resource"], resource, case=True)
    elif "NotResource" in statement:
        hit = hit and not _any_match(statement["NotResource"], resource, case=True)
    if not hit:
        return False
    for operator, keys in statement.get("Condition", {}).items():
        for key, expected in keys.items():
            verdict = _condition(operator, context.get(key), expected if isinstance(expected, list) else [expected])
            # An operator this evaluator does not know fails closed: an Allow does not apply, a Deny does.
            if verdict is None:
                return deny
            if not verdict:
                return False
    return True


def _condition(operator: str, value: str | None, expected: list[str]) -> bool | None:
    base, if_exists = (operator[: -len("IfExists")], True) if operator.endswith("IfExists") else (operator, False)
    if value is None:
        # A key the request lacks: only ...IfExists and the negated operators are satisfied (AWS's rule).
        return if_exists or base in ("StringNotEquals", "StringNotLike")
    if base == "StringEquals":
        return value in expected
    if base == "StringNotEquals":
        return value not in expected
    if base == "StringLike":
        return any(_wildcard(p, value, case=True) for p in expected)
    if base == "StringNotLike":
        return not any(_wildcard(p, value, case=True) for p in expected)
    return None


def _any_match(patterns: str | list[str], value: str, case: bool) -> bool:
    return any(_wildcard(p, value, case) for p in ([patterns] if isinstance(patterns, str) else patterns))


def _wildcard(pattern: str, value: str, case: bool) -> bool:
    """IAM's wildcards: * any run of characters (slashes too), ? one character; nothing else is special."""
    regex = re.escape(pattern).replace(r"\*", ".*").replace(r"\?", ".")
    return re.fullmatch(regex, value, 0 if case else re.IGNORECASE) is not None


def _s3_context(path: str) -> dict[str, str]:
    """The S3 condition keys a request carries in its query (ListObjects' prefix, delimiter, max-keys)."""
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(path).query, keep_blank_values=True)
    return {f"s3:{name}": query[name][0] for name in ("prefix", "delimiter", "max-keys") if name in query}


# moto (5.2.6 on) names the S3 API operation (s3:ListObjectsV2, s3:HeadObject) where IAM policies name
# the permission it needs (s3:ListBucket, s3:GetObject); AWS and MinIO judge by the permission, per
# https://docs.aws.amazon.com/service-authorization/latest/reference/list_amazons3.html
IAM_ACTION_OF_OPERATION = {
    "s3:ListObjects": "s3:ListBucket", "s3:ListObjectsV2": "s3:ListBucket", "s3:HeadBucket": "s3:ListBucket",
    "s3:HeadObject": "s3:GetObject", "s3:GetObjectAttributes": "s3:GetObject",
    "s3:ListObjectVersions": "s3:ListBucketVersions", "s3:DeleteObjects": "s3:DeleteObject",
    "s3:CreateMultipartUpload": "s3:PutObject", "s3:UploadPart": "s3:PutObject",
    "s3:CompleteMultipartUpload": "s3:PutObject", "s3:ListMultipartUploads": "s3:ListBucketMultipartUploads",
    "s3:ListParts": "s3:ListMultipartUploadParts", "s3:CopyObject": "s3:PutObject",
}


def _enforce_s3_policies() -> None:
    """Judges S3 requests by _evaluate instead of moto's evaluator (which ignores S3 conditions)."""
    from moto.iam import access_control
    from moto.iam.access_control import IAMPolicy

    class S3Request(access_control.S3IAMRequest):
        def check_action_permitted(self, resource: str) -> None:
            documents = [IAMPolicy(policy)._policy_json for policy in self._access_key.collect_policies()]
            action = IAM_ACTION_OF_OPERATION.get(self._action, self._action)
            if not _evaluate(documents, action, resource, _s3_context(self._path)):
                self._raise_access_denied()

    # moto.core.authorization imports S3IAMRequest from this module at every request.
    access_control.S3IAMRequest = S3Request


def _bootstrap(root: tuple[str, str]) -> None:
    """Creates the root IAM user (allow-all) holding exactly the root pair, then turns enforcement on."""
    from moto import settings
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.iam.models import iam_backends

    backend = iam_backends[DEFAULT_ACCOUNT_ID]["aws"]
    backend.create_user("us-east-1", ROOT_USER_NAME)
    backend.put_user_policy(ROOT_USER_NAME, "allow-all", json.dumps(ALLOW_ALL))
    key = backend.create_access_key(ROOT_USER_NAME)
    # moto only makes random ids; the root pair is written over the new key's, and its index re-keyed.
    del backend.access_keys[key.access_key_id]
    key.access_key_id, key.secret_access_key = root
    backend.access_keys[key.access_key_id] = key
    _enforce_s3_policies()
    settings.INITIAL_NO_AUTH_ACTION_COUNT = 0


def _guarded(app):
    """moto's WSGI app behind MinIO's health endpoints, with moto's unauthenticated control API refused."""

    def guarded(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path in ("/minio/health/live", "/minio/health/ready"):
            start_response("200 OK", [("Content-Length", "0")])
            return [b""]
        if path.startswith("/moto-api"):
            body = b"the moto control API is disabled in the enforcing stand-in\n"
            start_response("403 Forbidden", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
            return [body]
        # One account only: a client may not pick another of moto's accounts by header.
        environ.pop("HTTP_X_MOTO_ACCOUNT_ID", None)
        return app(environ, start_response)

    return guarded


def serve(host: str, port: int, root: tuple[str, str]) -> None:
    """Runs the enforcing store in this process until SIGTERM/SIGINT (the state is lost then)."""
    if len(root[0]) < MIN_ROOT_USER or len(root[1]) < MIN_ROOT_PASSWORD:
        raise SystemExit(f"the root user must be at least {MIN_ROOT_USER} characters and the password at least "
                         f"{MIN_ROOT_PASSWORD} (as MinIO requires)")
    os.environ.setdefault("MOTO_ALLOW_NONEXISTENT_REGION", "true")
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import run_simple

    _bootstrap(root)
    # As PID 1 in a container, SIGTERM (docker stop) is ignored unless handled.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sys.exit(0))
    print(f"edgefleet S3 stand-in (moto, keys enforced, data in memory) on {host or ALL_INTERFACES}:{port}", flush=True)
    run_simple(host or ALL_INTERFACES, port, _guarded(DomainDispatcherApplication(create_backend_app)), threaded=True,
               request_handler=MotoRequestHandler)


def _read_secret(file: str | None, value: str | None, what: str) -> str:
    if file:
        return Path(file).read_text().strip()
    if value:
        return value
    raise SystemExit(f"no {what}: give MINIO_{what}_FILE or MINIO_{what}")


def _address(text: str) -> tuple[str, int]:
    """MinIO's --address form, [host]:port."""
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def _ready(alias: str) -> int:
    """`mc ready ALIAS` as the compose health check runs it: 0 once /minio/health/ready answers 200.
    The alias's URL comes from MC_HOST_<alias> (mc's own variable), else http://127.0.0.1:9000."""
    url = urllib.parse.urlsplit(os.environ.get(f"MC_HOST_{alias}", f"http://127.0.0.1:{MINIO_PORT}"))
    base = f"{url.scheme}://{url.hostname}:{url.port or MINIO_PORT}"
    try:
        # The URL is mc's own MC_HOST_<alias> (an http(s) endpoint the operator sets) or our default above.
        with urllib.request.urlopen(f"{base}/minio/health/ready", timeout=3) as response:  # noqa: S310 the operator's mc URL
            ok = response.status == 200
    except (urllib.error.URLError, OSError):
        ok = False
    print(f"The cluster '{alias}' is {'ready' if ok else 'not ready'}", file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgefleet.s3server", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    ours = commands.add_parser("serve", help="The enforcing stand-in, root pair from files.")
    ours.add_argument("--host", default="127.0.0.1")
    ours.add_argument("--port", type=int, default=MINIO_PORT)
    ours.add_argument("--root-user-file", required=True)
    ours.add_argument("--root-password-file", required=True)
    ours.add_argument("--data", help="Accepted for symmetry with MinIO and unused: the data lives in memory.")
    minio = commands.add_parser("server",
                                help="MinIO's command line: server DIR [--address :9000] [--console-address :9001].")
    minio.add_argument("data", nargs="+", help="Accepted and unused: the data lives in memory.")
    minio.add_argument("--address", default=os.environ.get("MINIO_ADDRESS", f":{MINIO_PORT}"))
    minio.add_argument("--console-address", help="Accepted and unused: there is no console.")
    mc = commands.add_parser("mc", help="`mc ready ALIAS`, the health check compose runs against MinIO.")
    mc.add_argument("verb", choices=["ready"])
    mc.add_argument("alias")
    args = parser.parse_args(argv)
    if args.command == "mc":
        return _ready(args.alias)
    if args.command == "serve":
        root = (Path(args.root_user_file).read_text().strip(), Path(args.root_password_file).read_text().strip())
        serve(args.host, args.port, root)
        return 0
    env = os.environ
    root = (_read_secret(env.get("MINIO_ROOT_USER_FILE"), env.get("MINIO_ROOT_USER"), "ROOT_USER"),
            _read_secret(env.get("MINIO_ROOT_PASSWORD_FILE"), env.get("MINIO_ROOT_PASSWORD"), "ROOT_PASSWORD"))
    serve(*_address(args.address), root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
