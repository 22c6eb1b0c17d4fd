//! Length-prefixed framing and the incremental decoder.

use crate::error::DecodeError;
use crate::frame::Frame;
use crate::limits::Limits;

/// The largest frame any configuration may allow (bincode's byte limit).
pub const HARD_MAX_FRAME: usize = 64 << 20;

fn config() -> bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<HARD_MAX_FRAME>,
> {
    bincode::config::standard().with_limit::<HARD_MAX_FRAME>()
}

/// How many bytes of memory decoding may claim per body byte. bincode counts
/// the in-memory size of what it decodes against its byte limit, including a
/// collection's whole capacity *before* reading any element; a valid frame
/// claims at most ~24 bytes per encoded byte (an empty `String` is one byte on
/// the wire, 24 in memory). With the limit set from the body length, a small
/// frame declaring a huge collection is refused before reserving it.
const CLAIM_PER_BYTE: usize = 64;

/// Decode a frame body with a bincode limit proportional to its length: the
/// smallest of a few fixed limits (bincode's limit is a type parameter) at or
/// above `CLAIM_PER_BYTE` × the body plus 4 KiB, at most [`HARD_MAX_FRAME`].
fn decode_body(body: &[u8]) -> Result<(Frame, usize), bincode::error::DecodeError> {
    fn limited<const N: usize>(body: &[u8]) -> Result<(Frame, usize), bincode::error::DecodeError> {
        bincode::decode_from_slice(body, bincode::config::standard().with_limit::<N>())
    }
    let need = body
        .len()
        .saturating_mul(CLAIM_PER_BYTE)
        .saturating_add(4 << 10);
    if need <= 64 << 10 {
        limited::<{ 64 << 10 }>(body)
    } else if need <= 256 << 10 {
        limited::<{ 256 << 10 }>(body)
    } else if need <= 1 << 20 {
        limited::<{ 1 << 20 }>(body)
    } else if need <= 4 << 20 {
        limited::<{ 4 << 20 }>(body)
    } else if need <= 16 << 20 {
        limited::<{ 16 << 20 }>(body)
    } else {
        bincode::decode_from_slice(body, config())
    }
}

/// Append `frame` (length prefix + body) to `out`.
pub fn encode(frame: &Frame, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    // Encoding plain data into a Vec only fails past the byte limit; such a
    // frame is refused by the peer's decoder anyway.
    let _ = bincode::encode_into_std_write(frame, out, config());
    let len = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
}

/// Encode one frame into a new buffer.
pub fn encode_frame(frame: &Frame) -> Vec<u8> {
    let mut out = Vec::new();
    encode(frame, &mut out);
    out
}

/// Incremental decoder: push bytes as they arrive, pull frames.
#[derive(Debug)]
pub struct Decoder {
    limits: Limits,
    buf: Vec<u8>,
    pos: usize,
}

impl Decoder {
    /// A decoder enforcing `limits`.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            buf: Vec::new(),
            pos: 0,
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Add received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else if self.pos > (64 << 10) && self.pos * 2 > self.buf.len() {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes received but not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed. After
    /// an error the stream is unusable (framing is lost).
    pub fn next_frame(&mut self) -> Result<Option<Frame>, DecodeError> {
        let avail = &self.buf[self.pos..];
        let Some(prefix) = avail.get(..4) else {
            return Ok(None);
        };
        let len = u32::from_le_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
        let max = self.limits.max_frame.min(HARD_MAX_FRAME);
        if len > max {
            return Err(DecodeError::TooLarge { len, max });
        }
        let Some(body) = avail.get(4..4 + len) else {
            return Ok(None);
        };
        let (frame, used) = decode_body(body).map_err(|e| DecodeError::Malformed(e.to_string()))?;
        if used != len {
            return Err(DecodeError::Malformed(format!(
                "{} trailing bytes after the frame",
                len - used
            )));
        }
        self.pos += 4 + len;
        frame.validate(&self.limits)?;
        Ok(Some(frame))
    }

    /// Call at end of stream: an error if a partial frame is left.
    pub fn finish(&self) -> Result<(), DecodeError> {
        match self.buffered() {
            0 => Ok(()),
            n => Err(DecodeError::Truncated { buffered: n }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;
    use crate::frame::*;
    use proptest::prelude::*;

    fn samples() -> Vec<Frame> {
        vec![
            Frame::Hello {
                min_version: 1,
                max_version: 1,
                agent: "test".into(),
            },
            Frame::Welcome {
                version: 1,
                tenant: "acme".into(),
                client: "c".into(),
                admin: false,
                max_message: 1 << 20,
            },
            Frame::Request {
                id: 7,
                tenant: Some("acme".into()),
                body: Request::Declare(QueueDecl {
                    name: "q".into(),
                    durable: true,
                    max_length: Some(10),
                    overflow: Overflow::DropHead,
                    ttl_ms: Some(1000),
                    dead_letter: Some("dlq".into()),
                    delivery_limit: Some(3),
                }),
            },
            Frame::Request {
                id: 8,
                tenant: None,
                body: Request::Subscribe {
                    queue: "q".into(),
                    prefetch: 10,
                },
            },
            Frame::Request {
                id: 9,
                tenant: None,
                body: Request::LoadPlugin {
                    name: "p".into(),
                    kind: "filter".into(),
                    queue: Some("q".into()),
                    wasm: vec![0, 97, 115, 109],
                    config: vec![("k".into(), "v".into())],
                },
            },
            Frame::Response {
                id: 7,
                body: Ok(Response::Subscribed { sub: 3 }),
            },
            Frame::Response {
                id: 8,
                body: Err(ErrorBody::new(ErrorCode::NotFound, "queue `x` not found")),
            },
            Frame::Response {
                id: 9,
                body: Ok(Response::Queues(vec![QueueSummary {
                    name: "q".into(),
                    durable: true,
                    ready: 1,
                    unacked: 2,
                    bytes: 3,
                    consumers: 4,
                    published: 5,
                    dead_lettered: 6,
                    filters: vec!["f".into()],
                }])),
            },
            Frame::Publish {
                seq: 1,
                tenant: None,
                topic: "a.b".into(),
                headers: vec![("k".into(), "v".into())],
                payload: b"hello".to_vec(),
            },
            Frame::Confirm {
                first: 1,
                queues: vec![1, 2, 0],
            },
            Frame::Refused {
                seq: 4,
                error: ErrorBody::new(ErrorCode::NoRoute, "no route"),
            },
            Frame::StreamStart { sub: 3 },
            Frame::Deliver {
                sub: 3,
                deliveries: vec![Delivery {
                    tag: 1,
                    topic: "a".into(),
                    headers: vec![],
                    payload: vec![1, 2],
                    redelivered: true,
                }],
            },
            Frame::Ack {
                sub: 3,
                ranges: vec![(1, 5)],
            },
            Frame::Nack {
                sub: 3,
                ranges: vec![(6, 6)],
            },
            Frame::Reject {
                sub: 3,
                ranges: vec![(7, 9)],
            },
            Frame::Cancel { sub: 3 },
            Frame::Error(ErrorBody::new(ErrorCode::BadFrame, "bad")),
        ]
    }

    #[test]
    fn every_frame_round_trips_even_split_at_every_byte() {
        let mut wire = Vec::new();
        for f in samples() {
            encode(&f, &mut wire);
        }
        for split in 0..wire.len() {
            let mut d = Decoder::new(Limits::default());
            let mut got = Vec::new();
            for chunk in [&wire[..split], &wire[split..]] {
                d.push(chunk);
                while let Some(f) = d.next_frame().unwrap() {
                    got.push(f);
                }
            }
            assert_eq!(got, samples());
            d.finish().unwrap();
        }
    }

    #[test]
    fn oversize_prefix_is_refused_before_reading() {
        let mut d = Decoder::new(Limits {
            max_frame: 100,
            ..Limits::default()
        });
        d.push(&1000u32.to_le_bytes());
        assert_eq!(
            d.next_frame(),
            Err(DecodeError::TooLarge {
                len: 1000,
                max: 100
            })
        );
        assert_eq!(d.next_frame().unwrap_err().code(), ErrorCode::FrameTooLarge);
    }

    #[test]
    fn truncated_and_garbage_inputs() {
        let wire = encode_frame(&samples()[0]);
        let mut d = Decoder::new(Limits::default());
        d.push(&wire[..wire.len() - 1]);
        assert_eq!(d.next_frame(), Ok(None));
        assert!(matches!(d.finish(), Err(DecodeError::Truncated { .. })));

        let mut d = Decoder::new(Limits::default());
        d.push(&[5, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(d.next_frame(), Err(DecodeError::Malformed(_))));

        // A vector claiming 2^60 elements inside a small frame.
        let mut body = vec![8u8]; // variant Publish
        body.extend_from_slice(&[1, 0, 1, b'a', 0xfd]);
        body.extend_from_slice(&(1u64 << 60).to_le_bytes());
        let mut wire = (body.len() as u32).to_le_bytes().to_vec();
        wire.extend_from_slice(&body);
        let mut d = Decoder::new(Limits::default());
        d.push(&wire);
        assert!(d.next_frame().is_err());
    }

    #[test]
    fn collection_limits_apply() {
        let f = Frame::Publish {
            seq: 1,
            tenant: None,
            topic: "t".into(),
            headers: (0..65).map(|i| (i.to_string(), String::new())).collect(),
            payload: vec![],
        };
        let mut d = Decoder::new(Limits::default());
        d.push(&encode_frame(&f));
        assert_eq!(
            d.next_frame(),
            Err(DecodeError::Limit {
                what: "headers",
                max: 64
            })
        );

        let f = Frame::Publish {
            seq: 1,
            tenant: None,
            topic: "t".repeat(300),
            headers: vec![],
            payload: vec![],
        };
        let mut d = Decoder::new(Limits::default());
        d.push(&encode_frame(&f));
        assert_eq!(d.next_frame().unwrap_err().code(), ErrorCode::LimitExceeded);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let mut d = Decoder::new(Limits::default());
            d.push(&bytes);
            for _ in 0..64 {
                match d.next_frame() {
                    Ok(Some(_)) => continue,
                    _ => break,
                }
            }
        }

        #[test]
        fn publishes_round_trip(seq in any::<u64>(), topic in "[a-z]{1,10}(\\.[a-z]{1,10}){0,3}",
                                 headers in proptest::collection::vec(("[a-z]{1,8}", "[ -~]{0,16}"), 0..8),
                                 payload in proptest::collection::vec(any::<u8>(), 0..512)) {
            let f = Frame::Publish { seq, tenant: None, topic, headers, payload };
            let mut d = Decoder::new(Limits::default());
            d.push(&encode_frame(&f));
            prop_assert_eq!(d.next_frame().unwrap(), Some(f));
        }

        /// Any sequence of frames cut into chunks of any sizes decodes to
        /// the same sequence, each frame as soon as its last byte arrives.
        #[test]
        fn frames_survive_any_chunking(
            picks in proptest::collection::vec(any::<prop::sample::Index>(), 1..24),
            sizes in proptest::collection::vec(1usize..64, 1..32),
        ) {
            let frames: Vec<Frame> = picks.iter().map(|i| i.get(&samples()).clone()).collect();
            let mut wire = Vec::new();
            let mut ends = Vec::new();
            for f in &frames {
                encode(f, &mut wire);
                ends.push(wire.len());
            }
            let mut d = Decoder::new(Limits::default());
            let mut got = Vec::new();
            let mut fed = 0;
            for size in sizes.iter().cycle() {
                if fed == wire.len() {
                    break;
                }
                let next = (fed + size).min(wire.len());
                d.push(&wire[fed..next]);
                fed = next;
                while let Some(f) = d.next_frame().unwrap() {
                    got.push(f);
                }
                // Exactly the frames whose last byte has arrived are out.
                prop_assert_eq!(got.len(), ends.iter().filter(|&&e| e <= fed).count());
                prop_assert_eq!(d.buffered(), fed - ends[..got.len()].last().copied().unwrap_or(0));
            }
            prop_assert_eq!(got, frames);
            prop_assert!(d.finish().is_ok());
        }
    }

    #[test]
    fn one_byte_at_a_time_each_frame_arrives_with_its_last_byte() {
        for f in samples() {
            let wire = encode_frame(&f);
            let mut d = Decoder::new(Limits::default());
            for (i, b) in wire.iter().enumerate() {
                d.push(std::slice::from_ref(b));
                let got = d.next_frame().unwrap();
                if i + 1 < wire.len() {
                    assert_eq!(
                        got,
                        None,
                        "{f:?} decoded after {} of {} bytes",
                        i + 1,
                        wire.len()
                    );
                    assert_eq!(d.buffered(), i + 1);
                } else {
                    assert_eq!(got.as_ref(), Some(&f));
                    assert_eq!(d.buffered(), 0);
                }
            }
            d.finish().unwrap();
        }
    }
}
