//! The crate's spans and the trace context messages carry: the delivery span every request
//! gets, and — with the `otel` feature — the bridge between a message's [`TraceContext`]
//! and OpenTelemetry's, so a delivery continues the trace its send was made in.
//!
//! Every span here is at debug level and built with `tracing`'s macros, which evaluate no
//! field and allocate nothing when no subscriber wants the span. Without the `otel` feature
//! the bridge is absent and a message carries only the trace context its sender set by
//! hand. This module must not decide anything about delivery: it only names and links spans.

use crate::a1_callis::headers::Headers;
#[cfg(feature = "otel")]
use crate::a1_callis::headers::TRACEPARENT;

/// The span of one delivery, from its arrival to its answer: a child of the peer's driver
/// span, and — with `otel`, when the message carried a trace context — of the sender's span.
#[inline]
pub(crate) fn delivery_span(
    taberna: u64,
    msg_type: u32,
    peer: &crate::a0_transport::DomusId,
    headers: &Headers,
) -> tracing::Span {
    let span = tracing::debug_span!(
        "vicus.deliver",
        taberna,
        msg_type,
        peer = %peer,
        answer = tracing::field::Empty,
    );
    continue_trace(&span, headers);
    span
}

/// Makes `span` continue the trace `headers` carry (feature `otel`; otherwise nothing).
#[cfg_attr(not(feature = "otel"), allow(unused_variables))]
#[inline]
pub(crate) fn continue_trace(span: &tracing::Span, headers: &Headers) {
    #[cfg(feature = "otel")]
    if !span.is_disabled()
        && let Some(context) = headers.trace_context()
    {
        crate::otel::set_parent(span, context);
    }
}

/// Adds the current span's trace context to `headers` unless they carry one already
/// (feature `otel`; otherwise nothing): the receiver's delivery span then continues it.
#[cfg_attr(not(feature = "otel"), allow(unused_variables))]
pub(crate) fn attach_current_trace(headers: &mut Headers) {
    #[cfg(feature = "otel")]
    if headers.get(TRACEPARENT).is_none()
        && let Some(context) = crate::otel::context_of(&tracing::Span::current())
    {
        let _ = headers.set_trace_context(context);
    }
}
