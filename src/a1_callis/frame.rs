//! The A1 frame codec: bytes ⇄ [`Frame`]s, byte for byte as `docs/wire-protocol.md` says.
//!
//! Pure code: no tokio, no IO, no clock, no allocation beyond what a frame needs. Decoding
//! follows tokio-util's `Decoder` contract — `Ok(None)` means "need more bytes", `Err` means the
//! stream is corrupt and the callis must close — and checks every declared length against a
//! limit before anything is reserved. Payloads are zero-copy slices of the read buffer.
//!
//! Every frame is a 6-byte header — body length (`u32`), type (`u8`), flags (`u8`) — and a
//! body. Types `0x80..=0xBF` are reserved and skippable: a decoder that does not know one skips
//! it (the session counts it against its frame budget). Any other unknown type, and any flag bit
//! a type does not define, is a protocol violation.
//!
//! This file is over 900 lines: it is the one place every byte of A1 is written and read
//! (each frame's type, decoder and encoder side by side, about a third of it docs). The
//! batched frames (MESSAGE_BATCH, ACCEPTED runs, their LEB128 lengths and `BatchWriter`) are
//! the part that could move to a file of their own; they stay here for now so each encoder
//! sits beside its decoder.

use std::fmt;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::codes::WireCode;
use super::headers::Headers;

/// The wire protocol version carried in [`Hello`]. Version 2 added MESSAGE_BATCH and wrote
/// ACCEPTED as runs of ids; version 3 the headers extension of MESSAGE ([`FLAG_EXTENDED`]).
pub const PROTOCOL_VERSION: u16 = 3;

/// The one flag defined so far, on MESSAGE and REPLY: the body carries a headers extension
/// ([`Headers`]) between its fixed part and its payload.
pub const FLAG_EXTENDED: u8 = 0x01;

/// Length of the frame header: body length `u32`, type `u8`, flags `u8`.
pub const HEADER_LEN: usize = 6;

/// Fixed part of a MESSAGE body: id, destination, source, message type.
pub const MESSAGE_FIXED_LEN: usize = 8 + 8 + 8 + 4;

/// The smallest frame limit a HELLO may announce: a MESSAGE with an empty payload, the
/// largest of the frames vicus must always be able to write (a REPLY with an empty payload,
/// a REJECT without its reason and an ACCEPTED of one id are smaller). Every other frame is
/// cut to the limit the peer announced (T32): ACCEPTED carries fewer ids, a REJECT's reason
/// is shortened, a reply too long becomes a rejection.
pub const MIN_FRAME_LEN: u32 = MESSAGE_FIXED_LEN as u32;

/// One run in an ACCEPTED body: the first id (`u64`) and how many more follow it (`u32`).
pub const ACCEPTED_RUN_LEN: usize = 8 + 4;

/// Longest reason text in CLOSE and REJECT frames, in bytes.
pub const MAX_REASON_LEN: usize = 256;

/// Longest [`DomusId`](crate::DomusId) text in a HELLO.
const MAX_HELLO_ID_LEN: usize = crate::a0_transport::DOMUS_ID_MAX_LEN;

/// Fixed part of a HELLO body: version, epoch, max frame length, window, id length.
const HELLO_FIXED_LEN: usize = 2 + 8 + 4 + 4 + 2;
/// Longest HELLO body.
const HELLO_MAX_LEN: u32 = (HELLO_FIXED_LEN + MAX_HELLO_ID_LEN) as u32;
/// Fixed part of a CLOSE body: code, reason length.
const CLOSE_FIXED_LEN: usize = 4 + 2;
/// Longest CLOSE body.
const CLOSE_MAX_LEN: u32 = (CLOSE_FIXED_LEN + MAX_REASON_LEN) as u32;
/// Fixed part of a BLOB_CANCEL body: stream, code, reason length.
const BLOB_CANCEL_FIXED_LEN: usize = 8 + 4 + 2;
/// Longest BLOB_CANCEL body.
const BLOB_CANCEL_MAX_LEN: u32 = (BLOB_CANCEL_FIXED_LEN + MAX_REASON_LEN) as u32;
/// A BLOB_HELLO body: version, epoch, largest chunk accepted.
const BLOB_HELLO_LEN: u32 = 2 + 8 + 4;
/// Fixed part of a BLOB_DATA body: stream, offset.
pub const BLOB_DATA_FIXED_LEN: usize = 8 + 8;
/// Fixed part of a REJECT body: id, error, code, reason length.
/// The fixed part of a REJECT body (id, error, code, reason length).
pub const REJECT_FIXED_LEN: usize = 8 + 4 + 4 + 2;

/// A frame type: an open set of named constants.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrameType(pub u8);

impl FrameType {
    /// First frame on a callis, both directions: version, identity, epoch, limits.
    pub const HELLO: Self = Self(0x01);
    /// Keepalive probe; the peer answers with PONG carrying the same nonce.
    pub const PING: Self = Self(0x02);
    /// Answer to PING.
    pub const PONG: Self = Self(0x03);
    /// The sender closes the callis, with a reason code and text.
    pub const CLOSE: Self = Self(0x04);
    /// An application or service message to a taberna.
    pub const MESSAGE: Self = Self(0x10);
    /// Batched acceptance of messages: runs of consecutive ids.
    pub const ACCEPTED: Self = Self(0x11);
    /// A reply (with payload) to one message.
    pub const REPLY: Self = Self(0x12);
    /// A rejection of one message, with error id, application code and reason.
    pub const REJECT: Self = Self(0x13);
    /// Messages with consecutive ids to one taberna, from one taberna, of one type, under
    /// one header: each a length and a payload.
    pub const MESSAGE_BATCH: Self = Self(0x14);
    /// Blob callis: bytes of a blob stream at an offset.
    pub const BLOB_DATA: Self = Self(0x20);
    /// Blob callis: the sender has written everything; the total length.
    pub const BLOB_END: Self = Self(0x21);
    /// Blob callis: what the receiver has received, and how far the sender may write.
    pub const BLOB_CREDIT: Self = Self(0x22);
    /// Blob callis: either side abandons a stream, with a reason code and text.
    pub const BLOB_CANCEL: Self = Self(0x23);
    /// Blob callis: first frame, both directions: version, epoch, largest chunk accepted.
    pub const BLOB_HELLO: Self = Self(0x24);
    /// The sender is done with every message below an id — it holds their answers or gave
    /// up on them — and will never send them again: the receiver may forget them (its dedupe
    /// state then follows what is in flight). In the skippable range, so a peer that does not
    /// know it ignores it and keeps its whole window.
    pub const DONE_BELOW: Self = Self(0x80);

    /// Whether this type lies in the reserved, skippable range `0x80..=0xBF`.
    pub const fn is_skippable(self) -> bool {
        self.0 >= 0x80 && self.0 <= 0xBF
    }

    fn name(self) -> Option<&'static str> {
        Some(match self {
            Self::HELLO => "HELLO",
            Self::PING => "PING",
            Self::PONG => "PONG",
            Self::CLOSE => "CLOSE",
            Self::MESSAGE => "MESSAGE",
            Self::ACCEPTED => "ACCEPTED",
            Self::REPLY => "REPLY",
            Self::REJECT => "REJECT",
            Self::MESSAGE_BATCH => "MESSAGE_BATCH",
            Self::BLOB_DATA => "BLOB_DATA",
            Self::BLOB_END => "BLOB_END",
            Self::BLOB_CREDIT => "BLOB_CREDIT",
            Self::BLOB_CANCEL => "BLOB_CANCEL",
            Self::BLOB_HELLO => "BLOB_HELLO",
            Self::DONE_BELOW => "DONE_BELOW",
            _ => return None,
        })
    }
}

impl fmt::Debug for FrameType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => f.write_str(name),
            None => write!(f, "FrameType({:#04x})", self.0),
        }
    }
}

/// The HELLO frame: what a side says about itself when a callis opens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Protocol version ([`PROTOCOL_VERSION`]).
    pub version: u16,
    /// Random per-domus-run epoch; a changed epoch means the peer restarted.
    pub epoch: u64,
    /// The longest frame body the sender accepts.
    pub max_frame_len: u32,
    /// How many message ids past its oldest unanswered one the sender's peer may use: the
    /// sender's dedupe window.
    pub window: u32,
    /// The sender's [`DomusId`](crate::DomusId), which must equal its certificate's.
    pub domus_id: String,
}

/// A decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Frame {
    /// HELLO.
    Hello(Hello),
    /// PING with its nonce.
    Ping(u64),
    /// PONG with the nonce of the PING it answers.
    Pong(u64),
    /// CLOSE: a reason code (an [`ErrorId`](crate::ErrorId) number) and text.
    Close {
        /// The reason code (decoded by [`WireCode::closing_id`]).
        code: WireCode,
        /// Human-readable reason (at most [`MAX_REASON_LEN`] bytes).
        reason: String,
    },
    /// MESSAGE.
    Message(MessageFrame),
    /// MESSAGE_BATCH: messages with consecutive ids that share their destination, source
    /// and type.
    MessageBatch(MessageBatch),
    /// ACCEPTED: the ids of accepted messages.
    Accepted(AcceptedIds),
    /// REPLY.
    Reply {
        /// The message id answered.
        id: u64,
        /// With [`FLAG_EXTENDED`]: `payload` starts with a headers block (checked when the
        /// frame was decoded; [`Headers`]), the reply's payload after it.
        extended: bool,
        /// The reply payload (after its headers block when `extended`).
        payload: Bytes,
    },
    /// REJECT.
    Reject(RejectFrame),
    /// A frame of the blob callis.
    Blob(BlobFrame),
    /// DONE_BELOW: the sender will never send a message below this id again.
    DoneBelow(u64),
    /// A frame of a reserved, skippable type that this decoder does not know.
    Skipped(FrameType),
}

/// The frames of a blob callis; a stream is named by the id of the message that opened it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobFrame {
    /// BLOB_HELLO: the first frame on a blob callis, in both directions.
    Hello {
        /// Protocol version ([`PROTOCOL_VERSION`]).
        version: u16,
        /// The sender's epoch (the one its primary callis HELLO carries).
        epoch: u64,
        /// The largest BLOB_DATA payload the sender accepts.
        max_chunk: u32,
    },
    /// BLOB_DATA: `data` belongs at `offset` of `stream`.
    Data {
        /// The stream.
        stream: u64,
        /// Byte offset of `data` in the stream.
        offset: u64,
        /// The bytes.
        data: Bytes,
    },
    /// BLOB_END: the stream is `total` bytes long and the sender wrote them all.
    End {
        /// The stream.
        stream: u64,
        /// Its length.
        total: u64,
    },
    /// BLOB_CREDIT: the receiver holds bytes `0..received` and lets the sender write up to
    /// (not including) offset `limit`.
    Credit {
        /// The stream.
        stream: u64,
        /// Contiguous bytes received.
        received: u64,
        /// The first offset the sender may not write yet.
        limit: u64,
    },
    /// BLOB_CANCEL: the stream is abandoned.
    Cancel {
        /// The stream.
        stream: u64,
        /// An [`ErrorId`](crate::ErrorId) number (decoded by [`WireCode::closing_id`]).
        code: WireCode,
        /// Why (at most [`MAX_REASON_LEN`] bytes).
        reason: String,
    },
}

/// A MESSAGE frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageFrame {
    /// The sender's id for this message (per sender epoch).
    pub id: u64,
    /// The destination taberna.
    pub dst: u64,
    /// The source taberna on the sender.
    pub src: u64,
    /// The message type.
    pub msg_type: u32,
    /// The headers (empty when the frame has no extension).
    pub headers: Headers,
    /// The payload.
    pub payload: Bytes,
}

/// A REJECT frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectFrame {
    /// The message id answered.
    pub id: u64,
    /// Why: an [`ErrorId`](crate::ErrorId) number (`RemoteTabernaRejected` for an application
    /// reject, `UnknownTaberna`, `TabernaBusy`, …; decoded by [`WireCode::rejection_id`]).
    pub error: WireCode,
    /// The application's reject code (0 when the rejection is not the application's).
    pub code: u32,
    /// Human-readable reason (at most [`MAX_REASON_LEN`] bytes).
    pub reason: String,
}

/// The ids of an ACCEPTED frame: runs of consecutive ids, kept as the raw body and read
/// lazily.
///
/// Invariant (checked by the decoder): the body is one or more [`ACCEPTED_RUN_LEN`]-byte runs,
/// and no run goes past `u64::MAX`.
#[derive(Clone, PartialEq, Eq)]
pub struct AcceptedIds(Bytes);

impl AcceptedIds {
    /// How many runs.
    pub fn len(&self) -> usize {
        self.0.len() / ACCEPTED_RUN_LEN
    }

    /// Whether there are none (never true for a decoded frame).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The runs `(first, last)` (both included), in the order they were written.
    pub fn runs(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.0.chunks_exact(ACCEPTED_RUN_LEN).map(|mut c| {
            let first = c.get_u64();
            let more = u64::from(c.get_u32());
            (first, first.saturating_add(more))
        })
    }

    /// Every id, in the order they were written (a run may name billions: for tests and
    /// tools; the session walks [`runs`](Self::runs)).
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.runs().flat_map(|(first, last)| first..=last)
    }
}

impl fmt::Debug for AcceptedIds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.runs().map(|(a, b)| a..=b))
            .finish()
    }
}

/// A MESSAGE_BATCH frame: messages `first_id`, `first_id + 1`, … to one taberna, from one
/// taberna, of one type. The entries are kept as the raw body and read lazily; each payload
/// is a slice of the frame (no copy).
///
/// Invariant (checked by the decoder): `entries` is `count` (at least one) well-formed
/// entries — a minimal LEB128 length and that many bytes — and the last id does not pass
/// `u64::MAX`.
#[derive(Clone, PartialEq, Eq)]
pub struct MessageBatch {
    /// The id of the first message; the others follow one by one.
    pub first_id: u64,
    /// The destination taberna of every message.
    pub dst: u64,
    /// The source taberna of every message.
    pub src: u64,
    /// The message type of every message.
    pub msg_type: u32,
    count: u32,
    entries: Bytes,
}

impl MessageBatch {
    /// How many messages.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// Whether there are none (never true for a decoded frame).
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The id of the last message.
    pub fn last_id(&self) -> u64 {
        self.first_id
            .saturating_add(u64::from(self.count.saturating_sub(1)))
    }

    /// The messages, in id order.
    pub fn iter(&self) -> BatchIter {
        BatchIter {
            taken: 0,
            rest: self.entries.clone(),
            next_id: self.first_id,
            dst: self.dst,
            src: self.src,
            msg_type: self.msg_type,
        }
    }

    /// How many bytes each entry takes (its length and its payload), in id order: the
    /// offsets [`run`](Self::run) takes, without touching the payloads.
    pub fn entry_sizes(&self) -> impl Iterator<Item = usize> + '_ {
        let mut rest: &[u8] = &self.entries;
        std::iter::from_fn(move || {
            let (len, used) = get_varint(rest)?;
            let size = used.saturating_add(len as usize);
            rest = rest.get(size..)?;
            Some(size)
        })
    }

    /// The `count` messages from `first_id` on, whose entries are the bytes `from..to` of
    /// this batch's (offsets from [`BatchIter::offset`]): a run of it, sharing its bytes.
    pub fn run(&self, first_id: u64, count: u32, from: usize, to: usize) -> MessageBatch {
        MessageBatch {
            first_id,
            dst: self.dst,
            src: self.src,
            msg_type: self.msg_type,
            count,
            entries: self.entries.slice(from.min(to)..to.min(self.entries.len())),
        }
    }

    /// Reads and checks the entries after the fixed part; how many there are.
    fn count_entries(entries: &[u8]) -> Result<u32, &'static str> {
        let mut rest = entries;
        let mut count = 0u32;
        while !rest.is_empty() {
            let (len, used) =
                get_varint(rest).ok_or("a message length is not a minimal LEB128 u32")?;
            rest = rest.get(used..).unwrap_or_default();
            rest = rest
                .get(len as usize..)
                .ok_or("a message is longer than the rest of the batch")?;
            count = count.saturating_add(1);
        }
        if count == 0 {
            return Err("a batch holds at least one message");
        }
        Ok(count)
    }
}

impl fmt::Debug for MessageBatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MessageBatch")
            .field("ids", &(self.first_id..=self.last_id()))
            .field("dst", &self.dst)
            .field("src", &self.src)
            .field("msg_type", &self.msg_type)
            .finish_non_exhaustive()
    }
}

/// The messages of a [`MessageBatch`], from [`MessageBatch::iter`].
#[derive(Debug)]
pub struct BatchIter {
    /// Entry bytes read so far.
    taken: usize,
    rest: Bytes,
    next_id: u64,
    dst: u64,
    src: u64,
    msg_type: u32,
}

impl Iterator for BatchIter {
    type Item = MessageFrame;

    fn next(&mut self) -> Option<MessageFrame> {
        let (len, used) = get_varint(&self.rest)?;
        self.rest.advance(used);
        if self.rest.len() < len as usize {
            return None;
        }
        let payload = self.rest.split_to(len as usize);
        self.taken = self.taken.saturating_add(used).saturating_add(len as usize);
        let id = self.next_id;
        self.next_id = id.saturating_add(1);
        Some(MessageFrame {
            id,
            dst: self.dst,
            src: self.src,
            msg_type: self.msg_type,
            headers: Headers::new(),
            payload,
        })
    }
}

impl BatchIter {
    /// How many entry bytes the messages returned so far took.
    pub fn offset(&self) -> usize {
        self.taken
    }
}

/// Reads a minimal LEB128 `u32` (at most 5 bytes) from the front of `b`: the value and the
/// bytes it took. `None` when it is truncated, longer than it needs to be, or over `u32`.
fn get_varint(b: &[u8]) -> Option<(u32, usize)> {
    let mut value = 0u64;
    for (used, (byte, shift)) in (1usize..).zip(b.iter().take(5).zip([0u32, 7, 14, 21, 28])) {
        value |= u64::from(byte & 0x7F) << shift;
        if byte & 0x80 == 0 {
            if used > 1 && *byte == 0 {
                return None;
            }
            return u32::try_from(value).ok().map(|v| (v, used));
        }
    }
    None
}

/// Writes `v` as a minimal LEB128.
fn put_varint(out: &mut impl BufMut, mut v: u32) {
    while v >= 0x80 {
        out.put_u8((v as u8 & 0x7F) | 0x80);
        v >>= 7;
    }
    out.put_u8(v as u8);
}

/// The bytes `v` takes as a LEB128.
const fn varint_len(v: u32) -> usize {
    match v {
        0..=0x7F => 1,
        0x80..=0x3FFF => 2,
        0x4000..=0x1F_FFFF => 3,
        0x20_0000..=0xFFF_FFFF => 4,
        _ => 5,
    }
}

/// What one message adds to a MESSAGE_BATCH body: its length and its payload.
pub fn batch_entry_len(payload_len: usize) -> usize {
    varint_len(u32::try_from(payload_len).unwrap_or(u32::MAX)).saturating_add(payload_len)
}

/// A MESSAGE_BATCH being written at the end of a buffer: started with its first message,
/// grown one message at a time while [`fits`](Self::fits), and closed with
/// [`finish`](Self::finish), which writes the body length into the header.
#[derive(Debug)]
pub struct BatchWriter {
    /// Where the frame's header starts in the buffer.
    start: usize,
    next_id: u64,
    dst: u64,
    src: u64,
    msg_type: u32,
    body_len: usize,
}

impl BatchWriter {
    /// Starts a batch at the end of `out` with message `id`.
    pub fn start(
        out: &mut BytesMut,
        id: u64,
        dst: u64,
        src: u64,
        msg_type: u32,
        payload: &[u8],
    ) -> Self {
        let start = out.len();
        let body_len = MESSAGE_FIXED_LEN.saturating_add(batch_entry_len(payload.len()));
        put_message_head(
            out,
            FrameType::MESSAGE_BATCH,
            body_len,
            (id, dst, src, msg_type),
        );
        put_entry(out, payload);
        Self {
            start,
            next_id: id.saturating_add(1),
            dst,
            src,
            msg_type,
            body_len,
        }
    }

    /// Whether message `id` may join this batch: the next id, the same destination, source
    /// and type, and the body stays within `max_frame_len`.
    pub fn fits(
        &self,
        id: u64,
        dst: u64,
        src: u64,
        msg_type: u32,
        payload_len: usize,
        max_frame_len: u32,
    ) -> bool {
        id == self.next_id
            && dst == self.dst
            && src == self.src
            && msg_type == self.msg_type
            && self.body_len.saturating_add(batch_entry_len(payload_len)) <= max_frame_len as usize
    }

    /// Appends the next message (one that [`fits`](Self::fits)).
    #[inline]
    pub fn push(&mut self, out: &mut BytesMut, payload: &[u8]) {
        put_entry(out, payload);
        self.body_len = self.body_len.saturating_add(batch_entry_len(payload.len()));
        self.next_id = self.next_id.saturating_add(1);
    }

    /// Writes the body length into the header.
    pub fn finish(self, out: &mut BytesMut) {
        let len = u32::try_from(self.body_len)
            .unwrap_or(u32::MAX)
            .to_be_bytes();
        if let Some(at) = out.get_mut(self.start..self.start.saturating_add(4)) {
            at.copy_from_slice(&len);
        }
    }
}

/// Why a byte stream is not valid A1.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    /// A declared body length is over the limit (checked before reading the body).
    TooLong {
        /// The frame type.
        frame_type: FrameType,
        /// The declared length.
        len: u32,
        /// The limit.
        max: u32,
    },
    /// A type outside every known and skippable range.
    UnknownType(FrameType),
    /// Flag bits the type does not define.
    BadFlags {
        /// The frame type.
        frame_type: FrameType,
        /// The flags byte.
        flags: u8,
    },
    /// A body that does not match its type's layout.
    Malformed {
        /// The frame type.
        frame_type: FrameType,
        /// What is wrong.
        what: &'static str,
    },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooLong {
                frame_type,
                len,
                max,
            } => write!(f, "{frame_type:?} frame declares {len} bytes, limit {max}"),
            Self::UnknownType(t) => write!(f, "unknown frame type {:#04x}", t.0),
            Self::BadFlags { frame_type, flags } => {
                write!(f, "{frame_type:?} frame has undefined flags {flags:#04x}")
            }
            Self::Malformed { frame_type, what } => {
                write!(f, "malformed {frame_type:?} frame: {what}")
            }
        }
    }
}

impl std::error::Error for FrameError {}

/// Decodes one frame from the front of `buf`, whose bodies may be at most `max_frame_len`
/// bytes. `Ok(None)`: not enough bytes yet (nothing consumed). `Err`: corrupt stream.
pub fn decode(buf: &mut BytesMut, max_frame_len: u32) -> Result<Option<Frame>, FrameError> {
    let Some(header) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let mut header = header;
    let len = header.get_u32();
    let frame_type = FrameType(header.get_u8());
    let flags = header.get_u8();
    check_header(frame_type, flags, len, max_frame_len)?;
    let total = HEADER_LEN.saturating_add(len as usize);
    if buf.len() < total {
        // Nothing is reserved for the announced body: the reader grows the buffer as bytes
        // actually arrive, so a header alone cannot make us allocate.
        return Ok(None);
    }
    buf.advance(HEADER_LEN);
    let body = buf.split_to(len as usize).freeze();
    decode_body(frame_type, flags, body).map(Some)
}

/// Validates a header before its body is read.
fn check_header(
    frame_type: FrameType,
    flags: u8,
    len: u32,
    max_frame_len: u32,
) -> Result<(), FrameError> {
    if frame_type.name().is_none() && !frame_type.is_skippable() {
        return Err(FrameError::UnknownType(frame_type));
    }
    // MESSAGE and REPLY define FLAG_EXTENDED; no other known type defines a flag; unknown skippable
    // types may carry any.
    let defined = if frame_type == FrameType::MESSAGE || frame_type == FrameType::REPLY {
        FLAG_EXTENDED
    } else {
        0
    };
    if flags & !defined != 0 && (frame_type.name().is_some() || !frame_type.is_skippable()) {
        return Err(FrameError::BadFlags { frame_type, flags });
    }
    let max = match frame_type {
        FrameType::PING | FrameType::PONG | FrameType::DONE_BELOW => 8,
        FrameType::CLOSE => CLOSE_MAX_LEN,
        FrameType::HELLO => HELLO_MAX_LEN,
        FrameType::BLOB_END => 16,
        FrameType::BLOB_CREDIT => 24,
        FrameType::BLOB_CANCEL => BLOB_CANCEL_MAX_LEN,
        FrameType::BLOB_HELLO => BLOB_HELLO_LEN,
        _ => max_frame_len,
    };
    if len > max {
        return Err(FrameError::TooLong {
            frame_type,
            len,
            max,
        });
    }
    Ok(())
}

fn malformed(frame_type: FrameType, what: &'static str) -> FrameError {
    FrameError::Malformed { frame_type, what }
}

fn need(body: &Bytes, n: usize, t: FrameType, what: &'static str) -> Result<(), FrameError> {
    if body.remaining() < n {
        Err(malformed(t, what))
    } else {
        Ok(())
    }
}

fn finish(body: &Bytes, t: FrameType) -> Result<(), FrameError> {
    if body.has_remaining() {
        Err(malformed(t, "trailing bytes after the body"))
    } else {
        Ok(())
    }
}

/// Reads a `u16`-length-prefixed UTF-8 string of at most `max` bytes.
fn get_text(body: &mut Bytes, t: FrameType, max: usize) -> Result<String, FrameError> {
    need(body, 2, t, "truncated text length")?;
    let len = body.get_u16() as usize;
    if len > max {
        return Err(malformed(t, "text longer than allowed"));
    }
    need(body, len, t, "text shorter than its length")?;
    let raw = body.split_to(len);
    String::from_utf8(raw.to_vec()).map_err(|_| malformed(t, "text is not UTF-8"))
}

fn decode_body(t: FrameType, flags: u8, mut body: Bytes) -> Result<Frame, FrameError> {
    let frame = match t {
        FrameType::HELLO => {
            need(&body, HELLO_FIXED_LEN - 2, t, "truncated HELLO")?;
            let version = body.get_u16();
            let epoch = body.get_u64();
            let max_frame_len = body.get_u32();
            let window = body.get_u32();
            let domus_id = get_text(&mut body, t, MAX_HELLO_ID_LEN)?;
            Frame::Hello(Hello {
                version,
                epoch,
                max_frame_len,
                window,
                domus_id,
            })
        }
        FrameType::PING | FrameType::PONG => {
            need(&body, 8, t, "a nonce is 8 bytes")?;
            let nonce = body.get_u64();
            if t == FrameType::PING {
                Frame::Ping(nonce)
            } else {
                Frame::Pong(nonce)
            }
        }
        FrameType::CLOSE => {
            need(&body, 4, t, "truncated CLOSE")?;
            let code = WireCode(body.get_u32());
            let reason = get_text(&mut body, t, MAX_REASON_LEN)?;
            Frame::Close { code, reason }
        }
        FrameType::MESSAGE => {
            need(&body, MESSAGE_FIXED_LEN, t, "truncated MESSAGE header")?;
            let id = body.get_u64();
            let dst = body.get_u64();
            let src = body.get_u64();
            let msg_type = body.get_u32();
            let headers = if flags & FLAG_EXTENDED != 0 {
                Headers::take(&mut body).map_err(|what| malformed(t, what))?
            } else {
                Headers::new()
            };
            return Ok(Frame::Message(MessageFrame {
                id,
                dst,
                src,
                msg_type,
                headers,
                payload: body,
            }));
        }
        FrameType::MESSAGE_BATCH => {
            need(
                &body,
                MESSAGE_FIXED_LEN,
                t,
                "truncated MESSAGE_BATCH header",
            )?;
            let first_id = body.get_u64();
            let dst = body.get_u64();
            let src = body.get_u64();
            let msg_type = body.get_u32();
            let count = MessageBatch::count_entries(&body).map_err(|what| malformed(t, what))?;
            if first_id
                .checked_add(u64::from(count.saturating_sub(1)))
                .is_none()
            {
                return Err(malformed(t, "the batch's ids pass 2^64 - 1"));
            }
            return Ok(Frame::MessageBatch(MessageBatch {
                first_id,
                dst,
                src,
                msg_type,
                count,
                entries: body,
            }));
        }
        FrameType::ACCEPTED => {
            if body.is_empty() || !body.len().is_multiple_of(ACCEPTED_RUN_LEN) {
                return Err(malformed(t, "the body must be one or more 12-byte runs"));
            }
            let overflows = body.chunks_exact(ACCEPTED_RUN_LEN).any(|mut c| {
                let first = c.get_u64();
                first.checked_add(u64::from(c.get_u32())).is_none()
            });
            if overflows {
                return Err(malformed(t, "a run passes id 2^64 - 1"));
            }
            return Ok(Frame::Accepted(AcceptedIds(body)));
        }
        FrameType::REPLY => {
            need(&body, 8, t, "truncated REPLY")?;
            let id = body.get_u64();
            let extended = flags & FLAG_EXTENDED != 0;
            if extended {
                // Checked here, kept whole: the block travels with the payload to the sender's
                // outcome, which splits it.
                Headers::take(&mut body.clone()).map_err(|what| malformed(t, what))?;
            }
            return Ok(Frame::Reply {
                id,
                extended,
                payload: body,
            });
        }
        FrameType::REJECT => {
            need(&body, REJECT_FIXED_LEN - 2, t, "truncated REJECT")?;
            let id = body.get_u64();
            let error = WireCode(body.get_u32());
            let code = body.get_u32();
            let reason = get_text(&mut body, t, MAX_REASON_LEN)?;
            Frame::Reject(RejectFrame {
                id,
                error,
                code,
                reason,
            })
        }
        FrameType::BLOB_DATA => {
            need(&body, BLOB_DATA_FIXED_LEN, t, "truncated BLOB_DATA")?;
            let stream = body.get_u64();
            let offset = body.get_u64();
            return Ok(Frame::Blob(BlobFrame::Data {
                stream,
                offset,
                data: body,
            }));
        }
        FrameType::BLOB_END => {
            need(&body, 16, t, "BLOB_END is 16 bytes")?;
            let stream = body.get_u64();
            let total = body.get_u64();
            Frame::Blob(BlobFrame::End { stream, total })
        }
        FrameType::BLOB_CREDIT => {
            need(&body, 24, t, "BLOB_CREDIT is 24 bytes")?;
            let stream = body.get_u64();
            let received = body.get_u64();
            let limit = body.get_u64();
            if received > limit {
                return Err(malformed(t, "received is past the limit"));
            }
            Frame::Blob(BlobFrame::Credit {
                stream,
                received,
                limit,
            })
        }
        FrameType::BLOB_CANCEL => {
            need(&body, BLOB_CANCEL_FIXED_LEN - 2, t, "truncated BLOB_CANCEL")?;
            let stream = body.get_u64();
            let code = WireCode(body.get_u32());
            let reason = get_text(&mut body, t, MAX_REASON_LEN)?;
            Frame::Blob(BlobFrame::Cancel {
                stream,
                code,
                reason,
            })
        }
        FrameType::BLOB_HELLO => {
            need(&body, BLOB_HELLO_LEN as usize, t, "BLOB_HELLO is 14 bytes")?;
            let version = body.get_u16();
            let epoch = body.get_u64();
            let max_chunk = body.get_u32();
            Frame::Blob(BlobFrame::Hello {
                version,
                epoch,
                max_chunk,
            })
        }
        FrameType::DONE_BELOW => {
            need(&body, 8, t, "DONE_BELOW is 8 bytes")?;
            Frame::DoneBelow(body.get_u64())
        }
        other if other.is_skippable() => return Ok(Frame::Skipped(other)),
        other => return Err(FrameError::UnknownType(other)),
    };
    finish(&body, t)?;
    Ok(frame)
}

fn put_header(out: &mut impl BufMut, t: FrameType, body_len: usize) {
    // Callers never build a body over u32::MAX: payload sizes are checked against
    // `max_frame_len` (a u32) before a message is queued.
    let len = u32::try_from(body_len).unwrap_or(u32::MAX);
    out.put_u32(len);
    out.put_u8(t.0);
    out.put_u8(0);
}

/// Cuts `s` to at most `max` bytes at a character boundary.
pub(crate) fn capped(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut cut = max;
    while !s.is_char_boundary(cut) {
        cut = cut.saturating_sub(1);
    }
    s.get(..cut).unwrap_or_default()
}

fn put_text(out: &mut BytesMut, s: &str) {
    out.put_u16(s.len() as u16);
    out.put_slice(s.as_bytes());
}

/// Encodes a HELLO.
pub fn encode_hello(out: &mut BytesMut, hello: &Hello) {
    let id = capped(&hello.domus_id, MAX_HELLO_ID_LEN);
    put_header(
        out,
        FrameType::HELLO,
        HELLO_FIXED_LEN.saturating_add(id.len()),
    );
    out.put_u16(hello.version);
    out.put_u64(hello.epoch);
    out.put_u32(hello.max_frame_len);
    out.put_u32(hello.window);
    put_text(out, id);
}

/// Encodes a PING.
pub fn encode_ping(out: &mut BytesMut, nonce: u64) {
    put_header(out, FrameType::PING, 8);
    out.put_u64(nonce);
}

/// Encodes a DONE_BELOW.
pub fn encode_done_below(out: &mut BytesMut, floor: u64) {
    put_header(out, FrameType::DONE_BELOW, 8);
    out.put_u64(floor);
}

/// Encodes a PONG.
pub fn encode_pong(out: &mut BytesMut, nonce: u64) {
    put_header(out, FrameType::PONG, 8);
    out.put_u64(nonce);
}

/// Encodes a CLOSE; the reason is cut to [`MAX_REASON_LEN`] bytes.
pub fn encode_close(out: &mut BytesMut, code: WireCode, reason: &str) {
    let reason = capped(reason, MAX_REASON_LEN);
    put_header(
        out,
        FrameType::CLOSE,
        CLOSE_FIXED_LEN.saturating_add(reason.len()),
    );
    out.put_u32(code.0);
    put_text(out, reason);
}

/// Encodes a MESSAGE without headers.
pub fn encode_message(
    out: &mut BytesMut,
    id: u64,
    dst: u64,
    src: u64,
    msg_type: u32,
    payload: &[u8],
) {
    encode_message_with_headers(out, id, dst, src, msg_type, &Headers::new(), payload);
}

/// Encodes a MESSAGE, with the headers extension (and [`FLAG_EXTENDED`]) when `headers` is
/// not empty.
pub fn encode_message_with_headers(
    out: &mut BytesMut,
    id: u64,
    dst: u64,
    src: u64,
    msg_type: u32,
    headers: &Headers,
    payload: &[u8],
) {
    let body = MESSAGE_FIXED_LEN
        .saturating_add(headers.wire_len())
        .saturating_add(payload.len());
    put_message_head(out, FrameType::MESSAGE, body, (id, dst, src, msg_type));
    if !headers.is_empty() {
        // The flags byte is the last byte of the frame header just written.
        let flags_at = out
            .len()
            .saturating_sub(MESSAGE_FIXED_LEN.saturating_add(1));
        if let Some(flags) = out.get_mut(flags_at) {
            *flags = FLAG_EXTENDED;
        }
        headers.put(out);
    }
    out.put_slice(payload);
}

/// Writes the header and the fixed part shared by MESSAGE and MESSAGE_BATCH — (first) id,
/// destination, source, type — for a body of `body_len` bytes, and reserves room for the
/// whole frame. The fixed part is assembled on the stack and copied in once: a small message
/// is mostly fixed part, and each `BytesMut` put checks and grows the buffer.
fn put_message_head(
    out: &mut BytesMut,
    t: FrameType,
    body_len: usize,
    (id, dst, src, msg_type): (u64, u64, u64, u32),
) {
    out.reserve(HEADER_LEN.saturating_add(body_len));
    let mut fixed = [0u8; HEADER_LEN + MESSAGE_FIXED_LEN];
    let mut at = fixed.as_mut_slice();
    put_header(&mut at, t, body_len);
    at.put_u64(id);
    at.put_u64(dst);
    at.put_u64(src);
    at.put_u32(msg_type);
    out.put_slice(&fixed);
}

/// Writes one MESSAGE_BATCH entry: the payload's length and the payload.
#[inline]
fn put_entry(out: &mut BytesMut, payload: &[u8]) {
    put_varint(out, u32::try_from(payload.len()).unwrap_or(u32::MAX));
    out.put_slice(payload);
}

/// Encodes an ACCEPTED frame for `ids` (which must not be empty), consecutive ids as one run.
pub fn encode_accepted(out: &mut BytesMut, ids: &[u64]) {
    encode_accepted_upto(out, ids, usize::MAX);
}

/// Encodes one ACCEPTED frame for the front of `ids`, at most `max_runs` runs (at least
/// one): each run is a stretch of consecutive increasing ids. Returns how many ids it took;
/// nothing is written when `ids` is empty.
pub fn encode_accepted_upto(out: &mut BytesMut, ids: &[u64], max_runs: usize) -> usize {
    // Walk once to find where the frame ends, then write it.
    let max_runs = max_runs.max(1);
    let (mut runs, mut taken, mut in_run) = (0usize, 0usize, 0u64);
    let mut prev: Option<u64> = None;
    for id in ids {
        if continues_run(prev, *id, in_run) {
            in_run = in_run.saturating_add(1);
        } else {
            if runs == max_runs {
                break;
            }
            runs = runs.saturating_add(1);
            in_run = 1;
        }
        prev = Some(*id);
        taken = taken.saturating_add(1);
    }
    if taken == 0 {
        return 0;
    }
    put_header(
        out,
        FrameType::ACCEPTED,
        runs.saturating_mul(ACCEPTED_RUN_LEN),
    );
    let mut rest = ids.get(..taken).unwrap_or_default();
    while let Some(first) = rest.first() {
        let mut len = 1u64;
        let mut prev = *first;
        for id in rest.iter().skip(1) {
            if !continues_run(Some(prev), *id, len) {
                break;
            }
            len = len.saturating_add(1);
            prev = *id;
        }
        out.put_u64(*first);
        out.put_u32(u32::try_from(len.saturating_sub(1)).unwrap_or(u32::MAX));
        rest = rest
            .get(usize::try_from(len).unwrap_or(usize::MAX)..)
            .unwrap_or_default();
    }
    taken
}

/// Whether `id` extends a run that ends with `prev` and holds `in_run` ids (a run holds at
/// most 2^32).
fn continues_run(prev: Option<u64>, id: u64, in_run: u64) -> bool {
    prev.is_some_and(|p| p.checked_add(1) == Some(id)) && in_run < (1u64 << 32)
}

/// Encodes a REPLY.
pub fn encode_reply(out: &mut BytesMut, id: u64, payload: &[u8]) {
    put_header(out, FrameType::REPLY, payload.len().saturating_add(8));
    out.put_u64(id);
    out.put_slice(payload);
}

/// Encodes a REPLY with [`FLAG_EXTENDED`]: `block_and_payload` is a headers block
/// ([`Headers`]' wire form) followed by the payload.
pub fn encode_reply_extended(out: &mut BytesMut, id: u64, block_and_payload: &[u8]) {
    put_header(
        out,
        FrameType::REPLY,
        block_and_payload.len().saturating_add(8),
    );
    let flags_at = out.len().saturating_sub(1);
    if let Some(flags) = out.get_mut(flags_at) {
        *flags = FLAG_EXTENDED;
    }
    out.put_u64(id);
    out.put_slice(block_and_payload);
}

/// Encodes a REJECT; the reason is cut to [`MAX_REASON_LEN`] bytes.
pub fn encode_reject(out: &mut BytesMut, id: u64, error: WireCode, code: u32, reason: &str) {
    let reason = capped(reason, MAX_REASON_LEN);
    put_header(
        out,
        FrameType::REJECT,
        REJECT_FIXED_LEN.saturating_add(reason.len()),
    );
    out.put_u64(id);
    out.put_u32(error.0);
    out.put_u32(code);
    put_text(out, reason);
}

/// Encodes a BLOB_HELLO frame.
pub fn encode_blob_hello(out: &mut BytesMut, version: u16, epoch: u64, max_chunk: u32) {
    put_header(out, FrameType::BLOB_HELLO, BLOB_HELLO_LEN as usize);
    out.put_u16(version);
    out.put_u64(epoch);
    out.put_u32(max_chunk);
}

/// Encodes a BLOB_DATA frame.
pub fn encode_blob_data(out: &mut BytesMut, stream: u64, offset: u64, data: &[u8]) {
    let body = BLOB_DATA_FIXED_LEN.saturating_add(data.len());
    out.reserve(HEADER_LEN.saturating_add(body));
    put_header(out, FrameType::BLOB_DATA, body);
    out.put_u64(stream);
    out.put_u64(offset);
    out.put_slice(data);
}

/// Encodes a BLOB_END frame.
pub fn encode_blob_end(out: &mut BytesMut, stream: u64, total: u64) {
    put_header(out, FrameType::BLOB_END, 16);
    out.put_u64(stream);
    out.put_u64(total);
}

/// Encodes a BLOB_CREDIT frame (`received` must not exceed `limit`).
pub fn encode_blob_credit(out: &mut BytesMut, stream: u64, received: u64, limit: u64) {
    put_header(out, FrameType::BLOB_CREDIT, 24);
    out.put_u64(stream);
    out.put_u64(received);
    out.put_u64(limit.max(received));
}

/// Encodes a BLOB_CANCEL frame; the reason is cut to [`MAX_REASON_LEN`] bytes.
pub fn encode_blob_cancel(out: &mut BytesMut, stream: u64, code: WireCode, reason: &str) {
    let reason = capped(reason, MAX_REASON_LEN);
    put_header(
        out,
        FrameType::BLOB_CANCEL,
        BLOB_CANCEL_FIXED_LEN.saturating_add(reason.len()),
    );
    out.put_u64(stream);
    out.put_u32(code.0);
    put_text(out, reason);
}

impl Frame {
    /// This frame's type on the wire.
    pub fn frame_type(&self) -> FrameType {
        match self {
            Frame::Hello(_) => FrameType::HELLO,
            Frame::Ping(_) => FrameType::PING,
            Frame::Pong(_) => FrameType::PONG,
            Frame::Close { .. } => FrameType::CLOSE,
            Frame::Message(_) => FrameType::MESSAGE,
            Frame::MessageBatch(_) => FrameType::MESSAGE_BATCH,
            Frame::Accepted(_) => FrameType::ACCEPTED,
            Frame::Reply { .. } => FrameType::REPLY,
            Frame::Reject(_) => FrameType::REJECT,
            Frame::Blob(BlobFrame::Hello { .. }) => FrameType::BLOB_HELLO,
            Frame::Blob(BlobFrame::Data { .. }) => FrameType::BLOB_DATA,
            Frame::Blob(BlobFrame::End { .. }) => FrameType::BLOB_END,
            Frame::Blob(BlobFrame::Credit { .. }) => FrameType::BLOB_CREDIT,
            Frame::Blob(BlobFrame::Cancel { .. }) => FrameType::BLOB_CANCEL,
            Frame::DoneBelow(_) => FrameType::DONE_BELOW,
            Frame::Skipped(t) => *t,
        }
    }

    /// Encodes this frame (for tests and tools; the session uses the `encode_*` functions).
    pub fn encode(&self, out: &mut BytesMut) {
        match self {
            Frame::Hello(h) => encode_hello(out, h),
            Frame::Ping(n) => encode_ping(out, *n),
            Frame::Pong(n) => encode_pong(out, *n),
            Frame::Close { code, reason } => encode_close(out, *code, reason),
            Frame::Message(m) => encode_message_with_headers(
                out, m.id, m.dst, m.src, m.msg_type, &m.headers, &m.payload,
            ),
            Frame::MessageBatch(b) => {
                put_message_head(
                    out,
                    FrameType::MESSAGE_BATCH,
                    MESSAGE_FIXED_LEN.saturating_add(b.entries.len()),
                    (b.first_id, b.dst, b.src, b.msg_type),
                );
                out.put_slice(&b.entries);
            }
            Frame::Accepted(ids) => {
                put_header(out, FrameType::ACCEPTED, ids.0.len());
                out.put_slice(&ids.0);
            }
            Frame::Reply {
                id,
                extended: false,
                payload,
            } => encode_reply(out, *id, payload),
            Frame::Reply {
                id,
                extended: true,
                payload,
            } => encode_reply_extended(out, *id, payload),
            Frame::Reject(r) => encode_reject(out, r.id, r.error, r.code, &r.reason),
            Frame::Blob(BlobFrame::Data {
                stream,
                offset,
                data,
            }) => encode_blob_data(out, *stream, *offset, data),
            Frame::Blob(BlobFrame::End { stream, total }) => encode_blob_end(out, *stream, *total),
            Frame::Blob(BlobFrame::Hello {
                version,
                epoch,
                max_chunk,
            }) => encode_blob_hello(out, *version, *epoch, *max_chunk),
            Frame::Blob(BlobFrame::Credit {
                stream,
                received,
                limit,
            }) => encode_blob_credit(out, *stream, *received, *limit),
            Frame::Blob(BlobFrame::Cancel {
                stream,
                code,
                reason,
            }) => encode_blob_cancel(out, *stream, *code, reason),
            Frame::DoneBelow(floor) => encode_done_below(out, *floor),
            Frame::Skipped(t) => put_header(out, *t, 0),
        }
    }
}

#[cfg(test)]
#[path = "frame_tests.rs"]
mod tests;
