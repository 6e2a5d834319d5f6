//! Ready [`MessageCodec`]s for serde types (feature `serde`): [`Cbor`] (compact, binary,
//! self-describing; ciborium) and [`Json`] (serde_json). The typed receive side they go with
//! is [`Taberna::recv_typed`](crate::Taberna::recv_typed) and
//! [`TypedRequest`](crate::TypedRequest).
//!
//! ```no_run
//! # async fn run(a: vicus::Domus, b: vicus::Domus) -> Result<(), vicus::Error> {
//! use vicus::codec::Cbor;
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct Order { id: u64, items: Vec<String> }
//! const ORDER: vicus::MessageType = vicus::MessageType::app(7);
//!
//! let orders = b.taberna(vicus::TabernaId(5))?;
//! tokio::spawn(async move {
//!     while let Some(order) = orders.recv_typed(&Cbor::<Order>::new()).await {
//!         println!("order {} with {} items", order.message.id, order.message.items.len());
//!         order.request.accept();
//!     }
//! });
//! let codec = Cbor::<Order>::new();
//! let order = Order { id: 1, items: vec!["tea".into()] };
//! a.send_typed(&codec, vicus::TabernaId(5), ORDER, &order, Default::default()).await?;
//! # Ok(()) }
//! ```
//!
//! Pure encoding and decoding: nothing here touches a socket or the domus. A payload that does
//! not decode is refused with [`ErrorId::DecodeFailure`] —
//! the sender's send fails with that id and the handler never sees it.

use std::fmt;
use std::marker::PhantomData;

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, ErrorId};
use crate::taberna::MessageCodec;

/// The CBOR codec for `T` (RFC 8949, through ciborium): compact, binary and
/// self-describing, so a reader that knows fewer fields than the writer still decodes.
pub struct Cbor<T>(PhantomData<fn() -> T>);

/// The JSON codec for `T` (serde_json): for payloads people and other languages read.
pub struct Json<T>(PhantomData<fn() -> T>);

macro_rules! codec_common {
    ($codec:ident, $name:literal) => {
        impl<T> $codec<T> {
            /// The codec.
            pub const fn new() -> Self {
                Self(PhantomData)
            }
        }

        impl<T> Default for $codec<T> {
            fn default() -> Self {
                Self::new()
            }
        }

        impl<T> Clone for $codec<T> {
            fn clone(&self) -> Self {
                *self
            }
        }

        impl<T> Copy for $codec<T> {}

        impl<T> fmt::Debug for $codec<T> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}<{}>", $name, std::any::type_name::<T>())
            }
        }
    };
}

codec_common!(Cbor, "Cbor");
codec_common!(Json, "Json");

/// The error of a payload that does not decode as `T`.
fn decode_failure<T>(format: &str, e: impl fmt::Display) -> Error {
    Error::new(
        ErrorId::DecodeFailure,
        format!(
            "the payload is not {format} for {}: {e}",
            std::any::type_name::<T>()
        ),
    )
}

/// The error of a message that does not encode.
fn encode_failure<T>(format: &str, e: impl fmt::Display) -> Error {
    Error::new(
        ErrorId::InvalidConfig,
        format!(
            "a {} does not encode as {format}: {e}",
            std::any::type_name::<T>()
        ),
    )
}

impl<T> MessageCodec for Cbor<T>
where
    T: Serialize + DeserializeOwned + Send + 'static,
{
    type Message = T;

    fn encode(&self, message: &T) -> Result<Bytes, Error> {
        let mut out = Vec::new();
        ciborium::into_writer(message, &mut out).map_err(|e| encode_failure::<T>("CBOR", e))?;
        Ok(Bytes::from(out))
    }

    fn decode(&self, bytes: &Bytes) -> Result<T, Error> {
        ciborium::from_reader(bytes.as_ref()).map_err(|e| decode_failure::<T>("CBOR", e))
    }
}

impl<T> MessageCodec for Json<T>
where
    T: Serialize + DeserializeOwned + Send + 'static,
{
    type Message = T;

    fn encode(&self, message: &T) -> Result<Bytes, Error> {
        serde_json::to_vec(message)
            .map(Bytes::from)
            .map_err(|e| encode_failure::<T>("JSON", e))
    }

    fn decode(&self, bytes: &Bytes) -> Result<T, Error> {
        serde_json::from_slice(bytes).map_err(|e| decode_failure::<T>("JSON", e))
    }
}
