"""The `edgefleet` command: runs the services, and the operator's and developer's tools beside them
(model build, camera simulator, the local stack, benchmarks)."""
