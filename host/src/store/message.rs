//! The stored form of a message.

use super::StoreError;

/// A message as kept in a queue.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoredMessage {
    /// Topic it was published to.
    pub topic: String,
    /// Headers (after any filter replaced them).
    pub headers: Vec<(String, String)>,
    /// Payload (after any filter replaced it).
    pub payload: Vec<u8>,
    /// Publishing client.
    pub publisher: String,
    /// Broker receive time, ms since the epoch.
    pub timestamp_ms: u64,
    /// Expiry, ms since the epoch (0 = never).
    pub expires_at_ms: u64,
}

impl StoredMessage {
    /// Encode as stored: 8-byte expiry, then bincode.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + 64 + self.payload.len());
        out.extend_from_slice(&self.expires_at_ms.to_be_bytes());
        // Encoding into a Vec cannot fail for these plain types.
        if let Ok(body) = bincode::serde::encode_to_vec(self, bincode::config::standard()) {
            out.extend_from_slice(&body);
        }
        out
    }

    /// Decode a stored value.
    pub fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        let body = bytes
            .get(8..)
            .ok_or_else(|| StoreError::Corrupt("message value shorter than its header".into()))?;
        let config = bincode::config::standard().with_limit::<{ 256 << 20 }>();
        bincode::serde::decode_from_slice(body, config)
            .map(|(m, _)| m)
            .map_err(|e| StoreError::Corrupt(format!("message: {e}")))
    }
}

/// The expiry of a stored value without decoding the rest.
pub fn decode_expiry(bytes: &[u8]) -> Result<u64, StoreError> {
    bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| StoreError::Corrupt("message value shorter than its header".into()))
}
