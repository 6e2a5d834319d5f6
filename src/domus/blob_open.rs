//! Opening a blob stream to a taberna on a peer: a stream slot and the sending budget are
//! taken first, the opening message goes through the peer's session like any message, and the
//! stream is handed to the peer's blob driver; a driver that retired as the open started is
//! looked up again (a bounded number of times).

use super::DomusInner;
use super::peers::PeerRef;
use super::receipt::{Receipt, ReceiptKind};
use super::send::{SendOptions, Wait};
use crate::a0_transport::DomusId;
use crate::error::{Error, ErrorId};
use crate::runtime::completion::Completion;
use crate::runtime::domus_closed;
use crate::runtime::ends as blob;
use crate::runtime::ends::BlobCommand;
use crate::runtime::ends::{BlobReceiver, BlobSender};
use crate::runtime::peer::{Handover, SendCmd};
use crate::taberna::{MessageClass, MessageType, TabernaId};
use bytes::Bytes;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// What a blob's opening message says, and until when it may be sent.
pub(super) struct BlobOpen<'a> {
    pub(super) taberna: TabernaId,
    pub(super) source: TabernaId,
    pub(super) msg_type: MessageType,
    pub(super) header: &'a Bytes,
    pub(super) headers: crate::a1_callis::headers::Headers,
    pub(super) deadline: tokio::time::Instant,
    /// The stream's window and chunk length (`blob_window`, `blob_chunk_len`).
    pub(super) window: usize,
    pub(super) chunk: usize,
}

/// How often a blob open looks its peer up again after finding the peer's drivers retired.
pub(super) const BLOB_OPEN_RETIRED_RETRIES: u32 = 3;

/// Cancels a blob stream whose opening did not complete (failed, or its future was dropped).
pub(super) struct CancelOnDrop {
    pub(super) tx: Option<mpsc::UnboundedSender<BlobCommand>>,
    pub(super) stream: u64,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(BlobCommand::Cancel {
                stream: self.stream,
                reason: "the blob's opening message failed".to_owned(),
            });
        }
    }
}

impl DomusInner {
    /// Opens a blob stream: checks, routing, the stream's reservation, then the opening
    /// message; returns the sender once the receiving handler accepted it.
    pub(super) async fn send_blob(
        self: &Arc<Self>,
        taberna: TabernaId,
        msg_type: MessageType,
        header: Bytes,
        options: SendOptions,
    ) -> Result<BlobSender, Error> {
        self.check_open()?;
        if msg_type.class() != MessageClass::A3 {
            return Err(Error::new(
                ErrorId::InvalidMessageType,
                format!(
                    "message type {:#x} is not an application (A3) type; use MessageType::app(n)",
                    msg_type.0
                ),
            ));
        }
        let max_header = blob::max_blob_header(self.config.load().max_message_len);
        if header.len() > max_header {
            return Err(Error::new(
                ErrorId::PayloadTooLarge,
                format!(
                    "a blob header of {} bytes exceeds {max_header} (max_message_len minus {}); put it in the blob",
                    header.len(),
                    blob::BLOB_OPEN_OVERHEAD
                ),
            ));
        }
        let (timeout, deadline) = options.deadline(self.config.load().send_timeout)?;
        let headers = super::send::checked_headers(
            &self.config.load(),
            &options,
            header.len().saturating_add(blob::BLOB_OPEN_OVERHEAD),
        )?;
        let source = options.source.unwrap_or(TabernaId(0));
        let window = self.config.load().blob_window;
        let chunk = self.config.load().blob_chunk_len;
        if self.registry.contains(taberna) {
            let (piece_tx, piece_rx) = mpsc::unbounded_channel();
            let (eof_tx, eof_rx) = oneshot::channel();
            let sender = blob::SenderShared::new(window);
            let receiver = BlobReceiver::local(piece_rx, sender.clone(), eof_tx);
            self.send_local(
                taberna,
                source,
                msg_type,
                (header, headers),
                timeout,
                Some(receiver),
            )
            .await?;
            return Ok(BlobSender::local(sender, piece_tx, eof_rx, chunk));
        }
        // The stream and its opening message must reach one incarnation of the peer's
        // drivers: a driver pair that retired (the peer forgotten while idle) just as this
        // send found it takes neither, and the open starts again with the new pair.
        let mut attempts = 0u32;
        loop {
            let (peer_id, peer) = self.route_to_peer(taberna, deadline).await?;
            let open = BlobOpen {
                taberna,
                source,
                msg_type,
                header: &header,
                headers: headers.clone(),
                deadline,
                window,
                chunk,
            };
            match self.open_blob_on(&peer, &peer_id, open).await? {
                Some(sender) => return Ok(sender),
                None if attempts < BLOB_OPEN_RETIRED_RETRIES => {
                    self.check_open()?;
                    attempts += 1;
                }
                None => return Err(domus_closed()),
            }
        }
    }

    /// Opens a blob stream on one peer's drivers; `None` when they retired before taking the
    /// opening message (nothing was sent; the caller looks the peer up again).
    pub(super) async fn open_blob_on(
        self: &Arc<Self>,
        peer: &Arc<PeerRef>,
        peer_id: &DomusId,
        BlobOpen {
            taberna,
            source,
            msg_type,
            header,
            headers,
            deadline,
            window,
            chunk,
        }: BlobOpen<'_>,
    ) -> Result<Option<BlobSender>, Error> {
        let full = |what: &str| {
            Error::new(
                ErrorId::BlobBufferFull,
                format!("no blob stream to {peer_id} can open now: {what}"),
            )
        };
        let slot = peer
            .blob_out_streams
            .clone()
            .try_acquire_owned()
            .map_err(|_| full("max_blob_streams_per_peer streams are open"))?;
        let bytes = self
            .blob_out_budget
            .clone()
            .try_acquire_many_owned(u32::try_from(window).unwrap_or(u32::MAX))
            .map_err(|_| full("blob_outbound_budget is used up"))?;
        let n = peer
            .next_stream
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (stream, msg) = blob::outbound_opening(
            &self.local_id,
            peer_id,
            n,
            (taberna.0, source.0),
            msg_type.0,
            (header, headers),
            deadline.into_std(),
        );
        let sender = blob::SenderShared::new(window);
        let opened = peer.blob_tx.send(BlobCommand::OpenOutbound {
            stream,
            sender: sender.clone(),
            reservation: blob::Reservation {
                _stream: Some(slot),
                _bytes: Some(bytes),
            },
        });
        if opened.is_err() {
            // The blob driver retired (or the domus closed: the caller finds out).
            return Ok(None);
        }
        // From here until the sender exists, a failure (or the caller dropping this future)
        // cancels the stream.
        let mut guard = CancelOnDrop {
            tx: Some(peer.blob_tx.clone()),
            stream,
        };
        let msg = crate::runtime::peer::QueuedSend::from(msg);
        let permit = self
            .room_for(peer, peer_id, &msg, Wait::UntilDeadline, deadline)
            .await?;
        // Not `hand_over`: its fallback would give the message to a new driver while the
        // stream sits with the old blob driver. The blob driver only retires when told by
        // this peer driver, after the OpenOutbound above: so when the message is taken, the
        // stream is too.
        let (done, rx) = Completion::oneshot();
        if peer
            .sends
            .push(Handover::One(SendCmd { msg, done, permit }))
            .is_err()
        {
            return Ok(None);
        }
        Receipt {
            kind: ReceiptKind::Remote(rx),
        }
        .await?;
        guard.tx = None;
        Ok(Some(BlobSender::remote(
            sender,
            peer.blob_tx.clone(),
            stream,
            chunk,
        )))
    }
}
