//! What decoding allocates, measured with a counting allocator (the library
//! itself forbids `unsafe`, so this lives outside it): a length prefix over
//! the limit is refused without allocating, and a small frame that declares
//! a huge collection inside cannot make the decoder reserve much more than
//! the frame is long.

use proptest::prelude::*;
use sluice_proto::*;

/// A per-thread count of live heap bytes, so a test can bound what one call
/// allocates while other tests run on other threads.
mod counting {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    thread_local! {
        static LIVE: Cell<isize> = const { Cell::new(0) };
        static PEAK: Cell<isize> = const { Cell::new(0) };
    }

    fn note(delta: isize) {
        let _ = LIVE.try_with(|live| {
            let now = live.get().wrapping_add(delta);
            live.set(now);
            let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
        });
    }

    pub struct Counting;

    #[global_allocator]
    static COUNTING: Counting = Counting;

    // SAFETY: every call is forwarded unchanged to the system allocator.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            note(layout.size() as isize);
            unsafe { System.alloc(layout) }
        }
        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            note(layout.size() as isize);
            unsafe { System.alloc_zeroed(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            note(-(layout.size() as isize));
            unsafe { System.dealloc(ptr, layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            note(new_size as isize - layout.size() as isize);
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }

    /// `f`'s result and the most heap bytes it held at once beyond what was
    /// live on this thread when it started.
    pub fn peak_during<R>(f: impl FnOnce() -> R) -> (R, usize) {
        let start = LIVE.with(Cell::get);
        PEAK.with(|p| p.set(start));
        let r = f();
        (r, (PEAK.with(Cell::get) - start).max(0) as usize)
    }
}

use counting::peak_during;

/// Frames with every kind of collection: bytes, strings, pairs, structs.
fn samples() -> Vec<Frame> {
    vec![
        Frame::Publish {
            seq: 1,
            tenant: Some("acme".into()),
            topic: "a.b".into(),
            headers: vec![("k".into(), "v".into()), ("k2".into(), String::new())],
            payload: b"hello".to_vec(),
        },
        Frame::Deliver {
            sub: 3,
            deliveries: vec![Delivery {
                tag: 1,
                topic: "a".into(),
                headers: vec![("h".into(), "v".into())],
                payload: vec![1, 2],
                redelivered: false,
            }],
        },
        Frame::Confirm {
            first: 1,
            queues: vec![1, 2, 0],
        },
        Frame::Ack {
            sub: 3,
            ranges: vec![(1, 5), (7, 7)],
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
    ]
}

/// The most a frame body of `len` bytes may make the decoder hold: a small
/// multiple of the frame (bincode reserves a collection's in-memory size,
/// up to 24 bytes per encoded byte for strings, before reading it), never
/// the whole `HARD_MAX_FRAME`.
fn allowance(len: usize) -> usize {
    256 * len + (64 << 10)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// A length prefix over the limit is refused as soon as the prefix is
    /// in, before any of the body, and refusing allocates nothing.
    #[test]
    fn oversize_declared_length_is_refused_without_allocating(
        max_frame in prop_oneof![0usize..1024, 0usize..=HARD_MAX_FRAME, HARD_MAX_FRAME..usize::MAX],
        over in any::<prop::sample::Index>(),
        body in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let max = max_frame.min(HARD_MAX_FRAME);
        let len = max + 1 + over.index(u32::MAX as usize - max);
        let mut d = Decoder::new(Limits { max_frame, ..Limits::default() });
        d.push(&(len as u32).to_le_bytes());
        d.push(&body);
        let (r, allocated) = peak_during(|| d.next_frame());
        prop_assert_eq!(r, Err(DecodeError::TooLarge { len, max }));
        prop_assert_eq!(allocated, 0);
        prop_assert!(d.next_frame().is_err(), "the stream stays unusable");
    }

    /// Any byte of a real frame replaced by a huge varint (as a collection
    /// length would be): whatever the decoder makes of it, it holds at most
    /// a small multiple of the frame's size meanwhile.
    #[test]
    fn declared_collection_lengths_are_bounded_by_the_frame(
        pick in any::<prop::sample::Index>(),
        at in any::<prop::sample::Index>(),
        wide in any::<bool>(),
        declared in prop_oneof![0u64..1 << 16, 1u64 << 16..HARD_MAX_FRAME as u64, any::<u64>()],
    ) {
        let mut body = encode_frame(pick.get(&samples()))[4..].to_vec();
        let at = at.index(body.len());
        // bincode varints: 0xfc then a little-endian u32, 0xfd then a u64.
        let len_bytes = if wide {
            [&[0xfd][..], &declared.to_le_bytes()].concat()
        } else {
            [&[0xfc][..], &(declared as u32).to_le_bytes()].concat()
        };
        body.splice(at..at + 1, len_bytes);
        let mut framed = (body.len() as u32).to_le_bytes().to_vec();
        framed.extend_from_slice(&body);
        let mut d = Decoder::new(Limits::default());
        d.push(&framed);
        let (_, held) = peak_during(|| d.next_frame());
        prop_assert!(
            held <= allowance(body.len()),
            "a {}-byte frame made the decoder hold {held} bytes", framed.len()
        );
    }
}

/// Frames carrying the largest collections the default limits allow still
/// decode: the bound on reservations is never tighter than real frames.
#[test]
fn full_frames_still_decode() {
    let limits = Limits::default();
    let frames = vec![
        Frame::Publish {
            seq: 1,
            tenant: None,
            topic: "t".into(),
            headers: (0..limits.max_headers)
                .map(|i| (format!("{i}"), String::new()))
                .collect(),
            payload: vec![7; limits.max_payload],
        },
        Frame::Ack {
            sub: 1,
            ranges: vec![(0, 0); limits.max_ranges],
        },
        Frame::Confirm {
            first: 0,
            queues: vec![0; limits.max_batch],
        },
        Frame::Response {
            id: 1,
            body: Ok(Response::Queues(vec![
                QueueSummary {
                    name: "q".into(),
                    durable: false,
                    ready: 0,
                    unacked: 0,
                    bytes: 0,
                    consumers: 0,
                    published: 0,
                    dead_lettered: 0,
                    filters: vec![String::new(); 4],
                };
                1000
            ])),
        },
        Frame::Deliver {
            sub: 1,
            deliveries: vec![
                Delivery {
                    tag: 0,
                    topic: String::new(),
                    headers: vec![(String::new(), String::new()); 2],
                    payload: vec![],
                    redelivered: false,
                };
                limits.max_batch
            ],
        },
    ];
    for f in frames {
        let mut d = Decoder::new(limits.clone());
        d.push(&encode_frame(&f));
        assert_eq!(d.next_frame(), Ok(Some(f)));
    }
}

/// Found by the `decode` fuzz target run with `-malloc_limit_mb=1`
/// (docs/fuzzing.md): a 10-byte frame body whose queue name declares
/// 16 MiB (`fc 00 00 00 01`) made the decoder `calloc` 16 MiB before finding
/// out that the body ends there.
#[test]
fn fuzz_found_16_mib_name_in_a_10_byte_frame() {
    // Length 10; Frame::Request, id 0, no tenant, Request::Declare, a queue
    // name of 0x0100_0000 bytes; then the body ends.
    let input = [0x0a, 0, 0, 0, 0x02, 0, 0, 0, 0xfc, 0, 0, 0, 0x01, 0x00];
    let mut d = Decoder::new(Limits::default());
    d.push(&input);
    let (r, held) = peak_during(|| d.next_frame());
    assert!(matches!(r, Err(DecodeError::Malformed(_))), "{r:?}");
    assert!(held < 4096, "held {held} bytes");
}
