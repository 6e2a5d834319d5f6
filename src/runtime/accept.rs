//! The wire side of accepting a callis: reading an authenticated callis's first frame to tell
//! a primary callis (HELLO) from a blob callis (BLOB_HELLO), and refusing a callis with a
//! CLOSE that says why. The domus's inbound gate decides *whether* to admit a callis; this
//! module is the only place above `a1_callis` that reads or writes those frames.
//!
//! Every wait here is bounded by its caller (`hello_timeout` around the first frame) or by
//! [`REFUSAL_WRITE_TIMEOUT`]; nothing is buffered past [`FIRST_FRAME_MAX`] plus one read.

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncReadExt;

use crate::a0_transport::AuthenticatedStream;
use crate::a1_callis::frame::{FrameType, HEADER_LEN, encode_close};
use crate::error::{Error, ErrorId};
use crate::reporting::CallisKind;

/// How long a refused callis may take to receive its CLOSE before it is dropped.
pub(crate) const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// The longest first frame read to tell a primary callis from a blob callis (a HELLO or a
/// BLOB_HELLO is far shorter).
pub(crate) const FIRST_FRAME_MAX: usize = 4096;

/// Reads an inbound callis up to the end of its first frame into `buf` (the whole first
/// frame, perhaps more) and says which kind of callis it opens. A first frame that is neither
/// HELLO nor BLOB_HELLO, or longer than either can be, is a `ProtocolViolation`; a callis
/// that ends first is `ConnectionLost`.
pub(crate) async fn read_first_frame(
    stream: &mut AuthenticatedStream,
    buf: &mut BytesMut,
) -> Result<CallisKind, Error> {
    loop {
        if let Some(header) = buf.get(..HEADER_LEN) {
            let mut len = [0u8; 4];
            len.copy_from_slice(header.get(..4).unwrap_or(&[0; 4]));
            let len = u32::from_be_bytes(len) as usize;
            let frame_type = FrameType(header.get(4).copied().unwrap_or(0));
            let kind = match frame_type {
                FrameType::HELLO => CallisKind::Primary,
                FrameType::BLOB_HELLO => CallisKind::Blob,
                _ => return Err(bad_first_frame(frame_type, len)),
            };
            if len > FIRST_FRAME_MAX {
                return Err(bad_first_frame(frame_type, len));
            }
            if buf.len() >= HEADER_LEN.saturating_add(len) {
                return Ok(kind);
            }
        }
        let n = stream
            .read_buf(buf)
            .await
            .map_err(|e| Error::io("reading the first frame", &e))?;
        if n == 0 {
            return Err(Error::new(
                ErrorId::ConnectionLost,
                "the peer closed the callis before its first frame",
            ));
        }
    }
}

fn bad_first_frame(frame_type: FrameType, len: usize) -> Error {
    Error::new(
        ErrorId::ProtocolViolation,
        format!("the first frame on a callis was {frame_type:?} of {len} bytes"),
    )
}

/// Writes a CLOSE carrying `error` to a callis that never reached a driver and shuts it
/// down, within [`REFUSAL_WRITE_TIMEOUT`]; the bytes written, when the CLOSE went out.
pub(crate) async fn refuse(stream: &mut AuthenticatedStream, error: &Error) -> Option<usize> {
    let mut close = BytesMut::new();
    encode_close(&mut close, error.id().into(), error.message());
    let written = tokio::time::timeout(REFUSAL_WRITE_TIMEOUT, async {
        tokio::io::AsyncWriteExt::write_all(stream, &close).await?;
        tokio::io::AsyncWriteExt::shutdown(stream).await
    })
    .await;
    matches!(written, Ok(Ok(()))).then_some(close.len())
}
