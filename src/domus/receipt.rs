//! [`Receipt`]: what an admitted send gives its caller to await — the peer driver's answer
//! through a completion, or a local taberna's answer within the send's timeout
//! ([`LocalAnswer`]). Nothing here sends or decides: it only waits and counts a local
//! send's outcome as it resolves.

use crate::error::{Error, ErrorId};
use crate::reporting::{Counter, Recorder};
use crate::runtime::completion::SingleSlot;
use crate::runtime::peer::record_failure;
use crate::runtime::{Answer, Delivery, Outcome, local_answer_result};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::oneshot;

/// An admitted send: await it for the outcome. Holding many receipts is how one task keeps
/// thousands of sends in flight.
pub struct Receipt {
    pub(super) kind: ReceiptKind,
}

pub(super) enum ReceiptKind {
    /// The peer's driver completes it.
    Remote(oneshot::Receiver<Outcome>),
    /// The peer's driver completes it, through a pooled slot (the steady path).
    Slot(SingleSlot),
    /// A taberna on this domus answers it, within the send's timeout (kept here: no task
    /// waits for a local answer).
    Local(Box<LocalAnswer>),
}

impl std::fmt::Debug for Receipt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.kind {
            ReceiptKind::Remote(_) | ReceiptKind::Slot(_) => "remote",
            ReceiptKind::Local(_) => "local",
        };
        f.debug_struct("Receipt").field("to", &kind).finish()
    }
}

impl Future for Receipt {
    type Output = Outcome;

    /// A local send is counted (accepted, replied, failed) when its receipt resolves.
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.kind {
            ReceiptKind::Remote(rx) => Pin::new(rx).poll(cx).map(|r| {
                r.unwrap_or_else(|_| {
                    Err(Error::new(
                        ErrorId::DomusClosed,
                        "the domus was shut down before the send finished",
                    ))
                })
            }),
            ReceiptKind::Slot(slot) => slot.poll(cx),
            ReceiptKind::Local(local) => local.poll(cx),
        }
    }
}

/// A local send waiting for its taberna's answer.
pub(super) struct LocalAnswer {
    pub(super) answer: oneshot::Receiver<Answer>,
    pub(super) deadline: Pin<Box<tokio::time::Sleep>>,
    pub(super) timeout: Duration,
    pub(super) context: String,
    pub(super) max_reply: usize,
    pub(super) recorder: Arc<Recorder>,
}

impl LocalAnswer {
    pub(super) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Outcome> {
        let context = &self.context;
        let result = match Pin::new(&mut self.answer).poll(cx) {
            Poll::Ready(Ok(answer)) => local_answer_result(answer, self.max_reply, context),
            Poll::Ready(Err(_)) => Err(Error::new(
                ErrorId::RequestDropped,
                format!("{context} dropped the request"),
            )),
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Err(Error::new(
                    ErrorId::SendTimeout,
                    format!("{context} did not answer within {:?}", self.timeout),
                )),
                Poll::Pending => return Poll::Pending,
            },
        };
        match &result {
            Ok(Delivery::Accepted) => self.recorder.inc(Counter::messages_accepted),
            Ok(Delivery::Replied(_)) => self.recorder.inc(Counter::messages_replied),
            Err(e) => record_failure(&self.recorder, e),
        }
        Poll::Ready(result)
    }
}
