//! The one place values are encoded: a format byte followed by postcard.
//!
//! The format byte lets a later release change a record's layout and still
//! read what an older one wrote.

use serde::{Serialize, de::DeserializeOwned};

/// Current value format.
const FORMAT_V1: u8 = 1;

/// Errors decoding or encoding a value.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The value is empty or carries a format this build does not know.
    #[error("unknown value format {0:?}")]
    UnknownFormat(Option<u8>),
    /// postcard failed.
    #[error("postcard: {0}")]
    Postcard(#[from] postcard::Error),
}

impl From<CodecError> for std::io::Error {
    fn from(e: CodecError) -> Self {
        std::io::Error::new(std::io::ErrorKind::InvalidData, e)
    }
}

/// Encodes a stored value (with its format byte).
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    let mut out = vec![FORMAT_V1];
    out.extend_from_slice(&postcard::to_allocvec(value)?);
    Ok(out)
}

/// Decodes a value written by [`encode`].
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    match bytes.split_first() {
        Some((&FORMAT_V1, rest)) => Ok(postcard::from_bytes(rest)?),
        other => Err(CodecError::UnknownFormat(other.map(|(b, _)| *b))),
    }
}

/// Encodes a wire message (peer RPC payloads: no format byte, both ends run
/// the same build family and the proto carries the framing).
pub fn to_wire<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    Ok(postcard::to_allocvec(value)?)
}

/// Decodes a wire message written by [`to_wire`].
pub fn from_wire<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    Ok(postcard::from_bytes(bytes)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_unknown_format() {
        let v = (7u64, b"x".to_vec());
        let bytes = encode(&v).unwrap();
        assert_eq!(decode::<(u64, Vec<u8>)>(&bytes).unwrap(), v);
        let mut bad = bytes.clone();
        bad[0] = 9;
        assert!(matches!(
            decode::<(u64, Vec<u8>)>(&bad),
            Err(CodecError::UnknownFormat(Some(9)))
        ));
        assert!(decode::<u64>(&[]).is_err());
    }
}
