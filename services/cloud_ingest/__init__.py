"""The cloud ingest service: validates, batches and writes telemetry to S3, acknowledging only what S3 holds."""
