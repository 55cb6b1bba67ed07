"""The telemetry service: drift, resources, store-and-forward to the cloud and hard examples."""
