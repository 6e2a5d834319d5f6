//! Feature `otel`: vicus's spans in OpenTelemetry traces that cross the mesh.
//!
//! With a `tracing-opentelemetry` layer installed, a message carries the W3C trace context
//! (`traceparent`) of the span it was sent in — the `vicus.send` span of
//! [`Domus::send`](crate::Domus::send), or the caller's span for
//! [`Domus::admit`](crate::Domus::admit), windows and blob openings — and the receiving
//! domus's `vicus.deliver` span continues that trace: one trace id across every domus a
//! request passes through, each delivery a child of the send that caused it, a replayed
//! delivery (after a cut) in the same trace as the first try. A `traceparent` the sender set
//! by hand in [`SendOptions::headers`](crate::SendOptions::headers) wins over the span's.
//!
//! The core needs no OpenTelemetry: it carries a plain 26-byte
//! [`TraceContext`]. This module converts it both ways, for handlers that
//! propagate by hand (into an HTTP call, say). It must not install exporters or layers: the
//! application owns its pipeline.

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::TraceContext;

/// The trace context of `span` (its OpenTelemetry span's ids), or `None` when the span is
/// disabled, no OpenTelemetry layer sees it, or its context is invalid.
pub fn context_of(span: &tracing::Span) -> Option<TraceContext> {
    if span.is_disabled() {
        return None;
    }
    from_otel(&span.context())
}

/// The trace context an OpenTelemetry context's span carries, when it is valid.
pub fn from_otel(cx: &opentelemetry::Context) -> Option<TraceContext> {
    let span = cx.span();
    let sc = span.span_context();
    if !sc.is_valid() {
        return None;
    }
    TraceContext::new(
        sc.trace_id().to_bytes(),
        sc.span_id().to_bytes(),
        sc.trace_flags().to_u8(),
    )
}

/// An OpenTelemetry context whose (remote) span is `context`: the parent to give a span that
/// continues it.
pub fn to_otel(context: TraceContext) -> opentelemetry::Context {
    let sc = SpanContext::new(
        TraceId::from_bytes(context.trace_id),
        SpanId::from_bytes(context.span_id),
        TraceFlags::new(context.flags),
        true,
        TraceState::default(),
    );
    opentelemetry::Context::new().with_remote_span_context(sc)
}

/// Makes `span` (just created, not yet entered) a child of `context`.
pub(crate) fn set_parent(span: &tracing::Span, context: TraceContext) {
    // Fails only when no OpenTelemetry layer sees the span: then there is nothing to link.
    let _ = span.set_parent(to_otel(context));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contexts_convert_both_ways() {
        let c = TraceContext::new([7; 16], [9; 8], 1).unwrap();
        assert_eq!(from_otel(&to_otel(c)), Some(c));
        assert_eq!(from_otel(&opentelemetry::Context::new()), None);
        assert_eq!(context_of(&tracing::Span::none()), None);
    }
}
