//! Sends to a taberna on this domus: the same checks and answers as a remote send, without
//! the network. The answer is awaited by the caller's [`Receipt`](super::Receipt) within the
//! send's timeout; no task is spawned per send.

use super::DomusInner;
use super::send::Receipt;
use super::send::ReceiptKind;
use crate::error::{Error, ErrorId};
use crate::reporting::{Counter, Recorder};
use crate::runtime::ends::BlobReceiver;
use crate::runtime::peer::record_failure;
use crate::runtime::{Answer, local_answer_result};
use crate::runtime::{Delivery, Outcome};
use crate::taberna::{AnswerTarget, MessageType, TabernaId, TabernaRequest};
use bytes::Bytes;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::oneshot;

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

impl DomusInner {
    pub(super) fn send_local(
        self: &Arc<Self>,
        taberna: TabernaId,
        source: TabernaId,
        msg_type: MessageType,
        payload: Bytes,
        timeout: Duration,
        blob: Option<BlobReceiver>,
    ) -> Receipt {
        let (answer_tx, answer_rx) = oneshot::channel();
        let mut request = TabernaRequest::new(
            self.local_identity.clone(),
            source,
            taberna,
            msg_type,
            payload,
            AnswerTarget::Local(answer_tx),
        );
        if let Some(blob) = blob {
            request = request.with_blob(blob);
        }
        self.recorder.inc(Counter::messages_sent);
        self.registry.offer(request);
        Receipt {
            kind: ReceiptKind::Local(Box::new(LocalAnswer {
                answer: answer_rx,
                deadline: Box::pin(tokio::time::sleep(timeout)),
                timeout,
                context: format!("local {taberna}"),
                max_reply: self.config.load().max_message_len,
                recorder: self.recorder.clone(),
            })),
        }
    }
}
