//! The values the queue takes and returns. Field names and status strings are Prefect's.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::clock::Timestamp;
use crate::error::InputError;

/// A JSON object (`target` and `data` of a message).
pub type JsonObject = serde_json::Map<String, serde_json::Value>;

/// The closed set of cleanup kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum CleanupKind {
    /// `cancelling_timeout_teardown.v1`
    CancellingTimeoutTeardown,
    /// `pending_claim_teardown.v1`
    PendingClaimTeardown,
}

impl CleanupKind {
    /// Every kind, in key order.
    pub const ALL: [CleanupKind; 2] = [
        CleanupKind::CancellingTimeoutTeardown,
        CleanupKind::PendingClaimTeardown,
    ];

    /// Prefect's string for the kind.
    pub const fn as_str(self) -> &'static str {
        match self {
            CleanupKind::CancellingTimeoutTeardown => "cancelling_timeout_teardown.v1",
            CleanupKind::PendingClaimTeardown => "pending_claim_teardown.v1",
        }
    }

    /// The one-byte code used in keys.
    pub(crate) const fn code(self) -> u8 {
        match self {
            CleanupKind::CancellingTimeoutTeardown => 1,
            CleanupKind::PendingClaimTeardown => 2,
        }
    }
}

impl fmt::Display for CleanupKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CleanupKind {
    type Err = InputError;

    fn from_str(s: &str) -> Result<CleanupKind, InputError> {
        CleanupKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| InputError::UnknownKind(s.to_string()))
    }
}

/// The outcome of an ack, release or renew.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum OpStatus {
    /// The operation was performed.
    Accepted,
    /// The message is visible: nobody holds a reservation.
    NotCurrent,
    /// No active message with this id in this pool.
    NotFound,
    /// The lease had lapsed; the message was made visible again instead.
    Expired,
    /// The token is not the current reservation's.
    InvalidToken,
    /// Part of Prefect's protocol; this engine reports a wrong pool as `NotFound`.
    Unauthorized,
    /// The message moved to the dead-letter queue.
    DeadLettered,
}

impl OpStatus {
    /// Prefect's string for the status.
    pub const fn as_str(self) -> &'static str {
        match self {
            OpStatus::Accepted => "accepted",
            OpStatus::NotCurrent => "not_current",
            OpStatus::NotFound => "not_found",
            OpStatus::Expired => "expired",
            OpStatus::InvalidToken => "invalid_token",
            OpStatus::Unauthorized => "unauthorized",
            OpStatus::DeadLettered => "dead_lettered",
        }
    }

    const ALL: [OpStatus; 7] = [
        OpStatus::Accepted,
        OpStatus::NotCurrent,
        OpStatus::NotFound,
        OpStatus::Expired,
        OpStatus::InvalidToken,
        OpStatus::Unauthorized,
        OpStatus::DeadLettered,
    ];
}

impl fmt::Display for OpStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for OpStatus {
    type Err = String;

    fn from_str(s: &str) -> Result<OpStatus, String> {
        OpStatus::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| format!("unknown operation status {s:?}"))
    }
}

/// Which lease operation an [`OperationResult`] answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Operation {
    /// `ack`
    Ack,
    /// `release`
    Release,
    /// `renew`
    Renew,
}

impl Operation {
    /// Prefect's string for the operation.
    pub const fn as_str(self) -> &'static str {
        match self {
            Operation::Ack => "ack",
            Operation::Release => "release",
            Operation::Renew => "renew",
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The reason strings the queue returns and records.
pub mod reason {
    /// No active message with this id in this pool.
    pub const MESSAGE_NOT_FOUND: &str = "message_not_found";
    /// The message is visible.
    pub const NO_ACTIVE_RESERVATION: &str = "no_active_reservation";
    /// The token is not the current one.
    pub const RESERVATION_TOKEN_MISMATCH: &str = "reservation_token_mismatch";
    /// The lease lapsed before the operation.
    pub const LEASE_EXPIRED: &str = "lease_expired";
    /// The message was delivered `max_delivery_attempts` times.
    pub const MAX_DELIVERY_ATTEMPTS_REACHED: &str = "max_delivery_attempts_reached";
}

/// What a producer hands to [`Queue::enqueue`](crate::Queue::enqueue).
#[derive(Clone, Debug, PartialEq)]
pub struct NewMessage {
    /// The producer's stable id for the message (scoped by pool).
    pub message_id: Uuid,
    /// The producer's stable deduplication key (non-empty; scoped by pool).
    pub idempotency_key: String,
    /// The work pool.
    pub work_pool_id: Uuid,
    /// Advisory targeting: the work queue, if any.
    pub work_queue_id: Option<Uuid>,
    /// The cleanup kind.
    pub kind: CleanupKind,
    /// What to clean up: must be a JSON object.
    pub target: serde_json::Value,
    /// Extra data: must be a JSON object when given; `None` means `{}`.
    pub data: Option<serde_json::Value>,
}

impl NewMessage {
    /// A message with no work queue and no data.
    pub fn new(
        work_pool_id: Uuid,
        message_id: Uuid,
        idempotency_key: impl Into<String>,
        kind: CleanupKind,
        target: serde_json::Value,
    ) -> NewMessage {
        NewMessage {
            message_id,
            idempotency_key: idempotency_key.into(),
            work_pool_id,
            work_queue_id: None,
            kind,
            target,
            data: None,
        }
    }

    /// Sets the work queue.
    pub fn work_queue(mut self, work_queue_id: Uuid) -> NewMessage {
        self.work_queue_id = Some(work_queue_id);
        self
    }

    /// Sets the data.
    pub fn data(mut self, data: serde_json::Value) -> NewMessage {
        self.data = Some(data);
        self
    }
}

/// A stored cleanup message.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// The producer's id (scoped by pool).
    pub message_id: Uuid,
    /// The producer's deduplication key.
    pub idempotency_key: String,
    /// The work pool.
    pub work_pool_id: Uuid,
    /// The advisory work queue.
    pub work_queue_id: Option<Uuid>,
    /// The cleanup kind.
    pub kind: CleanupKind,
    /// What to clean up.
    pub target: JsonObject,
    /// Extra data (`{}` when none was given).
    pub data: JsonObject,
    /// When it was first enqueued.
    pub created_at: Timestamp,
    /// When it last changed.
    pub updated_at: Timestamp,
    /// How many reservations have been committed.
    pub delivery_count: u32,
}

/// A live reservation: the message plus its fencing token and lease.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reservation {
    /// The reserved message (`delivery_count >= 1`).
    pub message: Message,
    /// The unguessable token every follow-up operation must present.
    pub reservation_token: String,
    /// When the lease lapses unless renewed.
    pub lease_expires_at: Timestamp,
}

/// A message in the dead-letter queue.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The message as it was when it moved.
    pub message: Message,
    /// Why it moved (`max_delivery_attempts_reached`).
    pub reason: String,
    /// Its delivery count when it moved.
    pub final_delivery_count: u32,
    /// When it moved.
    pub moved_at: Timestamp,
    /// The reservation it had, if it moved from a reservation.
    pub reservation_token: Option<String>,
    /// That reservation's lease.
    pub lease_expires_at: Option<Timestamp>,
    /// The worker's reason, if it moved on a release.
    pub release_reason: Option<String>,
}

/// The result of an ack, release or renew.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OperationResult {
    /// The message the operation named.
    pub message_id: Uuid,
    /// Which operation.
    pub operation: Operation,
    /// What happened.
    pub status: OpStatus,
    /// The new lease, for an accepted renew only.
    pub lease_expires_at: Option<Timestamp>,
    /// Why it was not accepted (always set unless accepted).
    pub reason: Option<String>,
    /// The dead letter, when the message moved to the DLQ.
    pub dead_letter: Option<DeadLetter>,
}

/// The result of [`Queue::expire_leases`](crate::Queue::expire_leases).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LeaseExpiryResult {
    /// Messages made visible again.
    pub redelivered: Vec<Message>,
    /// Messages moved to the DLQ.
    pub dead_lettered: Vec<DeadLetter>,
}

impl LeaseExpiryResult {
    /// How many leases were expired.
    pub fn len(&self) -> usize {
        self.redelivered.len() + self.dead_lettered.len()
    }

    /// True when nothing was due.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A pool's wakeup sequence value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wakeup {
    /// The pool.
    pub work_pool_id: Uuid,
    /// The sequence (>= 1).
    pub sequence: u64,
}

/// How `reserve` chooses: kinds, preferred work queues, fallback.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReserveFilter {
    /// `None`: every kind. `Some(empty)`: nothing matches.
    pub cleanup_kinds: Option<Vec<CleanupKind>>,
    /// `None`: one pass over the pool. `Some(empty)`: the restricted pass matches nothing.
    pub preferred_work_queue_ids: Option<Vec<Uuid>>,
    /// After the restricted pass, one more over the whole pool.
    pub allow_fallback_to_any_queue: bool,
}

impl Default for ReserveFilter {
    fn default() -> ReserveFilter {
        ReserveFilter {
            cleanup_kinds: None,
            preferred_work_queue_ids: None,
            allow_fallback_to_any_queue: true,
        }
    }
}

impl ReserveFilter {
    /// Any message of the pool.
    pub fn any() -> ReserveFilter {
        ReserveFilter::default()
    }

    /// Only these kinds.
    pub fn kinds(mut self, kinds: impl IntoIterator<Item = CleanupKind>) -> ReserveFilter {
        self.cleanup_kinds = Some(kinds.into_iter().collect());
        self
    }

    /// Prefer these queues; `fallback` allows a second pass over the whole pool.
    pub fn queues(
        mut self,
        queues: impl IntoIterator<Item = Uuid>,
        fallback: bool,
    ) -> ReserveFilter {
        self.preferred_work_queue_ids = Some(queues.into_iter().collect());
        self.allow_fallback_to_any_queue = fallback;
        self
    }
}

/// Counts and ages for one pool (`Queue::pool_stats`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolStats {
    /// The pool.
    pub work_pool_id: Uuid,
    /// Messages waiting for a reservation.
    pub visible: u64,
    /// Messages with a live reservation.
    pub reserved: u64,
    /// Messages in the dead-letter queue.
    pub dead_lettered: u64,
    /// Acked messages still keeping their idempotency key.
    pub tombstones: u64,
    /// When the longest-waiting visible message became visible.
    pub oldest_visible_at: Option<Timestamp>,
    /// The earliest lease expiry among reservations.
    pub next_lease_expires_at: Option<Timestamp>,
    /// The pool's wakeup sequence.
    pub wakeup_sequence: u64,
}

/// The audit record of one redrive of a dead letter back to the queue.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RedriveRecord {
    /// When it was redriven.
    pub redriven_at: Timestamp,
    /// Who redrove it (free text: user, tool, host).
    pub actor: String,
    /// Why.
    pub reason: String,
    /// Whether the delivery count was reset to 0.
    pub reset_count: bool,
    /// The dead letter as it was.
    pub dead_letter: DeadLetter,
}
