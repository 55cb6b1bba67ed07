"""The sync service: applies model updates from the cloud registry: verify, install, canary, roll back."""
