"""What a local run (`edgefleet fleet`, `edgefleet up`) hands the operator's shell: a registry that
already holds the model its devices serve (so `model publish` takes the next version and `rollout start`
finds what it names), and the settings to reach it in a file to `source`, instead of a title full of
environment variables."""

from __future__ import annotations

import shlex
from pathlib import Path

from edgefleet.publish import Published, publish
from shared import s3
from shared.atomic import write_atomic
from shared.config import DEFAULT_KEY_DIR, DEFAULT_MODEL_DIR, ENV_PREFIX, StoreSettings, environment, flat_values
from shared.manifest import load_verified

OPERATOR_ENV = "operator.env"


def seed_registry(settings: StoreSettings) -> Published:
    """Publishes the model the devices serve (their seed, as the version its manifest says), signed with
    the operator key, so the registry holds what the devices run and the next publish takes the next version.

    :param settings: the S3 store and its registry bucket.
    :returns: what was published (name, version).
    :raises PublishRefused, ModelError: the seed model is not publishable (see edgefleet.publish.publish).
    """
    manifest, _ = load_verified(DEFAULT_MODEL_DIR)
    return publish(s3.client(settings), settings.registry_bucket, DEFAULT_MODEL_DIR, DEFAULT_KEY_DIR / "operator.key",
                   version=manifest.version)


def write_operator_env(path: Path, settings: StoreSettings, keys_dir: Path) -> dict[str, str]:
    """Writes the operator's environment for this run as `export K=V` lines (shell-quoted), mode 0600
    (it holds the S3 secret): the broker and the operator's certificate where there is one, the S3 store
    and its buckets, and the keys a rollout's signature is checked against.

    :param path: the file (its folder is made if missing).
    :param settings: the broker and S3 settings to write.
    :param keys_dir: EDGEFLEET_TRUSTED_KEYS_DIR, written as an absolute path.
    :returns: the variables written.
    """
    env = environment(settings) | {f"{ENV_PREFIX}{name.upper()}": str(value)
                                   for name, value in flat_values(settings).items() if name.endswith("_bucket")}
    env[f"{ENV_PREFIX}TRUSTED_KEYS_DIR"] = str(keys_dir.resolve())
    text = "# edgefleet: the operator's settings for this run (`source` this file in another terminal)\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    # 0600 from the start: the file is never readable by others, not even before a chmod.
    write_atomic(path, (text + "".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(env.items()))).encode(),
                 mode=0o600)
    return env
