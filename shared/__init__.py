"""What every edgefleet service shares: the wire format, the topic scheme, the MQTT link, config."""

from importlib.metadata import PackageNotFoundError, version

try:
    VERSION = version("edgefleet")
except PackageNotFoundError:  # running from a source tree that was never installed
    VERSION = "0+unknown"
