"""Which simulated devices lose their link in a run (--cut-share), the same ones on every run."""

from __future__ import annotations

import hashlib
import math


def cut_devices(devices: list[str], share: float) -> list[str]:
    """The ceil(share * N) devices whose link is cut, chosen by a stable hash of the id (the same ones
    on every run, and independent of which process simulates which device).

    :param devices: every device id of the fleet (or of one process: the choice is per id).
    :param float share: 0 to 1.
    :returns: the chosen ids, in hash order.
    """
    count = min(len(devices), math.ceil(share * len(devices) - 1e-9)) if share > 0 else 0
    return sorted(devices, key=lambda d: hashlib.sha256(d.encode()).digest())[:count]
