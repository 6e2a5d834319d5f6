//! Who may use the gateway: [`Access`] (open, bearer tokens, or client certificates verified by
//! [`serve_tls`](super::serve_tls)) and the constant-time check of an `Authorization` header.
//!
//! Pure: no IO. Tokens are held in wiped buffers, never printed (`Debug` shows how many there
//! are, not what they are) and never logged; a presented token is compared with every
//! configured one in constant time (`subtle`), so neither which token matched nor how many
//! leading bytes of one were right shows in the timing. A token's *length* can show: tokens
//! shorter than [`MIN_TOKEN_LEN`] are refused at configuration.

use std::fmt;

use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::a0_transport::DomusId;
use crate::error::{Error, ErrorId};

/// The shortest bearer token accepted in a configuration, in bytes (16 random bytes as hex or
/// base64 is longer; a short token could be guessed).
pub const MIN_TOKEN_LEN: usize = 16;

/// The longest bearer token accepted (an `Authorization` header is bounded by the server too).
pub const MAX_TOKEN_LEN: usize = 4096;

/// Who may call the gateway's protected routes (`/tabernas/…` and `/metrics`; `/healthz` is
/// always open and tells nothing but "ok").
#[derive(Clone, Default)]
#[non_exhaustive]
pub enum Access {
    /// Anyone who can reach the listener. [`serve`](super::serve) refuses it on a listener
    /// that is not bound to a loopback address unless
    /// [`GatewayConfig::dangerous_open_on_any_address`](super::GatewayConfig::dangerous_open_on_any_address)
    /// says so.
    #[default]
    Open,
    /// `Authorization: Bearer <token>` with one of these tokens.
    Bearer(BearerTokens),
    /// A client certificate verified in the TLS handshake of
    /// [`serve_tls`](super::serve_tls) (whose [`GatewayTls`](super::GatewayTls) says which
    /// identities may connect). A request that did not come through such a handshake (the
    /// router mounted elsewhere, or [`serve`](super::serve), which refuses this access) is
    /// 401.
    MutualTls,
}

/// The identity of the client certificate verified on a request's connection, put in the
/// request's extensions by [`serve_tls`](super::serve_tls) (a handler nested beside the
/// gateway's routes can read it too).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedClient(pub DomusId);

impl fmt::Debug for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Open => f.write_str("Open"),
            Self::Bearer(t) => f.debug_tuple("Bearer").field(t).finish(),
            Self::MutualTls => f.write_str("MutualTls"),
        }
    }
}

/// A set of accepted bearer tokens (at least one).
#[derive(Clone)]
pub struct BearerTokens {
    tokens: Vec<Zeroizing<Vec<u8>>>,
}

impl fmt::Debug for BearerTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BearerTokens([{} redacted])", self.tokens.len())
    }
}

impl BearerTokens {
    /// The accepted tokens; refused with `InvalidConfig` when there are none, or one is shorter
    /// than [`MIN_TOKEN_LEN`], longer than [`MAX_TOKEN_LEN`], or holds a byte a header value
    /// cannot carry (a control character or a space).
    pub fn new<T: AsRef<[u8]>>(tokens: impl IntoIterator<Item = T>) -> Result<Self, Error> {
        let mut kept = Vec::new();
        for (n, t) in tokens.into_iter().enumerate() {
            let t = t.as_ref();
            if !(MIN_TOKEN_LEN..=MAX_TOKEN_LEN).contains(&t.len()) {
                return Err(Error::new(
                    ErrorId::InvalidConfig,
                    format!(
                        "bearer token #{}: {} bytes, outside {MIN_TOKEN_LEN}..={MAX_TOKEN_LEN}",
                        n + 1,
                        t.len()
                    ),
                ));
            }
            if t.iter().any(|b| !b.is_ascii_graphic()) {
                return Err(Error::new(
                    ErrorId::InvalidConfig,
                    format!(
                        "bearer token #{}: only visible ASCII characters (no spaces)",
                        n + 1
                    ),
                ));
            }
            kept.push(Zeroizing::new(t.to_vec()));
        }
        if kept.is_empty() {
            return Err(Error::new(
                ErrorId::InvalidConfig,
                "bearer tokens: none given (use Access::Open for no access control)",
            ));
        }
        Ok(Self { tokens: kept })
    }

    /// How many tokens are accepted.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Never true (a set holds at least one token); for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Whether `presented` is one of the tokens: every token is compared, each in constant
    /// time.
    fn accepts(&self, presented: &[u8]) -> bool {
        let mut found = subtle::Choice::from(0);
        for t in &self.tokens {
            found |= t.as_slice().ct_eq(presented);
        }
        found.into()
    }
}

impl Access {
    /// Whether a request with this `Authorization` header value (if any), on a connection
    /// whose client certificate was verified as `verified` (if any), may pass.
    pub(super) fn allows(
        &self,
        authorization: Option<&[u8]>,
        verified: Option<&VerifiedClient>,
    ) -> bool {
        match self {
            Self::Open => true,
            Self::MutualTls => verified.is_some(),
            Self::Bearer(tokens) => {
                let Some(value) = authorization else {
                    return false;
                };
                // The scheme is case-insensitive (RFC 9110 §11.1); one space before the token.
                match value.split_at_checked(7) {
                    Some((scheme, token)) if scheme.eq_ignore_ascii_case(b"bearer ") => {
                        tokens.accepts(token)
                    }
                    _ => false,
                }
            }
        }
    }

    /// Whether anyone may call the protected routes.
    pub fn is_open(&self) -> bool {
        matches!(self, Self::Open)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_checked_and_never_printed() {
        let tokens =
            BearerTokens::new(["0123456789abcdef-one", "0123456789abcdef-two"]).expect("tokens");
        let access = Access::Bearer(tokens);
        assert!(access.allows(Some(b"Bearer 0123456789abcdef-two"), None));
        assert!(access.allows(Some(b"bearer 0123456789abcdef-one"), None));
        assert!(!access.allows(Some(b"Bearer 0123456789abcdef-on"), None));
        assert!(!access.allows(Some(b"Bearer 0123456789abcdef-one "), None));
        assert!(!access.allows(Some(b"Basic 0123456789abcdef-one"), None));
        assert!(!access.allows(Some(b"Bearer"), None));
        assert!(!access.allows(None, None));
        let shown = format!("{access:?}");
        assert!(!shown.contains("abcdef"), "{shown}");
        assert!(Access::Open.allows(None, None));
        assert!(!Access::MutualTls.allows(Some(b"Bearer 0123456789abcdef-one"), None));
        let client = VerifiedClient(DomusId::spiffe("vicus.dev", "c").expect("id"));
        assert!(Access::MutualTls.allows(None, Some(&client)));
    }

    #[test]
    fn weak_or_empty_token_sets_are_refused() {
        for bad in [vec!["short"], vec![], vec!["0123456789abcdef with space"]] {
            let e = BearerTokens::new(bad).expect_err("refused");
            assert_eq!(e.id(), ErrorId::InvalidConfig);
        }
    }
}
