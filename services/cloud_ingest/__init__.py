"""The cloud ingest service: validates, batches and writes telemetry to S3 (the telemetry issue)."""
