//! # cleanup-queue
//!
//! An embedded, durable engine for Prefect's worker cleanup delivery queue
//! (`WorkerCleanupQueue`): at-least-once delivery with exactly one live reservation per
//! message, fenced by an unguessable token; ack / release / renew; lease expiry by a
//! background sweeper; retries, then a dead-letter queue; idempotent enqueue; strict
//! work-pool isolation; per-pool wakeup sequences. State lives in sled trees and changes
//! only through multi-tree transactions; a mutating call returns after its effect is on disk.
//!
//! ```
//! use cleanup_queue::{CleanupKind, NewMessage, OpStatus, Queue, ReserveFilter};
//! use serde_json::json;
//! use uuid::Uuid;
//!
//! let queue = Queue::temporary().open()?;
//! let pool = Uuid::new_v4();
//! let id = Uuid::new_v4();
//! queue.enqueue(NewMessage::new(
//!     pool,
//!     id,
//!     "flow-run-42:cancel",
//!     CleanupKind::CancellingTimeoutTeardown,
//!     json!({"flow_run_id": "42", "infrastructure_pid": "k8s:job-42"}),
//! ))?;
//! assert_eq!(queue.read_wakeup_sequence(pool)?, 1);
//!
//! let r = queue.reserve(pool, &ReserveFilter::any())?.expect("one message is visible");
//! assert_eq!(r.message.delivery_count, 1);
//! let done = queue.ack(pool, id, &r.reservation_token)?;
//! assert_eq!(done.status, OpStatus::Accepted);
//! assert!(queue.read_message(pool, id)?.is_none());
//! # Ok::<(), cleanup_queue::Error>(())
//! ```

#![deny(missing_docs)]
#![deny(unsafe_code)]
#![warn(clippy::unwrap_used)]

mod admin;
mod clock;
mod codec;
mod compact;
mod engine;
mod error;
mod fault;
#[doc(hidden)]
pub mod fuzzing;
mod integrity;
mod keys;
mod machine;
mod mark;
mod metrics;
mod migrate;
mod model;
mod policy;
mod store;
mod sweeper;
mod wakeup;
mod wal;

pub use admin::RedriveTarget;
pub use clock::{Clock, ManualClock, SystemClock, Timestamp};
pub use compact::Compacted;
pub use engine::{Enqueued, Pending, Queue, QueueBuilder, Reserved, MAX_IDEMPOTENCY_KEY_BYTES};
pub use error::{Error, InputError, Result};
pub use metrics::{Counter, Metrics};
pub use model::{
    reason, CleanupKind, DeadLetter, JsonObject, LeaseExpiryResult, Message, NewMessage, OpStatus,
    Operation, OperationResult, PoolStats, RedriveRecord, Reservation, ReserveFilter, Wakeup,
};
pub use policy::Policy;
pub use store::{CommitStats, Durability};

/// `N` bytes from the OS's random source (reservation tokens, log generation ids).
pub(crate) fn os_random<const N: usize>() -> Result<[u8; N]> {
    use rand::TryRng;
    let mut bytes = [0u8; N];
    rand::rngs::SysRng
        .try_fill_bytes(&mut bytes)
        .map_err(|e| Error::Io(std::io::Error::other(format!("OS randomness failed: {e}"))))?;
    Ok(bytes)
}
