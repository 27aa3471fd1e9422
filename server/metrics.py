"""``/metrics``: the server's counters in the Prometheus text format, through prometheus_client.

The figures live where they are kept (the service's in-process counters, the store's totals
and commit statistics, the trainer's status), so a custom collector reads them at each scrape
instead of mirroring every update into client-library metrics. Each server process has its
own registry (no global state between apps in one process, as the tests run several), with
the standard process metrics (``process_resident_memory_bytes``, CPU seconds, open fds) beside.
Counters are per process and reset on restart, like any Prometheus counter; with several
ingest workers each one reports its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from fedmobillm.server.service import Service

__all__ = ["CONTENT_TYPE_LATEST", "ServerCollector", "metrics_registry", "render"]

P = "fedmobillm_"


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(P + name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(P + name, doc, value=value)


class ServerCollector(Collector):
    """Reads the service and the trainer (``get_trainer()``: None when this process trains
    nothing) at every scrape."""

    def __init__(self, service: Service, get_trainer: Any) -> None:
        self.service = service
        self.get_trainer = get_trainer

    def collect(self) -> Iterator[Metric]:
        s = self.service
        c = s.counters
        totals = s.store.totals()
        writes = s.store.write_stats.snapshot()
        with c.lock:
            acked_batches, acked_samples = c.acked_batches, c.acked_samples
            duplicates, skipped, ingest_bytes = (
                c.duplicate_batches,
                c.skipped_samples,
                c.ingest_bytes,
            )
            conflicts, offences, rejected = c.conflicts, c.offences, dict(c.rejected)
        yield _counter(
            "acked_batches", "Upload batches acknowledged (stored durably).", acked_batches
        )
        yield _counter("acked_samples", "Samples acknowledged.", acked_samples)
        yield _counter(
            "duplicate_batches",
            "Re-sent batches answered from the store (idempotency).",
            duplicates,
        )
        yield _counter(
            "skipped_samples", "Samples of acknowledged batches already stored.", skipped
        )
        yield _counter("ingest_bytes", "Request bytes of acknowledged uploads.", ingest_bytes)
        yield _counter(
            "conflict_requests", "409s: re-sent keys or sample ids with other content.", conflicts
        )
        yield _counter(
            "refused_values", "Uploads refused for values their bundle cannot produce.", offences
        )
        yield _counter("ingest_commits", "Store commits holding uploads.", writes["commits"])
        yield _counter(
            "ingest_committed_uploads", "Uploads held by those commits.", writes["writes"]
        )
        yield _gauge(
            "ingest_largest_group", "Most uploads one commit held since start.", writes["largest"]
        )
        yield _gauge("quarantined_devices", "Devices out of training.", len(s.store.quarantined()))
        rej = CounterMetricFamily(
            P + "rejected_requests", "Requests refused, by HTTP status.", labels=["status"]
        )
        for status, n in sorted(rejected.items()):
            rej.add_metric([str(status)], n)
        yield rej
        yield _gauge("devices", "Registered devices.", totals["devices"])
        yield _gauge("stored_samples", "Samples in the store.", totals["samples"])
        trainer = self.get_trainer()
        if trainer is None:
            return
        st = trainer.status()
        yield _gauge("trainer_step", "The trainer's step.", st.get("step", 0))
        yield _counter(
            "trainer_samples", "Samples the trainer has stepped on.", st.get("samples_seen", 0)
        )
        yield _counter(
            "trainer_skipped_steps",
            "Steps skipped (non-finite loss or gradient).",
            st.get("skipped_steps", 0),
        )
        yield _gauge(
            "trainer_weights_finite",
            "1 while every weight of the shared model is finite.",
            int(bool(st.get("weights_finite", True))),
        )
        yield _counter(
            "trainer_dropped_samples",
            "Samples the trainer dropped (revoked or quarantined devices).",
            sum(st.get("dropped_samples", {}).values()),
        )
        if st.get("loss") is not None:
            yield _gauge("trainer_loss", "The trainer's last training loss.", st["loss"])


def metrics_registry(service: Service, get_trainer: Any) -> CollectorRegistry:
    """A registry of its own for one server app: its collector and the process metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServerCollector(service, get_trainer))
    ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The registry in the Prometheus text exposition format (``CONTENT_TYPE_LATEST``)."""
    return generate_latest(registry)
