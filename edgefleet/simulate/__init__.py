"""Simulated devices that speak the real protocol on the fleet broker (`edgefleet simulate`): many per
process on one asyncio loop, each with its own certificate, session, model store, rollout state machine
and telemetry outbox; only inference is skipped (fleet.py owns a process, device.py is one device)."""
