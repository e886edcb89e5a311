//! Formatting helpers: aligned tables, ages, latencies, sizes.

use std::fmt::Write;
use std::time::Duration;

use cleanup_queue::Timestamp;

/// Column alignment.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

/// A plain-text table with a header row, columns padded to their widest cell.
pub struct Table {
    header: Vec<String>,
    align: Vec<Align>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(columns: &[(&str, Align)]) -> Table {
        Table {
            header: columns.iter().map(|(h, _)| h.to_string()).collect(),
            align: columns.iter().map(|(_, a)| *a).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn render(&self) -> String {
        let n = self.header.len();
        let mut width: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate().take(n) {
                width[i] = width[i].max(c.chars().count());
            }
        }
        let mut out = String::new();
        let line = |out: &mut String, cells: &[String]| {
            let mut s = String::new();
            for (i, w) in width.iter().enumerate() {
                let c = cells.get(i).map(String::as_str).unwrap_or("");
                let pad = w.saturating_sub(c.chars().count());
                if i > 0 {
                    s.push_str("  ");
                }
                match self.align[i] {
                    Align::Left => {
                        s.push_str(c);
                        s.push_str(&" ".repeat(pad));
                    }
                    Align::Right => {
                        s.push_str(&" ".repeat(pad));
                        s.push_str(c);
                    }
                }
            }
            let _ = writeln!(out, "{}", s.trim_end());
        };
        line(&mut out, &self.header);
        for r in &self.rows {
            line(&mut out, r);
        }
        out
    }
}

/// A short human duration: `850µs`, `12.3ms`, `4.20s`, `3m05s`, `2h13m`, `3d04h`.
pub fn human_duration(d: Duration) -> String {
    let us = d.as_micros();
    if us < 1_000 {
        format!("{us}µs")
    } else if us < 1_000_000 {
        format!("{:.1}ms", us as f64 / 1e3)
    } else if us < 60_000_000 {
        format!("{:.2}s", us as f64 / 1e6)
    } else {
        let s = d.as_secs();
        if s < 3600 {
            format!("{}m{:02}s", s / 60, s % 60)
        } else if s < 86_400 {
            format!("{}h{:02}m", s / 3600, s % 3600 / 60)
        } else {
            format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600)
        }
    }
}

/// `b - a` as a duration, zero when negative.
pub fn since(a: Timestamp, b: Timestamp) -> Duration {
    Duration::from_micros(u64::try_from(b.as_micros().saturating_sub(a.as_micros())).unwrap_or(0))
}

/// Seconds from `a` to `b` (negative when `b` is earlier).
pub fn secs_between(a: Timestamp, b: Timestamp) -> f64 {
    (b.as_micros().saturating_sub(a.as_micros())) as f64 / 1e6
}

/// "in 12.0s" / "overdue 3.00s".
pub fn relative(now: Timestamp, t: Timestamp) -> String {
    if t > now {
        format!("in {}", human_duration(since(now, t)))
    } else {
        format!("overdue {}", human_duration(since(t, now)))
    }
}

/// `1.2 MiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Latency summary of a set of samples in microseconds.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

impl Latency {
    pub fn of(samples: &mut [u64]) -> Latency {
        if samples.is_empty() {
            return Latency::default();
        }
        samples.sort_unstable();
        let at = |q: f64| {
            let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
            samples[i.min(samples.len() - 1)]
        };
        Latency {
            count: samples.len() as u64,
            p50_us: at(0.50),
            p99_us: at(0.99),
            max_us: samples[samples.len() - 1],
        }
    }
}

/// A thousands-separated integer.
pub fn grouped(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A token shown to a person: enough to tell two apart, not enough to use.
pub fn mask_token(t: &str) -> String {
    let head: String = t.chars().take(8).collect();
    format!("{head}… ({} chars)", t.chars().count())
}
