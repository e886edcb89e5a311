//! THE state machine: every transition a message can make, as pure functions of
//! `(record, now, policy)`. No sled, no clock reads, no I/O. The engine reads records,
//! calls these, and writes what they return in one transaction.
//!
//! ```text
//!             enqueue                 reserve
//!   (none) ──────────▶ VISIBLE ─────────────────▶ RESERVED ──ack──▶ ACKED ──retention──▶ (gone)
//!                        ▲  │ count >= max          │  │
//!                        │  └──────────▶ DEAD ◀─────┘  │ release / expiry, count >= max
//!                        └─────────────────────────────┘ release / expiry, count < max
//! ```

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::clock::Timestamp;
use crate::model::{reason, CleanupKind, DeadLetter, Message, OpStatus, Operation, Reservation};
use crate::policy::Policy;

/// One message in any state: the value of the `messages` tree (see `codec` for the bytes).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Record {
    /// The `seq` of its enqueue, never changed: where the record lives (`keys::message`).
    /// Stored before the bincode body (`codec::encode_record`), not in it.
    #[serde(skip)]
    pub born: u64,
    pub work_pool_id: Uuid,
    pub message_id: Uuid,
    pub idempotency_key: String,
    pub kind: CleanupKind,
    pub work_queue_id: Option<Uuid>,
    /// JSON object text.
    pub target: String,
    /// JSON object text.
    pub data: String,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    pub delivery_count: u32,
    /// When it last became visible (enqueue, release, expiry): the FIFO order.
    pub visible_at: Timestamp,
    /// Engine-wide monotonic stamp of its last transition; breaks ties in every order.
    pub seq: u64,
    pub state: State,
}

/// Where a message is in its lifecycle.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum State {
    Visible,
    Reserved {
        token: String,
        lease_expires_at: Timestamp,
    },
    Dead {
        reason: String,
        moved_at: Timestamp,
        final_delivery_count: u32,
        reservation_token: Option<String>,
        lease_expires_at: Option<Timestamp>,
        release_reason: Option<String>,
    },
    Acked {
        completed_at: Timestamp,
    },
}

impl Record {
    /// A freshly enqueued, visible message.
    #[allow(clippy::too_many_arguments)]
    pub fn new_visible(
        work_pool_id: Uuid,
        message_id: Uuid,
        idempotency_key: String,
        kind: CleanupKind,
        work_queue_id: Option<Uuid>,
        target: String,
        data: String,
        now: Timestamp,
        seq: u64,
    ) -> Record {
        Record {
            born: seq,
            work_pool_id,
            message_id,
            idempotency_key,
            kind,
            work_queue_id,
            target,
            data,
            created_at: now,
            updated_at: now,
            delivery_count: 0,
            visible_at: now,
            seq,
            state: State::Visible,
        }
    }

    /// VISIBLE or RESERVED.
    pub fn is_active(&self) -> bool {
        matches!(self.state, State::Visible | State::Reserved { .. })
    }

    /// Whether the record still takes part in lookups: always, except an acked tombstone
    /// whose retention has run out (`completed_at + retention <= now` counts as gone).
    pub fn is_live(&self, now: Timestamp, policy: &Policy) -> bool {
        match (&self.state, policy.completed_retention) {
            (State::Acked { completed_at }, Some(retention)) => {
                completed_at.saturating_add(retention) > now
            }
            _ => true,
        }
    }
}

/// VISIBLE -> RESERVED: one more committed delivery, a new token and lease.
pub(crate) fn reserve(
    rec: &Record,
    now: Timestamp,
    policy: &Policy,
    token: String,
    seq: u64,
) -> Record {
    Record {
        delivery_count: rec.delivery_count.saturating_add(1),
        updated_at: now,
        seq,
        state: State::Reserved {
            token,
            lease_expires_at: now.saturating_add(policy.lease),
        },
        ..rec.clone()
    }
}

/// Any active state -> DEAD with reason `max_delivery_attempts_reached`. The message
/// snapshot is taken as it is; the reservation (if any) is recorded.
pub(crate) fn dead_letter(rec: &Record, now: Timestamp, release_reason: Option<&str>) -> Record {
    let (reservation_token, lease_expires_at) = match &rec.state {
        State::Reserved {
            token,
            lease_expires_at,
        } => (Some(token.clone()), Some(*lease_expires_at)),
        _ => (None, None),
    };
    Record {
        state: State::Dead {
            reason: reason::MAX_DELIVERY_ATTEMPTS_REACHED.to_string(),
            moved_at: now,
            final_delivery_count: rec.delivery_count,
            reservation_token,
            lease_expires_at,
            release_reason: release_reason.map(str::to_string),
        },
        ..rec.clone()
    }
}

/// RESERVED -> VISIBLE at the back of the FIFO.
fn make_visible(rec: &Record, now: Timestamp, seq: u64) -> Record {
    Record {
        updated_at: now,
        visible_at: now,
        seq,
        state: State::Visible,
        ..rec.clone()
    }
}

/// The expiry transition of a reservation: DLQ when attempts are used up, else visible.
pub(crate) fn expire(rec: &Record, now: Timestamp, policy: &Policy, seq: u64) -> Record {
    if rec.delivery_count >= policy.max_delivery_attempts {
        dead_letter(rec, now, None)
    } else {
        make_visible(rec, now, seq)
    }
}

/// DEAD -> VISIBLE at the back of the FIFO (an operator's redrive), optionally with the
/// delivery count reset to 0.
pub(crate) fn redrive(rec: &Record, now: Timestamp, seq: u64, reset_count: bool) -> Record {
    Record {
        delivery_count: if reset_count { 0 } else { rec.delivery_count },
        ..make_visible(rec, now, seq)
    }
}

/// What an ack / release / renew did.
#[derive(Debug)]
pub(crate) struct LeaseOutcome {
    pub status: OpStatus,
    pub reason: Option<&'static str>,
    /// The record to write, if anything changes.
    pub new: Option<Record>,
    /// The new lease (accepted renew only).
    pub lease_expires_at: Option<Timestamp>,
}

impl LeaseOutcome {
    fn rejected(status: OpStatus, reason: &'static str) -> LeaseOutcome {
        LeaseOutcome {
            status,
            reason: Some(reason),
            new: None,
            lease_expires_at: None,
        }
    }

    /// Whether the outcome made the message visible (the pool must be woken).
    pub fn made_visible(&self) -> bool {
        matches!(self.new.as_ref().map(|r| &r.state), Some(State::Visible))
    }
}

/// Constant-time equality of two tokens (the length is not secret).
fn tokens_equal(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Ack, release or renew of `rec` (the record with this id in this pool, if any), with the
/// checks in semantics order: not found, not current, token, lease expired, then the
/// operation. `release_reason` is `Some` exactly for a release.
pub(crate) fn lease_op(
    op: Operation,
    rec: Option<&Record>,
    token: &str,
    release_reason: Option<&str>,
    now: Timestamp,
    policy: &Policy,
    seq: u64,
) -> LeaseOutcome {
    let rec = match rec {
        Some(r) if r.is_active() => r,
        _ => return LeaseOutcome::rejected(OpStatus::NotFound, reason::MESSAGE_NOT_FOUND),
    };
    let lease_expires_at = match &rec.state {
        State::Reserved {
            token: current,
            lease_expires_at,
        } => {
            if !tokens_equal(current, token) {
                return LeaseOutcome::rejected(
                    OpStatus::InvalidToken,
                    reason::RESERVATION_TOKEN_MISMATCH,
                );
            }
            *lease_expires_at
        }
        _ => return LeaseOutcome::rejected(OpStatus::NotCurrent, reason::NO_ACTIVE_RESERVATION),
    };
    if lease_expires_at <= now {
        let new = expire(rec, now, policy, seq);
        let (status, why) = if matches!(new.state, State::Dead { .. }) {
            (
                OpStatus::DeadLettered,
                reason::MAX_DELIVERY_ATTEMPTS_REACHED,
            )
        } else {
            (OpStatus::Expired, reason::LEASE_EXPIRED)
        };
        return LeaseOutcome {
            status,
            reason: Some(why),
            new: Some(new),
            lease_expires_at: None,
        };
    }
    match op {
        Operation::Ack => LeaseOutcome {
            status: OpStatus::Accepted,
            reason: None,
            new: Some(Record {
                updated_at: now,
                state: State::Acked { completed_at: now },
                ..rec.clone()
            }),
            lease_expires_at: None,
        },
        Operation::Release if rec.delivery_count >= policy.max_delivery_attempts => LeaseOutcome {
            status: OpStatus::DeadLettered,
            reason: Some(reason::MAX_DELIVERY_ATTEMPTS_REACHED),
            new: Some(dead_letter(rec, now, release_reason)),
            lease_expires_at: None,
        },
        Operation::Release => LeaseOutcome {
            status: OpStatus::Accepted,
            reason: None,
            new: Some(make_visible(rec, now, seq)),
            lease_expires_at: None,
        },
        Operation::Renew => {
            let lease = now.saturating_add(policy.lease);
            LeaseOutcome {
                status: OpStatus::Accepted,
                reason: None,
                new: Some(Record {
                    updated_at: now,
                    seq,
                    state: State::Reserved {
                        token: token.to_string(),
                        lease_expires_at: lease,
                    },
                    ..rec.clone()
                }),
                lease_expires_at: Some(lease),
            }
        }
    }
}

/// Views of a record as the public types. JSON text that does not parse as an object is
/// reported as the `Err` detail (the caller names the tree and key).
impl Record {
    pub fn message(&self) -> Result<Message, String> {
        Ok(Message {
            message_id: self.message_id,
            idempotency_key: self.idempotency_key.clone(),
            work_pool_id: self.work_pool_id,
            work_queue_id: self.work_queue_id,
            kind: self.kind,
            target: parse_object(&self.target, "target")?,
            data: parse_object(&self.data, "data")?,
            created_at: self.created_at,
            updated_at: self.updated_at,
            delivery_count: self.delivery_count,
        })
    }

    pub fn reservation(&self) -> Result<Option<Reservation>, String> {
        match &self.state {
            State::Reserved {
                token,
                lease_expires_at,
            } => Ok(Some(Reservation {
                message: self.message()?,
                reservation_token: token.clone(),
                lease_expires_at: *lease_expires_at,
            })),
            _ => Ok(None),
        }
    }

    pub fn dead_letter(&self) -> Result<Option<DeadLetter>, String> {
        match &self.state {
            State::Dead {
                reason,
                moved_at,
                final_delivery_count,
                reservation_token,
                lease_expires_at,
                release_reason,
            } => Ok(Some(DeadLetter {
                message: self.message()?,
                reason: reason.clone(),
                final_delivery_count: *final_delivery_count,
                moved_at: *moved_at,
                reservation_token: reservation_token.clone(),
                lease_expires_at: *lease_expires_at,
                release_reason: release_reason.clone(),
            })),
            _ => Ok(None),
        }
    }
}

fn parse_object(text: &str, field: &str) -> Result<crate::model::JsonObject, String> {
    serde_json::from_str(text).map_err(|e| format!("{field} is not a JSON object: {e}"))
}
