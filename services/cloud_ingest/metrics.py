"""cloud_ingest's Prometheus families (names in shared.metrics): batches by outcome and records stored,
read at scrape time from the counters the writers already keep, and the time one batch's S3 writes
take (a histogram, observed by the writer)."""

from __future__ import annotations

import threading
from collections import OrderedDict
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
    DUPLICATE = "duplicate"  # stored again: this replica had stored the same batch id before (its ack lost or late)
    DEAD_LETTERED = "dead_lettered"
    FAILED = "failed"  # one failed attempt to write it (retried until it succeeds or the replica stops)
    REFUSED = "refused"  # on a reserved id's topic (shared.topics.reserved_id): no device's, nothing stored


# Batch ids remembered to tell a batch sent again from a new one: a device resends only its batch in
# flight, so the last few thousand cover every device of a fleet many times over.
RECENT_BATCHES = 10_000


class IngestCounters:
    """The counters one replica keeps (any writer thread bumps them)."""

    def __init__(self) -> None:
        self.batches = {outcome: Counter() for outcome in Outcome}
        self.records = Counter()  # records stored, a batch sent again counted again
        self._recent: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def stored(self, batch_id: str, records: int) -> None:
        """Counts one batch written: `duplicate` if this replica stored the same id recently, else `stored`."""
        with self._lock:
            again = batch_id in self._recent
            self._recent[batch_id] = None
            self._recent.move_to_end(batch_id)
            if len(self._recent) > RECENT_BATCHES:
                self._recent.popitem(last=False)
        self.batches[Outcome.DUPLICATE if again else Outcome.STORED].add()
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
    """INGEST_WRITE_SECONDS, registered in `registry`, with its device label set: observe() one batch's writes."""
    histogram = Histogram(metrics.INGEST_WRITE_SECONDS, "Time to write one batch's objects and index to S3.",
                          [metrics.DEVICE_LABEL], buckets=metrics.LATENCY_BUCKETS_S, registry=registry)
    return histogram.labels(device)
