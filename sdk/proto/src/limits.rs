//! The bounds every decoded frame is checked against.

/// Bounds applied when decoding. Both ends should use the same values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame body in bytes. Default 4 MiB (a 1 MiB message plus
    /// headers fits; a delivery batch is cut to fit). At most [`HARD_MAX_FRAME`](crate::HARD_MAX_FRAME).
    pub max_frame: usize,
    /// Largest payload. Default 1 MiB.
    pub max_payload: usize,
    /// Most headers per message (and config entries per plugin). Default 64.
    pub max_headers: usize,
    /// Most header bytes (names + values) per message. Default 16 KiB.
    pub max_header_bytes: usize,
    /// Longest name (queue, topic, pattern, tenant, plugin). Default 255.
    pub max_name: usize,
    /// Most messages per delivery or confirm batch. Default 1024.
    pub max_batch: usize,
    /// Most ranges per ack/nack/reject. Default 4096.
    pub max_ranges: usize,
    /// Most entries in a listing. Default 100 000.
    pub max_list: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame: 4 << 20,
            max_payload: 1 << 20,
            max_headers: 64,
            max_header_bytes: 16 << 10,
            max_name: 255,
            max_batch: 1024,
            max_ranges: 4096,
            max_list: 100_000,
        }
    }
}
