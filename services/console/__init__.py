"""The fleet console: a web page of the fleet's state (the fleet broker's retained statuses, sync states and
rollouts) and of each device's drift and latency over time (the S3 telemetry), updated live."""
