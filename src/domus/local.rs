//! Sends to a taberna on this domus: the same checks and answers as a remote send, without
//! the network. The answer is awaited by the caller's [`Receipt`](super::Receipt) within the
//! send's timeout; no task is spawned per send.

use super::DomusInner;
use super::receipt::{LocalAnswer, Receipt, ReceiptKind};
use crate::reporting::Counter;
use crate::runtime::ends::BlobReceiver;
use crate::taberna::{AnswerTarget, MessageType, TabernaId, TabernaRequest};
use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

impl DomusInner {
    pub(super) fn send_local(
        self: &Arc<Self>,
        taberna: TabernaId,
        source: TabernaId,
        msg_type: MessageType,
        (payload, headers): (Bytes, crate::a1_callis::headers::Headers),
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
        )
        .with_headers(headers);
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
