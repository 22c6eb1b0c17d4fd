//! Raw clients over real QUIC for hostile-client tests: a quinn connection
//! with a control stream, frames written and read by hand.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sluice_proto::{self as proto, Frame};

use crate::Harness;

/// How long a raw read waits for frames.
pub const WAIT: Duration = Duration::from_secs(10);

/// A raw connection with its control stream, after hello/welcome.
pub struct Raw {
    /// Keeps the client endpoint alive.
    pub endpoint: quinn::Endpoint,
    /// The connection.
    pub conn: quinn::Connection,
    /// The control stream, client to server.
    pub send: quinn::SendStream,
    /// The control stream, server to client.
    pub recv: quinn::RecvStream,
}

/// Connect as `acme` with a control-stream receive window of `window` bytes
/// (the client's own choice: how many answers it lets the broker send
/// before it reads them), and say hello.
pub async fn raw(h: &Harness, window: u32) -> Raw {
    raw_as(h, "acme", window).await
}

/// [`raw`] with the identity folder `who`.
pub async fn raw_as(h: &Harness, who: &str, window: u32) -> Raw {
    raw_with(h, who, window, proto::MAX_SUBSCRIPTIONS).await
}

/// Connect as `acme` and open the control stream, sending nothing yet.
pub async fn connect(h: &Harness, window: u32) -> Raw {
    connect_as(h, "acme", window).await
}

/// [`raw_as`] granting the broker `uni_streams` delivery streams.
pub async fn raw_with(h: &Harness, who: &str, window: u32, uni_streams: u32) -> Raw {
    let mut r = connect_with(h, who, window, uni_streams).await;
    r.send.write_all(&hello()).await.unwrap();
    let welcome = read_frames(&mut r.recv, 1).await;
    assert!(matches!(welcome[0], Frame::Welcome { .. }), "{welcome:?}");
    r
}

/// [`connect`] with the identity folder `who`.
pub async fn connect_as(h: &Harness, who: &str, window: u32) -> Raw {
    connect_with(h, who, window, proto::MAX_SUBSCRIPTIONS).await
}

/// [`connect_as`] granting the broker `uni_streams` streams.
pub async fn connect_with(h: &Harness, who: &str, window: u32, uni_streams: u32) -> Raw {
    connect_windows(h, who, window, window, uni_streams).await
}

/// [`connect_with`] giving each stream `stream_window` bytes of credit and
/// the connection `conn_window` in all.
pub async fn connect_windows(
    h: &Harness,
    who: &str,
    stream_window: u32,
    conn_window: u32,
    uni_streams: u32,
) -> Raw {
    let identity = sluice_client::Identity::load(&h.certs.join(who)).unwrap();
    let mut config = identity.quinn_config().unwrap();
    let mut transport = quinn::TransportConfig::default();
    transport.stream_receive_window(stream_window.into());
    transport.receive_window(conn_window.into());
    transport.max_concurrent_uni_streams(uni_streams.into());
    config.transport_config(Arc::new(transport));
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(config);
    let conn = endpoint
        .connect(h.addr, "localhost")
        .unwrap()
        .await
        .unwrap();
    let (send, recv) = conn.open_bi().await.unwrap();
    Raw {
        endpoint,
        conn,
        send,
        recv,
    }
}

/// Read until `n` frames arrived (or the stream ends / WAIT passes).
pub async fn read_frames(recv: &mut quinn::RecvStream, n: usize) -> Vec<Frame> {
    let mut decoder = proto::Decoder::new(proto::Limits::default());
    let mut frames = Vec::new();
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(WAIT, async {
        while frames.len() < n {
            while let Ok(Some(f)) = decoder.next_frame() {
                frames.push(f);
            }
            if frames.len() >= n {
                break;
            }
            match recv.read(&mut buf).await {
                Ok(Some(k)) => decoder.push(&buf[..k]),
                _ => break,
            }
        }
    })
    .await;
    frames
}

/// Write `frame` forever from a task; returns the bytes written so far.
pub fn flood(
    mut send: quinn::SendStream,
    frame: impl Fn(u64) -> Frame + Send + 'static,
) -> Arc<AtomicU64> {
    let written = Arc::new(AtomicU64::new(0));
    let counter = written.clone();
    tokio::spawn(async move {
        let mut buf = Vec::with_capacity(256 << 10);
        for i in 0u64.. {
            buf.clear();
            for j in 0..64 {
                proto::encode(&frame(i * 64 + j), &mut buf);
            }
            if send.write_all(&buf).await.is_err() {
                return;
            }
            counter.fetch_add(buf.len() as u64, Ordering::Relaxed);
        }
    });
    written
}

/// Wait until `written` stops growing for a second; its final value.
pub async fn stalls(written: &AtomicU64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = written.load(Ordering::Relaxed);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = written.load(Ordering::Relaxed);
        if now == last && now > 0 {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "the flood was never flow-controlled: {now} bytes written"
        );
        last = now;
    }
}

/// A hello frame, encoded.
pub fn hello() -> Vec<u8> {
    proto::encode_frame(&Frame::Hello {
        min_version: 1,
        max_version: 1,
        agent: "raw".into(),
    })
}
