//! The shape of a message the broker will store: it must still be
//! deliverable after everything the broker may add to it.
//!
//! A stored message is delivered in a `Deliver` frame, which the client's
//! decoder checks against the wire limits ([`sluice_proto::Limits`]). When
//! the broker dead-letters a message it adds two headers
//! (`x-death-reason`, `x-death-queue`), so every message is checked at
//! publish (and after a filter rewrote it) against the wire limits minus
//! that reserve: nothing stored can become undeliverable.

use sluice_proto::Limits;

/// Headers the broker adds when it dead-letters a message.
pub(crate) const DEATH_HEADERS: usize = 2;
/// Bytes (names + values) the dead-letter headers take at most: the reason
/// is cut to [`DEATH_REASON_BYTES`], the queue name is at most 255 bytes.
pub(crate) const DEATH_HEADER_BYTES: usize = 512;
/// Longest dead-letter reason kept in `x-death-reason`.
pub(crate) const DEATH_REASON_BYTES: usize = 200;

/// Check that a message with `headers` and `payload` can be stored and
/// delivered, dead-letter headers included. `max_bytes` bounds payload +
/// headers (the tenant's or the broker's message size). The error says
/// which bound and is refused with `limit_exceeded` by the caller.
pub(crate) fn check_storable(
    headers: &[(String, String)],
    payload: &[u8],
    max_bytes: usize,
) -> Result<(), String> {
    let wire = Limits::default();
    let max_headers = wire.max_headers - DEATH_HEADERS;
    if headers.len() > max_headers {
        return Err(format!(
            "{} headers (at most {max_headers}: {DEATH_HEADERS} are reserved for dead-lettering)",
            headers.len()
        ));
    }
    let header_bytes: usize = headers.iter().map(|(k, v)| k.len() + v.len()).sum();
    let max_header_bytes = wire.max_header_bytes - DEATH_HEADER_BYTES;
    if header_bytes > max_header_bytes {
        return Err(format!(
            "{header_bytes} header bytes (at most {max_header_bytes}: {DEATH_HEADER_BYTES} are \
             reserved for dead-lettering)"
        ));
    }
    if payload.len() > wire.max_payload {
        return Err(format!(
            "a payload of {} bytes (at most {})",
            payload.len(),
            wire.max_payload
        ));
    }
    let size = payload.len() + header_bytes;
    if size > max_bytes {
        return Err(format!(
            "message of {size} bytes exceeds the maximum of {max_bytes} bytes"
        ));
    }
    Ok(())
}

/// Replace any dead-letter headers of `headers` with new ones for `reason`
/// and `queue`: repeated dead-lettering never grows a message beyond the
/// reserve that [`check_storable`] kept for it.
pub(crate) fn with_death_headers(headers: &mut Vec<(String, String)>, reason: &str, queue: &str) {
    headers.retain(|(k, _)| k != "x-death-reason" && k != "x-death-queue");
    headers.push((
        "x-death-reason".into(),
        crate::plugins::truncate(reason, DEATH_REASON_BYTES).to_string(),
    ));
    headers.push(("x-death-queue".into(), queue.to_string()));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(n: usize, each: usize) -> Vec<(String, String)> {
        (0..n)
            .map(|i| (format!("h{i}"), "v".repeat(each)))
            .collect()
    }

    #[test]
    fn a_storable_message_stays_deliverable_after_dead_lettering() {
        let wire = Limits::default();
        // The largest storable header set, dead-lettered with the longest
        // reason and queue name, still fits the wire limits.
        let max = wire.max_headers - DEATH_HEADERS;
        let mut h = headers(max, 1);
        let pad = wire.max_header_bytes
            - DEATH_HEADER_BYTES
            - h.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();
        h[0].1.push_str(&"x".repeat(pad));
        check_storable(&h, b"", usize::MAX).unwrap();
        with_death_headers(&mut h, &"r".repeat(5000), &"q".repeat(255));
        with_death_headers(&mut h, &"é".repeat(5000), &"q".repeat(255));
        assert_eq!(h.len(), wire.max_headers);
        let bytes: usize = h.iter().map(|(k, v)| k.len() + v.len()).sum();
        assert!(bytes <= wire.max_header_bytes, "{bytes}");
    }

    #[test]
    fn over_the_reserve_is_refused() {
        let wire = Limits::default();
        let e = check_storable(&headers(wire.max_headers, 1), b"", usize::MAX).unwrap_err();
        assert!(e.contains("reserved for dead-lettering"), "{e}");
        let big = vec![("k".to_string(), "v".repeat(wire.max_header_bytes - 100))];
        assert!(check_storable(&big, b"", usize::MAX).is_err());
        assert!(check_storable(&[], &vec![0; wire.max_payload + 1], usize::MAX).is_err());
        assert!(check_storable(&[], &[0; 11], 10).is_err());
    }
}
