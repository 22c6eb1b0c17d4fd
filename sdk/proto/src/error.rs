//! Stable error codes and decode errors.

use std::fmt;

/// A stable error code carried in error frames and refusals. Unknown codes
/// from a newer peer decode as [`ErrorCode::Other`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    /// A frame could not be decoded.
    BadFrame,
    /// A frame exceeded the size limit.
    FrameTooLarge,
    /// A collection or name exceeded its limit.
    LimitExceeded,
    /// No common protocol version.
    UnsupportedVersion,
    /// A frame arrived out of order (e.g. a request before `Hello`).
    Protocol,
    /// The principal may not do this.
    Unauthorized,
    /// A name or argument is malformed.
    Invalid,
    /// The named object does not exist.
    NotFound,
    /// The object exists with other settings.
    Conflict,
    /// No queue matched the topic.
    NoRoute,
    /// A queue is full.
    QueueFull,
    /// A quota or size limit was exceeded.
    QuotaExceeded,
    /// A plugin failed or refused.
    PluginFailed,
    /// Storage failed; nothing was confirmed.
    Storage,
    /// The server is shutting down.
    ShuttingDown,
    /// Anything else.
    Internal,
    /// A code this version does not know.
    Other,
    /// This cluster node is not the leader; the message names the leader's
    /// address after `the leader is at ` (or says it is unknown). Nothing
    /// was done: retry on the leader.
    NotLeader,
}

impl ErrorCode {
    const ALL: [ErrorCode; 18] = [
        ErrorCode::BadFrame,
        ErrorCode::FrameTooLarge,
        ErrorCode::LimitExceeded,
        ErrorCode::UnsupportedVersion,
        ErrorCode::Protocol,
        ErrorCode::Unauthorized,
        ErrorCode::Invalid,
        ErrorCode::NotFound,
        ErrorCode::Conflict,
        ErrorCode::NoRoute,
        ErrorCode::QueueFull,
        ErrorCode::QuotaExceeded,
        ErrorCode::PluginFailed,
        ErrorCode::Storage,
        ErrorCode::ShuttingDown,
        ErrorCode::Internal,
        ErrorCode::Other,
        ErrorCode::NotLeader,
    ];

    /// The numeric code on the wire.
    pub fn to_u16(self) -> u16 {
        self as u16
    }

    /// The code for a number; unknown numbers map to [`ErrorCode::Other`].
    pub fn from_u16(n: u16) -> Self {
        Self::ALL
            .get(usize::from(n))
            .copied()
            .unwrap_or(ErrorCode::Other)
    }

    /// Stable lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::LimitExceeded => "limit_exceeded",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::Protocol => "protocol",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Invalid => "invalid",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Conflict => "conflict",
            ErrorCode::NoRoute => "no_route",
            ErrorCode::QueueFull => "queue_full",
            ErrorCode::QuotaExceeded => "quota_exceeded",
            ErrorCode::PluginFailed => "plugin_failed",
            ErrorCode::Storage => "storage",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Internal => "internal",
            ErrorCode::Other => "other",
            ErrorCode::NotLeader => "not_leader",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why bytes could not be decoded into a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The length prefix announces more than the limit.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame ({buffered} bytes buffered)")]
    Truncated {
        /// Bytes left over.
        buffered: usize,
    },
    /// The bytes are not a valid frame.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// A collection or name exceeds its limit.
    #[error("{what} exceeds the limit of {max}")]
    Limit {
        /// What overflowed.
        what: &'static str,
        /// Limit.
        max: usize,
    },
}

impl DecodeError {
    /// The code to report to the peer.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::TooLarge { .. } => ErrorCode::FrameTooLarge,
            DecodeError::Limit { .. } => ErrorCode::LimitExceeded,
            DecodeError::Truncated { .. } | DecodeError::Malformed(_) => ErrorCode::BadFrame,
        }
    }
}

impl bincode::Encode for ErrorCode {
    fn encode<E: bincode::enc::Encoder>(
        &self,
        e: &mut E,
    ) -> Result<(), bincode::error::EncodeError> {
        self.to_u16().encode(e)
    }
}

impl<C> bincode::Decode<C> for ErrorCode {
    fn decode<D: bincode::de::Decoder<Context = C>>(
        d: &mut D,
    ) -> Result<Self, bincode::error::DecodeError> {
        Ok(Self::from_u16(u16::decode(d)?))
    }
}

impl<'de, C> bincode::BorrowDecode<'de, C> for ErrorCode {
    fn borrow_decode<D: bincode::de::BorrowDecoder<'de, Context = C>>(
        d: &mut D,
    ) -> Result<Self, bincode::error::DecodeError> {
        Ok(Self::from_u16(<u16 as bincode::Decode<C>>::decode(d)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_stable_and_unknown_ones_degrade() {
        for (i, c) in ErrorCode::ALL.iter().enumerate() {
            assert_eq!(c.to_u16() as usize, i);
            assert_eq!(ErrorCode::from_u16(c.to_u16()), *c);
        }
        assert_eq!(ErrorCode::from_u16(999), ErrorCode::Other);
        // Codes added later go after `other`: earlier numbers never move.
        assert_eq!(ErrorCode::Other.to_u16(), 16);
        assert_eq!(ErrorCode::NotLeader.to_u16(), 17);
        assert_eq!(ErrorCode::NotLeader.as_str(), "not_leader");
    }
}
