"""The telemetry service: drift, resources, store-and-forward to the cloud (the telemetry issue)."""
