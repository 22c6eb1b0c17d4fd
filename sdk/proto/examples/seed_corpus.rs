//! Write one encoded sample of each frame kind into a folder, as a seed
//! corpus for the `decode` fuzz target:
//! `cargo run -p sluice-proto --example seed_corpus -- sdk/proto/fuzz/corpus/decode`

use sluice_proto::*;

fn main() -> std::io::Result<()> {
    let dir = std::env::args().nth(1).unwrap_or_else(|| "corpus".into());
    std::fs::create_dir_all(&dir)?;
    let frames = vec![
        Frame::Hello {
            min_version: 1,
            max_version: 1,
            agent: "seed".into(),
        },
        Frame::Welcome {
            version: 1,
            tenant: "acme".into(),
            client: "app".into(),
            admin: false,
            max_message: 1 << 20,
        },
        Frame::Request {
            id: 1,
            tenant: None,
            body: Request::Declare(QueueDecl {
                name: "q".into(),
                durable: true,
                max_length: Some(10),
                overflow: Overflow::DropHead,
                ttl_ms: Some(5),
                dead_letter: Some("d".into()),
                delivery_limit: Some(3),
            }),
        },
        Frame::Request {
            id: 2,
            tenant: Some("acme".into()),
            body: Request::Bind {
                queue: "q".into(),
                pattern: "a.*.>".into(),
            },
        },
        Frame::Request {
            id: 3,
            tenant: None,
            body: Request::TenantCreate {
                name: "t".into(),
                limits: TenantQuota {
                    max_queues: Some(1),
                    ..TenantQuota::default()
                },
            },
        },
        Frame::Response {
            id: 1,
            body: Ok(Response::Subscribed { sub: 1 }),
        },
        Frame::Response {
            id: 2,
            body: Err(ErrorBody::new(ErrorCode::NoRoute, "no route")),
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
            queues: vec![1, 2],
        },
        Frame::Refused {
            seq: 3,
            error: ErrorBody::new(ErrorCode::QueueFull, "full"),
        },
        Frame::StreamStart { sub: 1 },
        Frame::Deliver {
            sub: 1,
            deliveries: vec![Delivery {
                tag: 1,
                topic: "a".into(),
                headers: vec![],
                payload: vec![1],
                redelivered: true,
            }],
        },
        Frame::Ack {
            sub: 1,
            ranges: vec![(1, 3)],
        },
        Frame::Nack {
            sub: 1,
            ranges: vec![(4, 4)],
        },
        Frame::Reject {
            sub: 1,
            ranges: vec![(5, 6)],
        },
        Frame::Cancel { sub: 1 },
        Frame::Error(ErrorBody::new(ErrorCode::BadFrame, "bad")),
    ];
    for (i, f) in frames.iter().enumerate() {
        // First byte: the chunk size the fuzz target feeds the decoder with.
        let mut seed = vec![7u8];
        seed.extend(encode_frame(f));
        std::fs::write(format!("{dir}/frame-{i:02}"), seed)?;
    }
    println!("wrote {} seeds to {dir}", frames.len());
    Ok(())
}
