//! A session over memory instead of QUIC: the bytes a client would send go
//! in, the frames the broker sends come out. The session code is the
//! production one (admission, read loop, requests, publish pipeline,
//! deliveries); only the transport differs. Used by the stateful fuzz
//! target (`host/fuzz`, `session`) and its proptest twin in CI.

use std::time::Duration;

use sluice_client::FrameSink;
use sluice_proto::{Decoder, ErrorBody, Frame, Limits};
use tokio::sync::mpsc;

use super::{ChunkSource, Link};
use crate::broker::{Broker, BrokerError};
use crate::plugins::Principal;

/// Bytes written by the broker to one stream, as the client would read them.
struct MemSink(mpsc::Sender<Vec<u8>>);

impl FrameSink for MemSink {
    async fn write_all(&mut self, buf: &[u8]) -> bool {
        self.0.send(buf.to_vec()).await.is_ok()
    }
    fn finish(&mut self) {}
}

/// Delivery streams the broker opens, handed to the collector.
struct MemLink(mpsc::UnboundedSender<mpsc::Receiver<Vec<u8>>>);

impl Link for MemLink {
    type Stream = MemSink;
    async fn open_stream(&self) -> Result<MemSink, String> {
        // Each stream holds at most 16 writes the client has not read: the
        // broker waits beyond that, as QUIC flow control makes it wait.
        let (tx, rx) = mpsc::channel(16);
        self.0
            .send(rx)
            .map_err(|_| "the client is gone".to_string())?;
        Ok(MemSink(tx))
    }
}

/// The client's bytes, one chunk per `send`.
struct MemSource(mpsc::Receiver<bytes::Bytes>);

impl ChunkSource for MemSource {
    async fn chunks(&mut self, out: &mut [bytes::Bytes]) -> Result<Option<usize>, ()> {
        let Some(first) = self.0.recv().await else {
            return Ok(None);
        };
        out[0] = first;
        let mut n = 1;
        while n < out.len() {
            match self.0.try_recv() {
                Ok(b) => {
                    out[n] = b;
                    n += 1;
                }
                Err(_) => break,
            }
        }
        Ok(Some(n))
    }
}

/// What one in-memory session produced.
#[derive(Debug)]
pub struct Transcript {
    /// Frames the broker wrote on the control stream, in order.
    pub control: Vec<Frame>,
    /// Frames the broker wrote on delivery streams, stream after stream.
    pub deliveries: Vec<Frame>,
    /// Bytes the broker wrote that the client's decoder refused (must stay
    /// empty: the broker never sends what a client cannot read).
    pub undecodable: Vec<String>,
    /// How the session ended: `Err` with the error it reported.
    pub ended: Result<(), ErrorBody>,
}

/// Run one session of `who` on `broker`: admit it like a connection, feed
/// it `input` chunk by chunk (then end the stream), read everything it
/// writes, and return once it ended (or `timeout` passed, reported as an
/// error). Needs a tokio runtime.
pub async fn run(
    broker: &Broker,
    who: Principal,
    input: Vec<Vec<u8>>,
    timeout: Duration,
) -> Result<Transcript, BrokerError> {
    let _admitted = broker.admit(&who, Vec::new(), std::sync::Arc::new(|_: &str| {}))?;
    let (in_tx, in_rx) = mpsc::channel::<bytes::Bytes>(64);
    let (ctl_tx, mut ctl_rx) = mpsc::channel::<Vec<u8>>(16);
    let (streams_tx, mut streams_rx) = mpsc::unbounded_channel();
    let session = tokio::spawn(super::serve(
        MemLink(streams_tx),
        broker.clone(),
        who,
        MemSink(ctl_tx),
        MemSource(in_rx),
    ));
    // The client: reads everything the broker writes, on every stream.
    let reader = tokio::spawn(async move {
        let mut control = Decoder::new(Limits::default());
        let mut out = (Vec::new(), Vec::new(), Vec::new());
        let mut streams: Vec<(Decoder, mpsc::Receiver<Vec<u8>>)> = Vec::new();
        let mut control_open = true;
        loop {
            let mut progressed = false;
            while let Ok(rx) = streams_rx.try_recv() {
                streams.push((Decoder::new(Limits::default()), rx));
                progressed = true;
            }
            if control_open {
                match ctl_rx.try_recv() {
                    Ok(bytes) => {
                        control.push(&bytes);
                        drain(&mut control, &mut out.0, &mut out.2);
                        progressed = true;
                    }
                    Err(mpsc::error::TryRecvError::Disconnected) => control_open = false,
                    Err(mpsc::error::TryRecvError::Empty) => {}
                }
            }
            streams.retain_mut(|(d, rx)| {
                loop {
                    match rx.try_recv() {
                        Ok(bytes) => {
                            d.push(&bytes);
                            drain(d, &mut out.1, &mut out.2);
                            progressed = true;
                        }
                        Err(mpsc::error::TryRecvError::Empty) => break true,
                        Err(mpsc::error::TryRecvError::Disconnected) => break false,
                    }
                }
            });
            if !control_open && streams.is_empty() && streams_rx.is_closed() {
                return out;
            }
            if !progressed {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    });
    for chunk in input {
        if in_tx.send(bytes::Bytes::from(chunk)).await.is_err() {
            break;
        }
    }
    drop(in_tx);
    let ended = match tokio::time::timeout(timeout, session).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Ok(Err(e)) => Err(ErrorBody::new(
            sluice_proto::ErrorCode::Internal,
            format!("session task failed: {e}"),
        )),
        Err(_) => Err(ErrorBody::new(
            sluice_proto::ErrorCode::Internal,
            format!("the session did not end within {timeout:?}"),
        )),
    };
    // Tasks of the session (publisher, deliveries) end once their
    // channels close; give them the same time.
    let (control, deliveries, undecodable) = tokio::time::timeout(timeout, reader)
        .await
        .ok()
        .and_then(|r| r.ok())
        .unwrap_or_default();
    Ok(Transcript {
        control,
        deliveries,
        undecodable,
        ended,
    })
}

fn drain(d: &mut Decoder, frames: &mut Vec<Frame>, bad: &mut Vec<String>) {
    loop {
        match d.next_frame() {
            Ok(Some(f)) => frames.push(f),
            Ok(None) => return,
            Err(e) => {
                bad.push(e.to_string());
                return;
            }
        }
    }
}
