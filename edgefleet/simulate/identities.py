"""The simulated devices' identities: a certificate from the fleet's CA for each device id."""

from __future__ import annotations

from pathlib import Path

from edgefleet.certs import issue_device


def ensure_certificates(certs: Path, devices: list[str]) -> int:
    """Issues <device>.crt/.key in `certs` (with the CA key there) for each device that has none.

    :returns: how many were issued.
    :raises ValueError: a device id that is not one (or is reserved for the fleet's services).
    :raises FileNotFoundError: no CA (ca.crt, ca.key) in `certs` while a certificate is missing.
    """
    missing = [d for d in devices if not (certs / f"{d}.crt").exists() or not (certs / f"{d}.key").exists()]
    for device in missing:
        issue_device(certs, device)
    return len(missing)
