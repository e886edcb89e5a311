//! The engine's counters, with Prefect's metric names and labels. They are persisted in the
//! `metrics` tree by the same transaction as the transitions they count (counts of rejected
//! operations, which write nothing, ride along with the next transaction that does).

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::{Deserialize, Serialize};

/// One counter and its labels.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Counter {
    /// `prefect_worker_cleanup_queue_operations_total{operation, status}`
    Operation {
        /// `enqueue`, `reserve`, `ack`, `release`, `renew`, `redrive`.
        operation: String,
        /// `accepted`, `duplicate`, or an [`OpStatus`](crate::OpStatus) string.
        status: String,
    },
    /// `prefect_worker_cleanup_queue_dead_letters_total{kind, reason}`
    DeadLetter {
        /// The message's cleanup kind.
        kind: String,
        /// Why it moved.
        reason: String,
    },
    /// `prefect_worker_cleanup_queue_lease_expirations_total{result}`
    LeaseExpiration {
        /// `redelivered` or `dead_lettered`.
        result: String,
    },
}

impl Counter {
    /// An operation counter.
    pub fn op(operation: &str, status: &str) -> Counter {
        Counter::Operation {
            operation: operation.into(),
            status: status.into(),
        }
    }

    /// The Prometheus metric name.
    pub fn name(&self) -> &'static str {
        match self {
            Counter::Operation { .. } => "prefect_worker_cleanup_queue_operations_total",
            Counter::DeadLetter { .. } => "prefect_worker_cleanup_queue_dead_letters_total",
            Counter::LeaseExpiration { .. } => {
                "prefect_worker_cleanup_queue_lease_expirations_total"
            }
        }
    }

    /// The labels, in Prometheus order.
    pub fn labels(&self) -> Vec<(&'static str, &str)> {
        match self {
            Counter::Operation { operation, status } => {
                vec![("operation", operation), ("status", status)]
            }
            Counter::DeadLetter { kind, reason } => vec![("kind", kind), ("reason", reason)],
            Counter::LeaseExpiration { result } => vec![("result", result)],
        }
    }
}

/// A snapshot of every counter since the database was created.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metrics {
    /// Counter values (absent counters are zero).
    pub counters: BTreeMap<Counter, u64>,
}

impl Metrics {
    /// The value of one counter.
    pub fn get(&self, c: &Counter) -> u64 {
        self.counters.get(c).copied().unwrap_or(0)
    }

    /// The counters in the Prometheus text exposition format.
    pub fn prometheus_text(&self) -> String {
        let mut out = String::new();
        let mut last = "";
        for (c, v) in &self.counters {
            if c.name() != last {
                last = c.name();
                let _ = writeln!(out, "# TYPE {last} counter");
            }
            let labels: Vec<String> = c
                .labels()
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                .collect();
            let _ = writeln!(out, "{}{{{}}} {v}", c.name(), labels.join(","));
        }
        out
    }
}

/// Escapes a Prometheus label value.
pub fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
