//! Pure parts: the report of one run (the JSON object of `sluice bench
//! --json`), percentiles, ratios and the Markdown table.

use serde::{Deserialize, Serialize};

/// The result of one run; the same keys as `sluice bench --json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Deliveries per second, from the start (before the clients connect)
    /// until the last delivery.
    pub msgs_per_s: f64,
    /// Confirmed publishes per second, until the last confirm.
    pub publish_msgs_per_s: f64,
    /// `msgs_per_s` × payload size.
    pub mb_per_s: f64,
    /// Publish→deliver latency percentiles (ms).
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    /// Publishes attempted.
    pub sent: u64,
    /// Publishes confirmed.
    pub confirmed: u64,
    /// Deliveries.
    pub received: u64,
    /// Deliveries of a (queue, sequence) seen before.
    pub duplicates: u64,
}

/// The latency at percentile `p` (0..1) of sorted nanosecond samples, in
/// milliseconds; the same index rule as `sluice bench` (no interpolation).
pub fn percentile_ms(sorted_ns: &[u64], p: f64) -> f64 {
    let Some(last) = sorted_ns.len().checked_sub(1) else {
        return 0.0;
    };
    let i = ((sorted_ns.len() as f64 * p) as usize).min(last);
    sorted_ns[i] as f64 / 1e6
}

fn round_to(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

impl Report {
    /// Build a report like `sluice bench` does: throughput from the counts
    /// and the elapsed times, latency percentiles from the samples.
    #[allow(clippy::too_many_arguments)]
    pub fn from_run(
        mut latencies_ns: Vec<u64>,
        size: usize,
        sent: u64,
        confirmed: u64,
        received: u64,
        duplicates: u64,
        publish_secs: f64,
        total_secs: f64,
    ) -> Report {
        latencies_ns.sort_unstable();
        let per_s = |n: u64, secs: f64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
        let msgs_per_s = per_s(received, total_secs);
        Report {
            msgs_per_s: msgs_per_s.round(),
            publish_msgs_per_s: per_s(confirmed, publish_secs).round(),
            mb_per_s: round_to(msgs_per_s * size as f64 / 1e6, 2),
            p50_ms: round_to(percentile_ms(&latencies_ns, 0.5), 3),
            p99_ms: round_to(percentile_ms(&latencies_ns, 0.99), 3),
            p999_ms: round_to(percentile_ms(&latencies_ns, 0.999), 3),
            sent,
            confirmed,
            received,
            duplicates,
        }
    }

    /// Why the run does not count, if it does not: a refused publish or a
    /// lost delivery (`expected` deliveries for all confirmed publishes).
    pub fn incomplete(&self, expected: u64) -> Option<String> {
        if self.confirmed < self.sent || self.received < expected {
            Some(format!(
                "incomplete: confirmed {}/{}, received {}/{}",
                self.confirmed, self.sent, self.received, expected
            ))
        } else {
            None
        }
    }
}

/// Median of several runs of the same cell, by end-to-end throughput.
pub fn median_by_throughput(mut runs: Vec<Report>) -> Option<Report> {
    if runs.is_empty() {
        return None;
    }
    runs.sort_by(|a, b| a.msgs_per_s.total_cmp(&b.msgs_per_s));
    let mid = runs.len() / 2;
    Some(runs.swap_remove(mid))
}

/// `a / b`, or `None` when it means nothing.
pub fn ratio(a: f64, b: f64) -> Option<f64> {
    (a > 0.0 && b > 0.0 && a.is_finite() && b.is_finite()).then(|| a / b)
}

/// One cell of the comparison: a workload run against one system.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    /// Workload key (`a`..`e`).
    pub workload: String,
    /// Workload description.
    pub title: String,
    /// System label ("Sluice", "NATS JetStream 2.9.10", ...).
    pub system: String,
    /// True for the Sluice row the peers are compared with.
    pub sluice: bool,
    /// The measurement, or why there is none.
    pub result: Result<Report, String>,
    /// A remark printed after the table (e.g. an incomplete run).
    pub note: Option<String>,
}

fn fmt_int(x: f64) -> String {
    let s = format!("{:.0}", x.max(0.0));
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn fmt_ms(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0} ms")
    } else if x >= 10.0 {
        format!("{x:.1} ms")
    } else {
        format!("{x:.2} ms")
    }
}

fn fmt_ratio(r: Option<f64>) -> String {
    match r {
        Some(r) if r >= 10.0 => format!("{r:.0}×"),
        Some(r) => format!("{r:.2}×"),
        None => "–".into(),
    }
}

/// The Markdown table: one line per (workload, system), with Sluice's
/// throughput divided by the peer's and the peer's p99 divided by Sluice's
/// (both above 1 where Sluice is better).
pub fn render_table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| workload | system | msgs/s | publish msgs/s | p50 | p99 | p999 | Sluice ÷ peer (msgs/s) | peer ÷ Sluice (p99) |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let mut notes = Vec::new();
    for row in rows {
        let sluice = rows
            .iter()
            .find(|r| r.workload == row.workload && r.sluice)
            .and_then(|r| r.result.as_ref().ok());
        let mark = if row.note.is_some() {
            notes.push(format!(
                "{} / {}: {}",
                row.workload,
                row.system,
                row.note.as_deref().unwrap_or_default()
            ));
            format!(" [{}]", notes.len())
        } else {
            String::new()
        };
        let system = if row.sluice {
            format!("**{}**", row.system)
        } else {
            row.system.clone()
        };
        match &row.result {
            Ok(r) => {
                let (tput, p99) = match (row.sluice, sluice) {
                    (false, Some(s)) => (
                        fmt_ratio(ratio(s.msgs_per_s, r.msgs_per_s)),
                        fmt_ratio(ratio(r.p99_ms, s.p99_ms)),
                    ),
                    _ => ("–".into(), "–".into()),
                };
                out.push_str(&format!(
                    "| {} {} | {}{} | {} | {} | {} | {} | {} | {} | {} |\n",
                    row.workload,
                    row.title,
                    system,
                    mark,
                    fmt_int(r.msgs_per_s),
                    fmt_int(r.publish_msgs_per_s),
                    fmt_ms(r.p50_ms),
                    fmt_ms(r.p99_ms),
                    fmt_ms(r.p999_ms),
                    tput,
                    p99
                ));
            }
            Err(e) => out.push_str(&format!(
                "| {} {} | {}{} | failed: {} | | | | | | |\n",
                row.workload,
                row.title,
                system,
                mark,
                e.replace('|', "/").replace('\n', " ")
            )),
        }
    }
    if !notes.is_empty() {
        out.push('\n');
        for (i, n) in notes.iter().enumerate() {
            out.push_str(&format!("- [{}] {}\n", i + 1, n));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_bench_index_rule() {
        let ns: Vec<u64> = (1..=1000).map(|i| i * 1_000_000).collect();
        // index = floor(len * p): 500 → the 501st sample.
        assert_eq!(percentile_ms(&ns, 0.5), 501.0);
        assert_eq!(percentile_ms(&ns, 0.99), 991.0);
        assert_eq!(percentile_ms(&ns, 0.999), 1000.0);
        // Clamped to the last sample, and empty means 0.
        assert_eq!(percentile_ms(&ns, 1.0), 1000.0);
        assert_eq!(percentile_ms(&[], 0.5), 0.0);
        assert_eq!(percentile_ms(&[2_500_000], 0.999), 2.5);
    }

    #[test]
    fn report_sorts_samples_and_rounds_like_sluice_bench() {
        let lat = vec![3_000_000, 1_000_000, 2_000_000, 4_123_456];
        let r = Report::from_run(lat, 100, 1000, 1000, 1000, 0, 0.5, 2.0);
        assert_eq!(r.msgs_per_s, 500.0);
        assert_eq!(r.publish_msgs_per_s, 2000.0);
        assert_eq!(r.mb_per_s, 0.05);
        assert_eq!(r.p50_ms, 3.0);
        assert_eq!(r.p99_ms, 4.123);
        assert_eq!(r.incomplete(1000), None);
        assert!(r.incomplete(1001).unwrap().contains("received 1000/1001"));
        let zero = Report::from_run(vec![], 100, 10, 0, 0, 0, 0.0, 0.0);
        assert_eq!(zero.msgs_per_s, 0.0);
        assert!(zero.incomplete(0).unwrap().contains("confirmed 0/10"));
    }

    #[test]
    fn parses_the_json_of_sluice_bench() {
        let line = r#"{"confirmed":100000,"duplicates":0,"mb_per_s":11.29,"msgs_per_s":112916.0,"p50_ms":3.3,"p999_ms":10.8,"p99_ms":10.1,"publish_msgs_per_s":113035.0,"received":100000,"sent":100000}"#;
        let r: Report = serde_json::from_str(line).unwrap();
        assert_eq!(r.msgs_per_s, 112916.0);
        assert_eq!(r.p999_ms, 10.8);
        assert_eq!(r.received, 100000);
    }

    #[test]
    fn median_and_ratio() {
        let mk = |m: f64| Report::from_run(vec![], 100, 1, 1, m as u64, 0, 1.0, 1.0);
        let med = median_by_throughput(vec![mk(30.0), mk(10.0), mk(20.0)]).unwrap();
        assert_eq!(med.msgs_per_s, 20.0);
        assert!(median_by_throughput(vec![]).is_none());
        assert_eq!(ratio(6.0, 2.0), Some(3.0));
        assert_eq!(ratio(6.0, 0.0), None);
        assert_eq!(ratio(0.0, 2.0), None);
    }

    #[test]
    fn numbers_are_formatted_for_people() {
        assert_eq!(fmt_int(1234567.4), "1,234,567");
        assert_eq!(fmt_int(999.0), "999");
        assert_eq!(fmt_int(1000.0), "1,000");
        assert_eq!(fmt_ms(0.4321), "0.43 ms");
        assert_eq!(fmt_ms(12.345), "12.3 ms");
        assert_eq!(fmt_ms(184.8), "185 ms");
        assert_eq!(fmt_ratio(Some(2.345)), "2.35×");
        assert_eq!(fmt_ratio(Some(12.3)), "12×");
        assert_eq!(fmt_ratio(None), "–");
    }

    #[test]
    fn table_has_ratios_against_the_sluice_row_of_the_same_workload() {
        let rep = |msgs: f64, p99: f64| Report {
            msgs_per_s: msgs,
            publish_msgs_per_s: msgs,
            mb_per_s: 0.0,
            p50_ms: 1.0,
            p99_ms: p99,
            p999_ms: p99,
            sent: 10,
            confirmed: 10,
            received: 10,
            duplicates: 0,
        };
        let row = |w: &str, system: &str, sluice: bool, result, note: Option<&str>| Row {
            workload: w.into(),
            title: format!("title {w}"),
            system: system.into(),
            sluice,
            result,
            note: note.map(String::from),
        };
        let rows = vec![
            row("a", "Sluice", true, Ok(rep(90_000.0, 4.0)), None),
            row("a", "NATS", false, Ok(rep(30_000.0, 8.0)), None),
            row("a", "RabbitMQ", false, Err("no | server".into()), None),
            row("b", "Sluice", true, Err("down".into()), None),
            row("b", "NATS", false, Ok(rep(10_000.0, 2.0)), Some("slow")),
        ];
        let t = render_table(&rows);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("| workload | system | msgs/s"));
        assert_eq!(
            lines[2],
            "| a title a | **Sluice** | 90,000 | 90,000 | 1.00 ms | 4.00 ms | 4.00 ms | – | – |"
        );
        assert_eq!(
            lines[3],
            "| a title a | NATS | 30,000 | 30,000 | 1.00 ms | 8.00 ms | 8.00 ms | 3.00× | 2.00× |"
        );
        // A failure keeps the table well-formed (no stray `|`).
        assert_eq!(
            lines[4],
            "| a title a | RabbitMQ | failed: no / server | | | | | | |"
        );
        assert_eq!(lines[4].matches('|').count(), lines[3].matches('|').count());
        // No Sluice figure for the workload: no ratio; a note is numbered.
        assert_eq!(
            lines[6],
            "| b title b | NATS [1] | 10,000 | 10,000 | 1.00 ms | 2.00 ms | 2.00 ms | – | – |"
        );
        assert!(t.ends_with("\n- [1] b / NATS: slow\n"));
        // `--render` reads rows back from `--json` output.
        let json = serde_json::to_string(&rows).unwrap();
        let back: Vec<Row> = serde_json::from_str(&json).unwrap();
        assert_eq!(render_table(&back), t);
    }
}
