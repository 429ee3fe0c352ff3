"""Optional OpenTelemetry tracing of the request path: gateway -> workers.

Off by default (spans are then OpenTelemetry's no-op spans: no cost beyond a call). On when a
process gets an OTLP endpoint: spans go in batches to that collector over OTLP/gRPC. The trace
context crosses process boundaries as W3C `traceparent` gRPC metadata
(services/grpc_context.py), so one trace shows the gateway's request, its Prefill and Generate
calls, and the workers' handling of them.

The provider is this module's, not OpenTelemetry's global one: a process (or a test) can set it
up more than once, and libraries that use the global provider are unaffected.
"""

from __future__ import annotations

from typing import Any, Mapping, MutableMapping

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

INSTRUMENTATION = "splitserve"

_provider: TracerProvider | None = None


class TracingConfig(BaseSettings):
    """OpenTelemetry tracing of one process; read from SPLITSERVE_TRACING_* (the endpoint also
    from OpenTelemetry's own OTEL_EXPORTER_OTLP_TRACES_ENDPOINT / OTEL_EXPORTER_OTLP_ENDPOINT)."""

    model_config = SettingsConfigDict(env_prefix="SPLITSERVE_TRACING_", populate_by_name=True)

    otlp_endpoint: str | None = Field(None, validation_alias=AliasChoices(
        "otlp_endpoint", "SPLITSERVE_TRACING_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT"), description=(
        "OTLP/gRPC collector, e.g. http://otel-collector:4317; None: tracing off"))
    sample_ratio: float = Field(1.0, ge=0.0, le=1.0, description=(
        "fraction of new traces recorded (requests that arrive with a trace follow its decision)"))
    insecure: bool = Field(True, description="plain-text gRPC to the collector (no TLS)")


def setup(cfg: TracingConfig, service_name: str, exporter: SpanExporter | None = None,
          **attributes: Any) -> bool:
    """Start tracing for this process if `cfg` asks for it or an `exporter` is given (tests:
    InMemorySpanExporter, exported synchronously). Returns whether tracing is on."""
    global _provider
    if exporter is None and not cfg.otlp_endpoint:
        return False
    provider = TracerProvider(
        resource=Resource.create({"service.name": service_name, **attributes}),
        sampler=ParentBased(TraceIdRatioBased(cfg.sample_ratio)))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(
            OTLPSpanExporter(endpoint=cfg.otlp_endpoint, insecure=cfg.insecure)))
    shutdown()
    _provider = provider
    return True


def shutdown() -> None:
    """Flush and stop tracing (spans become no-ops again)."""
    global _provider
    if _provider is not None:
        _provider.shutdown()
        _provider = None


def enabled() -> bool:
    return _provider is not None


def tracer() -> trace.Tracer:
    """The tracer to start spans with (a no-op tracer while tracing is off)."""
    if _provider is None:
        return trace.NoOpTracer()
    return _provider.get_tracer(INSTRUMENTATION)


def inject(carrier: MutableMapping[str, str], span: trace.Span | None = None) -> None:
    """Add the trace context of `span` (default: the current one) to `carrier` as W3C
    traceparent/tracestate."""
    if _provider is not None:
        propagate.inject(carrier, context=trace.set_span_in_context(span) if span else None)


def extract(carrier: Mapping[str, str]) -> Context | None:
    """The trace context a caller sent, if any."""
    if _provider is None:
        return None
    return propagate.extract(carrier)
