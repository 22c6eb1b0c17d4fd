//! The Sluice wire protocol: frames and their codec, with no I/O.
//!
//! # Model
//!
//! A client opens one QUIC connection (TLS 1.3, ALPN `sluice/1`, client
//! certificate required) and one bidirectional **control stream**. Every
//! client-to-server frame travels on it: [`Frame::Hello`] first, then
//! requests, publishes and acks. The server answers on the same stream
//! ([`Frame::Welcome`], responses, confirms, refusals, errors) and opens one
//! unidirectional **delivery stream** per subscription, whose first frame is
//! [`Frame::StreamStart`] and the rest [`Frame::Deliver`] batches, so a slow
//! consumer never blocks another.
//!
//! # Framing
//!
//! Each frame is a little-endian `u32` length followed by that many bytes:
//! the bincode 2 encoding (standard config) of a [`Frame`]. Many frames are
//! coalesced into one stream write ([`encode`] appends to a buffer) and a
//! [`Decoder`] takes whatever a read returned.
//!
//! # Bounds
//!
//! Decoding is bounded before anything is allocated: a length prefix over
//! [`Limits::max_frame`] is refused without reading the body; bincode runs
//! with a byte limit sized to the body (the smallest of a few fixed limits at
//! or above 64 × its length + 4 KiB), so a lying inner length cannot make a
//! small frame reserve much more memory than it occupies; then every
//! collection and name is checked against [`Limits`]
//! ([`Frame::validate`]). Errors carry a stable [`ErrorCode`].
//!
//! # Flow
//!
//! - Publishes carry a client sequence number; the server answers each with
//!   a [`Frame::Confirm`] (ranges of consecutive sequence numbers, with the
//!   number of queues each message reached) or a [`Frame::Refused`].
//! - A consumer holds at most `prefetch` unacked deliveries; acks, nacks and
//!   rejects carry ranges of delivery tags.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod codec;
mod error;
mod frame;
mod limits;

pub use codec::{Decoder, HARD_MAX_FRAME, encode, encode_frame};
pub use error::{DecodeError, ErrorCode};
pub use frame::{
    ClusterSummary, Delivery, ErrorBody, FollowerSummary, Frame, Overflow, PluginSummary,
    QueueDecl, QueueSummary, Request, Response, TenantQuota, TenantSummary, TenantUsage,
};
pub use limits::Limits;

/// ALPN protocol id negotiated in TLS.
pub const ALPN: &[u8] = b"sluice/1";
/// Oldest protocol version this crate speaks.
pub const MIN_VERSION: u16 = 1;
/// Newest protocol version this crate speaks.
pub const MAX_VERSION: u16 = 1;
/// Subscriptions one connection may hold. The broker opens one
/// unidirectional stream per subscription and refuses more with
/// `limit_exceeded`; a client must accept this many concurrent streams.
pub const MAX_SUBSCRIPTIONS: u32 = 1024;

/// Pick the protocol version for a client offering `min..=max`.
pub fn negotiate(min: u16, max: u16) -> Result<u16, ErrorBody> {
    let v = max.min(MAX_VERSION);
    if min > max || v < min || v < MIN_VERSION {
        return Err(ErrorBody::new(
            ErrorCode::UnsupportedVersion,
            format!("client speaks versions {min}..={max}, server {MIN_VERSION}..={MAX_VERSION}"),
        ));
    }
    Ok(v)
}

/// Compress sorted or unsorted tags into inclusive ranges.
pub fn to_ranges(tags: &[u64]) -> Vec<(u64, u64)> {
    let mut sorted = tags.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for t in sorted {
        match out.last_mut() {
            Some((_, end)) if *end + 1 == t => *end = t,
            _ => out.push((t, t)),
        }
    }
    out
}

/// Expand inclusive ranges, refusing more than `max` tags in total.
pub fn from_ranges(ranges: &[(u64, u64)], max: usize) -> Result<Vec<u64>, DecodeError> {
    let mut out = Vec::new();
    for &(a, b) in ranges {
        if b < a || (b - a) as usize >= max.saturating_sub(out.len()) {
            return Err(DecodeError::Limit {
                what: "acknowledged tags",
                max,
            });
        }
        out.extend(a..=b);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert_eq!(negotiate(1, 1).unwrap(), 1);
        assert_eq!(negotiate(1, 9).unwrap(), 1);
        assert_eq!(
            negotiate(2, 3).unwrap_err().code,
            ErrorCode::UnsupportedVersion
        );
        assert!(negotiate(3, 1).is_err());
    }

    #[test]
    fn ranges_round_trip() {
        let tags = [5, 1, 2, 3, 9, 10, 2];
        let r = to_ranges(&tags);
        assert_eq!(r, vec![(1, 3), (5, 5), (9, 10)]);
        assert_eq!(from_ranges(&r, 100).unwrap(), vec![1, 2, 3, 5, 9, 10]);
        assert!(from_ranges(&[(0, u64::MAX)], 1000).is_err());
        assert!(from_ranges(&[(5, 1)], 1000).is_err());
    }
}
