"""cloud_ingest's Prometheus families (names in shared.metrics): batches by outcome and records stored,
read at scrape time from the counters the writers already keep, and the time one flush's S3 writes
take (a histogram, observed by the writer: a flush holds many batches, flush.py)."""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from shared import metrics
from shared.metrics import Counter


class Outcome(StrEnum):
    """What became of one batch taken off the broker (INGEST_BATCHES' `outcome` label)."""

    STORED = "stored"
    # Sent again (its ack lost or late) while this replica still held or remembered it: acknowledged, not written.
    DUPLICATE = "duplicate"
    DEAD_LETTERED = "dead_lettered"
    FAILED = "failed"  # one failed attempt to write its flush (retried until it succeeds or the replica stops)
    REFUSED = "refused"  # on a reserved id's topic (shared.topics.reserved_id): no device's, nothing stored


class IngestCounters:
    """The counters one replica keeps (any writer thread bumps them)."""

    def __init__(self) -> None:
        self.batches = {outcome: Counter() for outcome in Outcome}
        self.records = Counter()  # records written (a batch acknowledged again without writing is not counted)

    def stored(self, batches: int, records: int) -> None:
        """Counts a flush written: its batches `stored`, its records."""
        self.batches[Outcome.STORED].add(batches)
        self.records.add(records)


class IngestCollector(Collector):
    """INGEST_BATCHES and INGEST_RECORDS from an IngestCounters, at scrape time."""

    def __init__(self, device: str, counters: IngestCounters) -> None:
        self.device, self.counters = device, counters

    def collect(self) -> Iterable[Metric]:
        batches = CounterMetricFamily(metrics.INGEST_BATCHES, "Batches taken off the broker, by what became of them "
                                      "(failed: one failed write attempt, retried).", labels=["outcome"])
        for outcome, counter in self.counters.batches.items():
            batches.add_metric([outcome.value], counter.value)
        yield metrics.labelled(batches, self.device)
        yield metrics.labelled(CounterMetricFamily(metrics.INGEST_RECORDS, "Telemetry records written to S3.",
                                                   value=self.counters.records.value), self.device)


def write_seconds(device: str, registry: CollectorRegistry) -> Histogram:
    """INGEST_WRITE_SECONDS, registered in `registry`, with its device label set: observe() one flush's writes."""
    histogram = Histogram(metrics.INGEST_WRITE_SECONDS, "Time to write one flush's objects and index to S3.",
                          [metrics.DEVICE_LABEL], buckets=metrics.LATENCY_BUCKETS_S, registry=registry)
    return histogram.labels(device)
