"""The sync service: applies model updates from the cloud registry (the model-delivery issue)."""
