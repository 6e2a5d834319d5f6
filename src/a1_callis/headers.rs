//! Message headers: a small set of key/value pairs a message carries beside its payload
//! (correlation ids, a tenant, a content type, the W3C trace context), and the 26-byte
//! [`TraceContext`] the core knows without any OpenTelemetry dependency.
//!
//! On the wire the headers are an optional, versioned extension of a MESSAGE frame (flag bit
//! [`FLAG_EXTENDED`](super::frame::FLAG_EXTENDED)): absent, they cost no byte. This module holds
//! the block's encoded form and checks it; the frame codec writes and finds the block, the
//! session applies a receiver's limits. Pure: no IO, no clock, no allocation when a message has
//! no headers (an empty [`Headers`] is one null pointer).
//!
//! Block layout (every byte in `docs/wire-protocol.md`): `version u8` (1), then one or more
//! entries `key_len u8` · `key` · `value_len u16` · `value`. A key is 1 to 64 bytes of
//! `a-z 0-9 - _ .`; a value any bytes. It must not: interpret values (beyond `traceparent`),
//! or let a block past its declared length, or a key outside the alphabet, through.

use std::fmt;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::{Error, ErrorId};

/// The extension version this codec writes and reads.
pub const HEADERS_VERSION: u8 = 1;

/// The longest header key, in bytes.
pub const MAX_HEADER_KEY_LEN: usize = 64;

/// The most bytes a block's entries may take: the block's length field is a `u16` and counts
/// the version byte too.
pub const MAX_HEADERS_LEN: usize = u16::MAX as usize - 1;

/// The key of the W3C trace context header; its value is a [`TraceContext`]'s 26 bytes.
pub const TRACEPARENT: &str = "traceparent";

/// Key/value headers of one message. Keys are 1 to 64 bytes of lowercase ASCII letters,
/// digits, `-`, `_` and `.`; a key may appear more than once (as in HTTP), [`get`](Self::get)
/// returns the first. Values are bytes. Held in their encoded form, so a message's headers
/// are one allocation at most and a received message's are a slice of its frame.
///
/// `Debug` shows keys and value lengths, never values (a header may carry a credential).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Headers {
    block: Option<Box<Block>>,
}

#[derive(Clone, PartialEq, Eq)]
struct Block {
    /// The extension version the block was written with ([`HEADERS_VERSION`] for every block
    /// built here; a received block of another version is kept raw, for the session to
    /// refuse).
    version: u8,
    /// How many entries `entries` holds.
    count: u16,
    /// The entries, encoded.
    entries: Bytes,
}

impl Headers {
    /// No headers.
    pub const fn new() -> Self {
        Self { block: None }
    }

    /// Adds `key: value` (after any header of the same key). Fails with
    /// [`ErrorId::InvalidHeader`] for a key outside the alphabet or over 64 bytes, a value
    /// over 65,535 bytes or a `traceparent` that is not a valid [`TraceContext`], and with
    /// [`ErrorId::HeadersTooLarge`] when the block would pass [`MAX_HEADERS_LEN`] bytes.
    /// (A domus's `max_headers` and `max_headers_len` apply when the message is sent.)
    pub fn insert(&mut self, key: &str, value: impl AsRef<[u8]>) -> Result<(), Error> {
        let value = value.as_ref();
        check_key(key.as_bytes()).map_err(|what| invalid(key, what))?;
        if value.len() > usize::from(u16::MAX) {
            return Err(invalid(key, "its value is over 65,535 bytes"));
        }
        if key == TRACEPARENT && TraceContext::from_bytes(value).is_none() {
            return Err(invalid(
                key,
                "its value is not a trace context (26 bytes: version 0, a non-zero trace id and span id, flags)",
            ));
        }
        let (count, old) = match &self.block {
            Some(b) => (b.count, &b.entries[..]),
            None => (0, &[][..]),
        };
        let added = 1usize
            .saturating_add(key.len())
            .saturating_add(2)
            .saturating_add(value.len());
        let len = old.len().saturating_add(added);
        if len > MAX_HEADERS_LEN || count == u16::MAX {
            return Err(Error::new(
                ErrorId::HeadersTooLarge,
                format!(
                    "adding header {key:?} makes the headers {len} bytes, over {MAX_HEADERS_LEN}"
                ),
            ));
        }
        let mut entries = BytesMut::with_capacity(len);
        entries.put_slice(old);
        // The key is at most 64 bytes and the value at most u16::MAX (both checked above).
        entries.put_u8(u8::try_from(key.len()).unwrap_or(u8::MAX));
        entries.put_slice(key.as_bytes());
        entries.put_u16(u16::try_from(value.len()).unwrap_or(u16::MAX));
        entries.put_slice(value);
        self.block = Some(Box::new(Block {
            version: HEADERS_VERSION,
            count: count.saturating_add(1),
            entries: entries.freeze(),
        }));
        Ok(())
    }

    /// [`insert`](Self::insert), by value: `Headers::new().with("tenant", "acme")?`.
    pub fn with(mut self, key: &str, value: impl AsRef<[u8]>) -> Result<Self, Error> {
        self.insert(key, value)?;
        Ok(self)
    }

    /// Removes every header named `key`; returns how many there were.
    pub fn remove(&mut self, key: &str) -> usize {
        let before = self.len();
        if !self.iter().any(|(k, _)| k == key) {
            return 0;
        }
        let kept: Vec<(String, Bytes)> = self
            .iter()
            .filter(|(k, _)| *k != key)
            .map(|(k, v)| (k.to_owned(), Bytes::copy_from_slice(v)))
            .collect();
        self.block = None;
        for (k, v) in kept {
            // Each was valid in this block, so each fits again.
            let _ = self.insert(&k, v);
        }
        before.saturating_sub(self.len())
    }

    /// The first value of `key`.
    pub fn get(&self, key: &str) -> Option<&[u8]> {
        self.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    /// The first value of `key`, when it is UTF-8.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// Every header, in order.
    pub fn iter(&self) -> HeaderIter<'_> {
        let rest = match &self.block {
            Some(b) if b.version == HEADERS_VERSION => &b.entries[..],
            _ => &[][..],
        };
        HeaderIter { rest }
    }

    /// How many headers there are.
    pub fn len(&self) -> usize {
        self.block.as_ref().map_or(0, |b| usize::from(b.count))
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.block.is_none()
    }

    /// The bytes the entries take (what a domus's `max_headers_len` limits).
    pub fn encoded_len(&self) -> usize {
        self.block.as_ref().map_or(0, |b| b.entries.len())
    }

    /// The W3C trace context, when a valid `traceparent` header is present.
    pub fn trace_context(&self) -> Option<TraceContext> {
        self.get(TRACEPARENT).and_then(TraceContext::from_bytes)
    }

    /// Sets the `traceparent` header (replacing any).
    pub fn set_trace_context(&mut self, context: TraceContext) -> Result<(), Error> {
        self.remove(TRACEPARENT);
        self.insert(TRACEPARENT, context.to_bytes())
    }

    /// The extension version of a received block (for the session's check).
    pub(crate) fn version(&self) -> Option<u8> {
        self.block.as_ref().map(|b| b.version)
    }

    /// The bytes the extension takes in a frame: none without headers, else its `u16`
    /// length, its version and its entries.
    pub fn wire_len(&self) -> usize {
        self.block
            .as_ref()
            .map_or(0, |b| 3usize.saturating_add(b.entries.len()))
    }

    /// Writes the extension (nothing without headers).
    pub(crate) fn put(&self, out: &mut impl BufMut) {
        if let Some(b) = &self.block {
            out.put_u16(u16::try_from(b.entries.len().saturating_add(1)).unwrap_or(u16::MAX));
            out.put_u8(b.version);
            out.put_slice(&b.entries);
        }
    }

    /// Reads an extension from the front of `body` (after its frame's fixed part). A block
    /// past the body, without entries, or with an entry past the block or a key outside the
    /// alphabet is malformed; a block of another version is kept raw.
    pub(crate) fn take(body: &mut Bytes) -> Result<Self, &'static str> {
        if body.remaining() < 2 {
            return Err("truncated headers length");
        }
        let len = usize::from(body.get_u16());
        if len < 2 {
            return Err("a headers block without entries");
        }
        if body.remaining() < len {
            return Err("headers longer than the frame");
        }
        let mut block = body.split_to(len);
        let version = block.get_u8();
        if version != HEADERS_VERSION {
            return Ok(Self {
                block: Some(Box::new(Block {
                    version,
                    count: 0,
                    entries: block,
                })),
            });
        }
        let count = count_entries(&block)?;
        Ok(Self {
            block: Some(Box::new(Block {
                version,
                count,
                entries: block,
            })),
        })
    }
}

/// Walks encoded entries, checking each; returns how many there are.
fn count_entries(mut rest: &[u8]) -> Result<u16, &'static str> {
    let mut count = 0u16;
    while !rest.is_empty() {
        let key_len = usize::from(rest.get_u8());
        let key = rest.get(..key_len).ok_or("a header key past the block")?;
        check_key(key)?;
        rest = rest.get(key_len..).unwrap_or_default();
        if rest.len() < 2 {
            return Err("a header value length past the block");
        }
        let value_len = usize::from(rest.get_u16());
        rest = rest
            .get(value_len..)
            .ok_or("a header value past the block")?;
        count = count.checked_add(1).ok_or("too many headers")?;
    }
    Ok(count)
}

fn check_key(key: &[u8]) -> Result<(), &'static str> {
    if key.is_empty() || key.len() > MAX_HEADER_KEY_LEN {
        return Err("a header key must be 1 to 64 bytes");
    }
    if !key
        .iter()
        .all(|c| matches!(c, b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.'))
    {
        return Err("a header key may hold only a-z, 0-9, '-', '_' and '.'");
    }
    Ok(())
}

fn invalid(key: &str, what: &str) -> Error {
    let key = super::frame::capped(key, MAX_HEADER_KEY_LEN);
    Error::new(ErrorId::InvalidHeader, format!("header {key:?}: {what}"))
}

impl fmt::Debug for Headers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut list = f.debug_map();
        for (k, v) in self.iter() {
            list.entry(&k, &format_args!("<{} bytes>", v.len()));
        }
        list.finish()
    }
}

/// Iterator over [`Headers`]: `(key, value)` in order.
#[derive(Debug, Clone)]
pub struct HeaderIter<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for HeaderIter<'a> {
    type Item = (&'a str, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        // The block was checked when it was built or received; a short one ends the walk.
        let (&key_len, rest) = self.rest.split_first()?;
        let key = rest.get(..usize::from(key_len))?;
        let rest = rest.get(usize::from(key_len)..)?;
        let len_bytes = rest.get(..2)?;
        let value_len = usize::from(u16::from_be_bytes([
            *len_bytes.first()?,
            *len_bytes.get(1)?,
        ]));
        let rest = rest.get(2..)?;
        let value = rest.get(..value_len)?;
        self.rest = rest.get(value_len..)?;
        Some((std::str::from_utf8(key).ok()?, value))
    }
}

/// A W3C trace context (`traceparent`, version 0) in its 26 bytes: version, trace id, parent
/// span id, flags. What the core carries so a delivery can continue its sender's trace; the
/// `otel` feature converts it to and from OpenTelemetry's.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceContext {
    /// The trace id (never all zeros).
    pub trace_id: [u8; 16],
    /// The id of the span the message was sent in (never all zeros).
    pub span_id: [u8; 8],
    /// Trace flags (bit 0: sampled).
    pub flags: u8,
}

impl TraceContext {
    /// The encoded length: version, trace id, span id, flags.
    pub const LEN: usize = 26;

    /// A context, or `None` when either id is all zeros (invalid in W3C trace context).
    pub fn new(trace_id: [u8; 16], span_id: [u8; 8], flags: u8) -> Option<Self> {
        (trace_id != [0; 16] && span_id != [0; 8]).then_some(Self {
            trace_id,
            span_id,
            flags,
        })
    }

    /// True when the sampled flag is set.
    pub fn is_sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    /// The 26 bytes: version 0, trace id, span id, flags.
    pub fn to_bytes(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        let mut at: &mut [u8] = &mut out;
        at.put_u8(0);
        at.put_slice(&self.trace_id);
        at.put_slice(&self.span_id);
        at.put_u8(self.flags);
        out
    }

    /// Reads the 26 bytes; `None` for another length, a version other than 0 or zero ids.
    pub fn from_bytes(raw: &[u8]) -> Option<Self> {
        if raw.len() != Self::LEN || raw.first() != Some(&0) {
            return None;
        }
        let trace_id: [u8; 16] = raw.get(1..17)?.try_into().ok()?;
        let span_id: [u8; 8] = raw.get(17..25)?.try_into().ok()?;
        Self::new(trace_id, span_id, *raw.get(25)?)
    }

    /// The W3C text form, `00-<trace id>-<span id>-<flags>` in lowercase hex (what an HTTP
    /// `traceparent` header carries).
    pub fn to_traceparent(&self) -> String {
        use fmt::Write;
        let mut s = String::with_capacity(55);
        s.push_str("00-");
        for b in self.trace_id {
            let _ = write!(s, "{b:02x}");
        }
        s.push('-');
        for b in self.span_id {
            let _ = write!(s, "{b:02x}");
        }
        let _ = write!(s, "-{:02x}", self.flags);
        s
    }

    /// Parses the W3C text form (version `00`); `None` when it is not one.
    pub fn parse_traceparent(text: &str) -> Option<Self> {
        let mut parts = text.trim().split('-');
        let (version, trace, span, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || version != "00" {
            return None;
        }
        let mut trace_id = [0u8; 16];
        let mut span_id = [0u8; 8];
        let mut flag = [0u8; 1];
        hex_into(trace, &mut trace_id)?;
        hex_into(span, &mut span_id)?;
        hex_into(flags, &mut flag)?;
        Self::new(trace_id, span_id, u8::from_be_bytes(flag))
    }
}

fn hex_into(text: &str, out: &mut [u8]) -> Option<()> {
    let text = text.as_bytes();
    if text.len() != out.len().saturating_mul(2) {
        return None;
    }
    // W3C trace context is lowercase hex only.
    if !text.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    for (byte, pair) in out.iter_mut().zip(text.chunks_exact(2)) {
        *byte = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(())
}

impl fmt::Debug for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_traceparent())
    }
}

impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_traceparent())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> TraceContext {
        TraceContext::new([0xab; 16], [0x01, 2, 3, 4, 5, 6, 7, 8], 1).unwrap()
    }

    #[test]
    fn empty_headers_cost_nothing() {
        let h = Headers::new();
        assert!(h.is_empty());
        assert_eq!(h.wire_len(), 0);
        assert_eq!(std::mem::size_of::<Headers>(), std::mem::size_of::<usize>());
        let mut out = BytesMut::new();
        h.put(&mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn round_trip_keeps_order_and_repeats() {
        let h = Headers::new()
            .with("tenant", "acme")
            .unwrap()
            .with("x-id", [0u8, 255])
            .unwrap()
            .with("tenant", "other")
            .unwrap();
        let mut out = BytesMut::new();
        h.put(&mut out);
        assert_eq!(out.len(), h.wire_len());
        let mut body = out.freeze();
        let back = Headers::take(&mut body).unwrap();
        assert!(body.is_empty());
        assert_eq!(back, h);
        assert_eq!(back.len(), 3);
        assert_eq!(back.get_str("tenant"), Some("acme"));
        assert_eq!(back.get("x-id"), Some(&[0u8, 255][..]));
        let all: Vec<_> = back.iter().map(|(k, _)| k).collect();
        assert_eq!(all, ["tenant", "x-id", "tenant"]);
    }

    #[test]
    fn layout_is_byte_exact() {
        let h = Headers::new().with("a", "xy").unwrap();
        let mut out = BytesMut::new();
        h.put(&mut out);
        assert_eq!(&out[..], &[0, 7, 1, 1, b'a', 0, 2, b'x', b'y']);
    }

    #[test]
    fn bad_keys_and_values_are_refused() {
        let mut h = Headers::new();
        for key in ["", "Tenant", "a b", "ключ", &"k".repeat(65)] {
            assert_eq!(
                h.insert(key, "v").unwrap_err().id(),
                ErrorId::InvalidHeader,
                "{key:?}"
            );
        }
        assert_eq!(
            h.insert("big", vec![0u8; 65_536]).unwrap_err().id(),
            ErrorId::InvalidHeader
        );
        assert_eq!(
            h.insert(TRACEPARENT, "00-xyz").unwrap_err().id(),
            ErrorId::InvalidHeader
        );
        assert!(h.is_empty());
        h.insert("big", vec![0u8; 65_000]).unwrap();
        assert_eq!(
            h.insert("more", vec![0u8; 600]).unwrap_err().id(),
            ErrorId::HeadersTooLarge
        );
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn malformed_blocks_are_refused() {
        let cases: &[&[u8]] = &[
            &[0],                            // truncated length
            &[0, 1, 1],                      // no entries
            &[0, 9, 1, 1, b'a'],             // past the body
            &[0, 3, 1, 0, 0],                // empty key
            &[0, 6, 1, 1, b'A', 0, 0],       // key outside the alphabet
            &[0, 5, 1, 1, b'a', 0],          // value length cut
            &[0, 6, 1, 1, b'a', 0, 5],       // value past the block
            &[0, 7, 1, 5, b'a', b'b', 0, 0], // key past the block
        ];
        for raw in cases {
            let mut body = Bytes::copy_from_slice(raw);
            assert!(Headers::take(&mut body).is_err(), "{raw:?}");
        }
    }

    #[test]
    fn another_version_is_kept_raw() {
        let mut body = Bytes::from_static(&[0, 3, 9, 0xff, 0xff, b'p']);
        let h = Headers::take(&mut body).unwrap();
        assert_eq!(h.version(), Some(9));
        assert_eq!(h.iter().count(), 0);
        assert_eq!(&body[..], b"p");
    }

    #[test]
    fn trace_context_both_forms() {
        let c = ctx();
        assert_eq!(TraceContext::from_bytes(&c.to_bytes()), Some(c));
        let text = c.to_traceparent();
        assert_eq!(
            text,
            "00-abababababababababababababababab-0102030405060708-01"
        );
        assert_eq!(TraceContext::parse_traceparent(&text), Some(c));
        assert!(c.is_sampled());
        for bad in [
            "01-abababababababababababababababab-0102030405060708-01",
            "00-00000000000000000000000000000000-0102030405060708-01",
            "00-abababababababababababababababab-0000000000000000-01",
            "00-ABABABABABABABABABABABABABABABAB-0102030405060708-01",
            "00-abab-0102030405060708-01",
            "00-abababababababababababababababab-0102030405060708-01-x",
        ] {
            assert_eq!(TraceContext::parse_traceparent(bad), None, "{bad}");
        }
        let mut h = Headers::new().with("a", "b").unwrap();
        h.set_trace_context(c).unwrap();
        h.set_trace_context(c).unwrap();
        assert_eq!(h.len(), 2);
        assert_eq!(h.trace_context(), Some(c));
        assert_eq!(h.remove(TRACEPARENT), 1);
        assert_eq!(h.trace_context(), None);
    }

    #[test]
    fn debug_hides_values() {
        let h = Headers::new().with("authorization", "secret").unwrap();
        let shown = format!("{h:?}");
        assert!(
            shown.contains("authorization") && !shown.contains("secret"),
            "{shown}"
        );
    }
}
