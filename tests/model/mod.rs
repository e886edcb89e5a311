//! Model-based checking of the engine against a deliberately simple reference model of
//! `semantics.md` (plain vectors, linear scans, no indexes), shared by `tests/model_check.rs`
//! and the cargo-fuzz target `ops` (which includes this file with `#[path]`).
//!
//! A byte string decodes into a list of [`Step`]s over small alphabets (3 pools, 4 message
//! ids, 3 idempotency keys, 2 work queues, both kinds) so that collisions, duplicates and
//! cross-pool mix-ups are common. Each step runs on the engine and on the [`Model`]; the full
//! return values must be equal, and after every step the whole observable state (every
//! message slot through `read_message` / `read_dead_letter` / `read_reservation`, the wakeup
//! sequence of every pool) must be equal and `check_integrity()` must be empty. On top of
//! that, model-independent invariants are checked on what the engine returned (see
//! [`Harness::check_invariants`]).
//!
//! The model is written from `semantics.md` alone. Its only "implementation-shaped" choices
//! are the two orderings the contract names: reserve candidates in the order they last
//! became visible (ties by a global monotonic counter), and due leases by
//! `(lease_expires_at, order of the last reserve/renew)`.

#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use cleanup_queue::{
    CleanupKind, DeadLetter, Durability, Error, InputError, JsonObject, LeaseExpiryResult,
    ManualClock, Message, NewMessage, OpStatus, Operation, OperationResult, Policy, Queue,
    Reservation, ReserveFilter, Timestamp, Wakeup,
};
use serde_json::{json, Value};
use uuid::Uuid;

// ---------------------------------------------------------------------------------------
// Alphabets
// ---------------------------------------------------------------------------------------

/// Number of pools, message ids, idempotency keys in the alphabets.
pub const POOLS: usize = 3;
pub const IDS: usize = 4;
pub const KEYS: usize = 3;

/// The clock starts here (2027-01-15T08:00:00Z).
pub const START_MICROS: i64 = 1_800_000_000_000_000;

pub fn pool(i: u8) -> Uuid {
    // Pools sort in a different order than their index: the model must not rely on it.
    Uuid::from_u128(0x9000 - u128::from(i) * 0x10)
}

pub fn msg_id(i: u8) -> Uuid {
    Uuid::from_u128(0x5000 + u128::from(i))
}

pub fn queue_id(i: u8) -> Uuid {
    Uuid::from_u128(0x7000 + u128::from(i))
}

pub fn key(i: u8) -> String {
    if i == u8::MAX {
        String::new()
    } else {
        format!("key-{i}")
    }
}

pub fn kind(i: u8) -> CleanupKind {
    if i.is_multiple_of(2) {
        CleanupKind::CancellingTimeoutTeardown
    } else {
        CleanupKind::PendingClaimTeardown
    }
}

fn pool_index(p: Uuid) -> usize {
    (0..POOLS as u8)
        .position(|i| pool(i) == p)
        .unwrap_or(usize::MAX)
}

fn id_index(id: Uuid) -> usize {
    (0..IDS as u8)
        .position(|i| msg_id(i) == id)
        .unwrap_or(usize::MAX)
}

// ---------------------------------------------------------------------------------------
// Steps and their decoding
// ---------------------------------------------------------------------------------------

/// How a lease operation picks its token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenPick {
    /// The token of the message's current reservation (else its latest one).
    Current,
    /// One of the message's earlier tokens (by index).
    Stale(u8),
    /// A token of some other reservation (by index).
    Other(u8),
    /// A string that was never a token.
    Garbage,
}

/// One step of a test sequence.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    Enqueue {
        pool: u8,
        id: u8,
        /// `u8::MAX`: the empty key (an input error).
        key: u8,
        kind: u8,
        queue: Option<u8>,
        /// `None`: a target that is not an object (an input error).
        target: Option<u8>,
        /// 0: no data; 1: `{}`; 2: `{"n": ..}`; 3: not an object (an input error).
        data: u8,
    },
    Reserve {
        pool: u8,
        /// `None`: every kind; `Some(list)` of kind indexes (may be empty).
        kinds: Option<Vec<u8>>,
        /// `None`: no preference; `Some(list)` of queue indexes (may be empty; 2 is unknown).
        queues: Option<Vec<u8>>,
        fallback: bool,
    },
    Lease {
        op: Operation,
        pool: u8,
        id: u8,
        /// `Some(n)`: instead of `pool` and `id`, the `n`th currently reserved message (in
        /// pool, id order), if any is reserved.
        reserved: Option<u8>,
        token: TokenPick,
        /// Present the token in the next pool instead of the message's own.
        wrong_pool: bool,
        /// Release with an empty reason (an input error).
        empty_reason: bool,
    },
    Expire {
        limit: usize,
        pool: Option<u8>,
    },
    /// Advance the clock; see [`advance_amount`].
    Advance(u8),
    SetPolicy {
        lease_micros: u64,
        max: u32,
        retention_micros: Option<u64>,
    },
    Wake {
        pool: u8,
    },
    ReadSequence {
        pool: u8,
    },
    /// Non-blocking wait; `after` picks 0, current - 1, current, current + 1.
    Wait {
        pool: u8,
        after: u8,
    },
    Prune {
        limit: usize,
    },
    Restart,
}

/// The most steps one input decodes to.
pub const MAX_STEPS: usize = 200;
/// The most restarts one input decodes to (later ones are skipped).
pub const MAX_RESTARTS: usize = 4;

struct Bytes<'a> {
    data: &'a [u8],
    at: usize,
}

impl Bytes<'_> {
    fn next(&mut self) -> Option<u8> {
        let b = *self.data.get(self.at)?;
        self.at += 1;
        Some(b)
    }
}

/// Decodes a byte string into steps (a trailing partial step is dropped).
pub fn decode(data: &[u8]) -> Vec<Step> {
    let mut b = Bytes { data, at: 0 };
    let mut steps = Vec::new();
    let mut restarts = 0;
    while steps.len() < MAX_STEPS {
        match decode_step(&mut b) {
            // Reopening is the slowest step by far (sled recovery): a few per input suffice.
            Some(Step::Restart) if restarts == MAX_RESTARTS => {}
            Some(s) => {
                restarts += usize::from(s == Step::Restart);
                steps.push(s)
            }
            None => break,
        }
    }
    steps
}

fn decode_step(b: &mut Bytes<'_>) -> Option<Step> {
    let op = b.next()? % 32;
    Some(match op {
        0..=5 => {
            let p = b.next()? % POOLS as u8;
            let id = b.next()? % IDS as u8;
            let k = b.next()?;
            // Mostly the id's own key (duplicates by id), sometimes any key (duplicates by
            // key and id conflicts), rarely the empty key.
            let key = match k % 16 {
                15 => u8::MAX,
                0..=4 => (k / 16) % KEYS as u8,
                _ => id % KEYS as u8,
            };
            let bits = b.next()?;
            let t = b.next()?;
            Step::Enqueue {
                pool: p,
                id,
                key,
                kind: bits & 1,
                queue: match (bits >> 1) % 3 {
                    0 => None,
                    q => Some(q - 1),
                },
                target: if t == 0xff { None } else { Some(t % 4) },
                data: match (bits >> 3) % 8 {
                    7 => 3,
                    d => d % 3,
                },
            }
        }
        6..=10 => {
            let p = b.next()? % POOLS as u8;
            let f = b.next()?;
            Step::Reserve {
                pool: p,
                kinds: match f % 5 {
                    0 => None,
                    1 => Some(vec![]),
                    2 => Some(vec![0]),
                    3 => Some(vec![1]),
                    _ => Some(vec![1, 0]),
                },
                queues: match (f / 5) % 6 {
                    0 => None,
                    1 => Some(vec![]),
                    2 => Some(vec![0]),
                    3 => Some(vec![1]),
                    4 => Some(vec![1, 0, 1]),
                    _ => Some(vec![2]),
                },
                fallback: (f / 30) % 2 == 0,
            }
        }
        11..=16 => {
            let o = b.next()?;
            let p = b.next()? % POOLS as u8;
            let id = b.next()? % IDS as u8;
            let t = b.next()?;
            let pick = b.next()?;
            Step::Lease {
                reserved: (pick % 4 != 0).then_some(pick / 4),
                op: match o % 3 {
                    0 => Operation::Ack,
                    1 => Operation::Release,
                    _ => Operation::Renew,
                },
                pool: p,
                id,
                token: match t % 6 {
                    0..=2 => TokenPick::Current,
                    3 => TokenPick::Stale(t / 6),
                    4 => TokenPick::Other(t / 6),
                    _ => TokenPick::Garbage,
                },
                wrong_pool: o / 3 % 6 == 0,
                empty_reason: o >= 250,
            }
        }
        17..=18 => {
            let x = b.next()?;
            Step::Expire {
                limit: usize::from(x % 4),
                pool: match (x / 4) % 4 {
                    3 => None,
                    p => Some(p),
                },
            }
        }
        19..=22 | 30..=31 => Step::Advance(b.next()?),
        23..=24 => {
            let l = b.next()?;
            let m = b.next()?;
            let r = b.next()?;
            Step::SetPolicy {
                lease_micros: [
                    1_000_000, 2_000_000, 30_000_000, 1_000_000, 2_000_000, 3_000_000, 1, 0,
                ][usize::from(l % 8)],
                max: [1, 2, 3, 1, 2, 3, 5, 0][usize::from(m % 8)],
                retention_micros: [None, Some(0), Some(1_000_000), Some(3_000_000)]
                    [usize::from(r % 4)],
            }
        }
        25 => Step::Wake {
            pool: b.next()? % POOLS as u8,
        },
        26 => Step::ReadSequence {
            pool: b.next()? % POOLS as u8,
        },
        27 => {
            let x = b.next()?;
            Step::Wait {
                pool: x % POOLS as u8,
                after: (x / 4) % 4,
            }
        }
        28 => Step::Prune {
            limit: usize::from(b.next()? % 3) + 1,
        },
        _ => Step::Restart,
    })
}

/// How far an `Advance(x)` step moves the clock under `policy`: around the lease and
/// retention boundaries, plus a few fixed amounts.
pub fn advance_amount(x: u8, policy: &Policy) -> Duration {
    let lease = policy.lease;
    let one = Duration::from_micros(1);
    let retention = policy.completed_retention.unwrap_or(Duration::from_secs(2));
    match x % 12 {
        0 => Duration::ZERO,
        1 => one,
        2 => lease.saturating_sub(one),
        3 => lease,
        4 => lease + one,
        5 => retention.saturating_sub(one),
        6 => retention,
        7 => retention + one,
        8 => Duration::from_millis(500),
        9 => Duration::from_secs(7),
        10 => Duration::from_secs(3600),
        _ => lease / 2,
    }
}

// ---------------------------------------------------------------------------------------
// The reference model
// ---------------------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq)]
enum MState {
    Visible,
    Reserved {
        token: String,
        lease_expires_at: Timestamp,
    },
    Dead {
        moved_at: Timestamp,
        final_delivery_count: u32,
        token: Option<String>,
        lease_expires_at: Option<Timestamp>,
        release_reason: Option<String>,
    },
    Acked {
        completed_at: Timestamp,
    },
}

#[derive(Clone, Debug)]
struct MRec {
    msg: Message,
    state: MState,
    /// When it last became visible.
    visible_at: Timestamp,
    /// Global monotonic counter value of its last "became visible", reserve or renew.
    order: u64,
    /// Which incarnation of the `(pool, id)` slot this is (for invariant checks).
    incarnation: u64,
}

impl MRec {
    fn is_active(&self) -> bool {
        matches!(self.state, MState::Visible | MState::Reserved { .. })
    }

    fn dead_letter(&self) -> Option<DeadLetter> {
        match &self.state {
            MState::Dead {
                moved_at,
                final_delivery_count,
                token,
                lease_expires_at,
                release_reason,
            } => Some(DeadLetter {
                message: self.msg.clone(),
                reason: "max_delivery_attempts_reached".to_string(),
                final_delivery_count: *final_delivery_count,
                moved_at: *moved_at,
                reservation_token: token.clone(),
                lease_expires_at: *lease_expires_at,
                release_reason: release_reason.clone(),
            }),
            _ => None,
        }
    }

    fn reservation(&self) -> Option<Reservation> {
        match &self.state {
            MState::Reserved {
                token,
                lease_expires_at,
            } => Some(Reservation {
                message: self.msg.clone(),
                reservation_token: token.clone(),
                lease_expires_at: *lease_expires_at,
            }),
            _ => None,
        }
    }

    /// Moves to the DLQ: the message snapshot as it is, the reservation (if any) recorded.
    fn move_to_dlq(&mut self, now: Timestamp, release_reason: Option<String>) -> DeadLetter {
        let (token, lease) = match &self.state {
            MState::Reserved {
                token,
                lease_expires_at,
            } => (Some(token.clone()), Some(*lease_expires_at)),
            _ => (None, None),
        };
        self.state = MState::Dead {
            moved_at: now,
            final_delivery_count: self.msg.delivery_count,
            token,
            lease_expires_at: lease,
            release_reason,
        };
        self.dead_letter().expect("just moved to the DLQ")
    }
}

/// What a model enqueue did.
#[derive(Clone, Debug, PartialEq)]
pub struct MEnqueued {
    pub message: Message,
    pub duplicate: bool,
}

/// What a model reserve did (`token` is the engine's token, or a placeholder).
#[derive(Clone, Debug, PartialEq, Default)]
pub struct MReserved {
    pub reservation: Option<Reservation>,
    pub expired: LeaseExpiryResult,
    pub dead_lettered: Vec<DeadLetter>,
}

/// Errors as text: Prefect's sentences for input errors the contract names.
pub type MResult<T> = Result<T, String>;

/// The reference model.
#[derive(Debug, Default)]
pub struct Model {
    recs: Vec<MRec>,
    wake: HashMap<Uuid, u64>,
    pub policy: Policy,
    counter: u64,
    incarnations: u64,
    /// Pools woken in the current call (one bump per pool per atomic step).
    woken: Vec<Uuid>,
}

impl Model {
    pub fn new(policy: Policy) -> Model {
        Model {
            policy,
            ..Model::default()
        }
    }

    fn tick(&mut self) -> u64 {
        self.counter += 1;
        self.counter
    }

    /// Marks `pool` woken in this atomic step.
    fn wake_in_step(&mut self, pool: Uuid) {
        if !self.woken.contains(&pool) {
            self.woken.push(pool);
        }
    }

    /// Ends an atomic step: one bump per woken pool.
    fn end_step(&mut self) {
        for p in std::mem::take(&mut self.woken) {
            *self.wake.entry(p).or_insert(0) += 1;
        }
    }

    fn is_live(&self, r: &MRec, now: Timestamp) -> bool {
        match (&r.state, self.policy.completed_retention) {
            (MState::Acked { completed_at }, Some(ret)) => {
                let gone_at = completed_at.as_micros() + ret.as_micros() as i64;
                gone_at > now.as_micros()
            }
            _ => true,
        }
    }

    fn find(&self, pool: Uuid, id: Uuid) -> Option<usize> {
        self.recs
            .iter()
            .position(|r| r.msg.work_pool_id == pool && r.msg.message_id == id)
    }

    fn make_visible(&mut self, i: usize, now: Timestamp) {
        let order = self.tick();
        let r = &mut self.recs[i];
        r.state = MState::Visible;
        r.msg.updated_at = now;
        r.visible_at = now;
        r.order = order;
        let p = r.msg.work_pool_id;
        self.wake_in_step(p);
    }

    pub fn enqueue(&mut self, m: &NewMessage, now: Timestamp) -> MResult<MEnqueued> {
        if m.idempotency_key.is_empty() {
            return Err("idempotency_key must be non-empty".into());
        }
        let target = match &m.target {
            Value::Object(o) => o.clone(),
            _ => return Err("target must be a JSON object".into()),
        };
        let data = match &m.data {
            None => JsonObject::new(),
            Some(Value::Object(o)) => o.clone(),
            Some(_) => return Err("data must be a JSON object".into()),
        };
        let pool = m.work_pool_id;
        let by_id = self.recs.iter().position(|r| {
            r.msg.work_pool_id == pool && r.msg.message_id == m.message_id && self.is_live(r, now)
        });
        let existing = match by_id {
            Some(i) if self.recs[i].msg.idempotency_key != m.idempotency_key => {
                return Err(
                    "message_id is already associated with a different cleanup message".into(),
                )
            }
            Some(i) => Some(i),
            None => self.recs.iter().position(|r| {
                r.msg.work_pool_id == pool
                    && r.msg.idempotency_key == m.idempotency_key
                    && self.is_live(r, now)
            }),
        };
        if let Some(i) = existing {
            let message = self.recs[i].msg.clone();
            if self.recs[i].state == MState::Visible {
                self.wake_in_step(pool);
            }
            self.end_step();
            return Ok(MEnqueued {
                message,
                duplicate: true,
            });
        }
        // Whatever still holds this id or key in the pool is a tombstone whose retention ran
        // out: it is gone for good now.
        let before = self.recs.len();
        self.recs.retain(|r| {
            !(r.msg.work_pool_id == pool
                && (r.msg.message_id == m.message_id || r.msg.idempotency_key == m.idempotency_key))
        });
        debug_assert!(before - self.recs.len() <= 2);
        let message = Message {
            message_id: m.message_id,
            idempotency_key: m.idempotency_key.clone(),
            work_pool_id: pool,
            work_queue_id: m.work_queue_id,
            kind: m.kind,
            target,
            data,
            created_at: now,
            updated_at: now,
            delivery_count: 0,
        };
        let order = self.tick();
        self.incarnations += 1;
        self.recs.push(MRec {
            msg: message.clone(),
            state: MState::Visible,
            visible_at: now,
            order,
            incarnation: self.incarnations,
        });
        self.wake_in_step(pool);
        self.end_step();
        Ok(MEnqueued {
            message,
            duplicate: false,
        })
    }

    /// The expiry transition of record `i` (which is reserved and due).
    fn expire_one(&mut self, i: usize, now: Timestamp, out: &mut LeaseExpiryResult) {
        if self.recs[i].msg.delivery_count >= self.policy.max_delivery_attempts {
            let dl = self.recs[i].move_to_dlq(now, None);
            out.dead_lettered.push(dl);
        } else {
            self.make_visible(i, now);
            out.redelivered.push(self.recs[i].msg.clone());
        }
    }

    fn expire_inner(
        &mut self,
        limit: usize,
        pool: Option<Uuid>,
        now: Timestamp,
    ) -> LeaseExpiryResult {
        let mut due: Vec<(Timestamp, u64, usize)> = self
            .recs
            .iter()
            .enumerate()
            .filter_map(|(i, r)| match r.state {
                MState::Reserved {
                    lease_expires_at, ..
                } if lease_expires_at <= now && pool.is_none_or(|p| p == r.msg.work_pool_id) => {
                    Some((lease_expires_at, r.order, i))
                }
                _ => None,
            })
            .collect();
        due.sort();
        let mut out = LeaseExpiryResult::default();
        for (_, _, i) in due.into_iter().take(limit) {
            self.expire_one(i, now, &mut out);
        }
        out
    }

    pub fn expire_leases(
        &mut self,
        limit: usize,
        pool: Option<Uuid>,
        now: Timestamp,
    ) -> MResult<LeaseExpiryResult> {
        if limit < 1 {
            return Err("limit must be at least 1".into());
        }
        let out = self.expire_inner(limit, pool, now);
        self.end_step();
        Ok(out)
    }

    /// `token`: what the engine handed out (the model has no randomness of its own).
    pub fn reserve(
        &mut self,
        pool: Uuid,
        filter: &ReserveFilter,
        now: Timestamp,
        token: Option<String>,
    ) -> MReserved {
        let expired = self.expire_inner(100, Some(pool), now);
        self.end_step();
        let mut out = MReserved {
            expired,
            ..MReserved::default()
        };
        let kind_ok = |k: CleanupKind| {
            filter
                .cleanup_kinds
                .as_ref()
                .is_none_or(|ks| ks.contains(&k))
        };
        let passes: Vec<Option<Vec<Uuid>>> = match &filter.preferred_work_queue_ids {
            None => vec![None],
            Some(qs) if filter.allow_fallback_to_any_queue => vec![Some(qs.clone()), None],
            Some(qs) => vec![Some(qs.clone())],
        };
        for pass in passes {
            let mut cands: Vec<(Timestamp, u64, usize)> = self
                .recs
                .iter()
                .enumerate()
                .filter(|(_, r)| {
                    r.msg.work_pool_id == pool
                        && r.state == MState::Visible
                        && kind_ok(r.msg.kind)
                        && match &pass {
                            None => true,
                            Some(qs) => r.msg.work_queue_id.is_some_and(|q| qs.contains(&q)),
                        }
                })
                .map(|(i, r)| (r.visible_at, r.order, i))
                .collect();
            cands.sort();
            for (_, _, i) in cands {
                if self.recs[i].msg.delivery_count >= self.policy.max_delivery_attempts {
                    let dl = self.recs[i].move_to_dlq(now, None);
                    out.dead_lettered.push(dl);
                    continue;
                }
                let order = self.tick();
                let lease = self.policy.lease;
                let r = &mut self.recs[i];
                r.msg.delivery_count += 1;
                r.msg.updated_at = now;
                r.order = order;
                let token = token.unwrap_or_else(|| "<the engine handed out no token>".into());
                let lease_expires_at = now.saturating_add(lease);
                r.state = MState::Reserved {
                    token: token.clone(),
                    lease_expires_at,
                };
                out.reservation = Some(Reservation {
                    message: r.msg.clone(),
                    reservation_token: token,
                    lease_expires_at,
                });
                self.end_step();
                return out;
            }
        }
        self.end_step();
        out
    }

    pub fn lease_op(
        &mut self,
        op: Operation,
        pool: Uuid,
        id: Uuid,
        token: &str,
        release_reason: Option<&str>,
        now: Timestamp,
    ) -> MResult<OperationResult> {
        if release_reason == Some("") {
            return Err("release reason must be non-empty".into());
        }
        let result = |status, reason: Option<&str>, lease, dl| OperationResult {
            message_id: id,
            operation: op,
            status,
            lease_expires_at: lease,
            reason: reason.map(str::to_string),
            dead_letter: dl,
        };
        let Some(i) = self
            .recs
            .iter()
            .position(|r| r.msg.work_pool_id == pool && r.msg.message_id == id && r.is_active())
        else {
            return Ok(result(
                OpStatus::NotFound,
                Some("message_not_found"),
                None,
                None,
            ));
        };
        let (current, lease) = match &self.recs[i].state {
            MState::Reserved {
                token,
                lease_expires_at,
            } => (token.clone(), *lease_expires_at),
            _ => {
                return Ok(result(
                    OpStatus::NotCurrent,
                    Some("no_active_reservation"),
                    None,
                    None,
                ))
            }
        };
        if current != token {
            return Ok(result(
                OpStatus::InvalidToken,
                Some("reservation_token_mismatch"),
                None,
                None,
            ));
        }
        let max = self.policy.max_delivery_attempts;
        let out = if lease <= now {
            if self.recs[i].msg.delivery_count >= max {
                let dl = self.recs[i].move_to_dlq(now, None);
                result(
                    OpStatus::DeadLettered,
                    Some("max_delivery_attempts_reached"),
                    None,
                    Some(dl),
                )
            } else {
                self.make_visible(i, now);
                result(OpStatus::Expired, Some("lease_expired"), None, None)
            }
        } else {
            match op {
                Operation::Ack => {
                    let r = &mut self.recs[i];
                    r.msg.updated_at = now;
                    r.state = MState::Acked { completed_at: now };
                    result(OpStatus::Accepted, None, None, None)
                }
                Operation::Release => {
                    if self.recs[i].msg.delivery_count >= max {
                        let dl = self.recs[i].move_to_dlq(now, release_reason.map(str::to_string));
                        result(
                            OpStatus::DeadLettered,
                            Some("max_delivery_attempts_reached"),
                            None,
                            Some(dl),
                        )
                    } else {
                        self.make_visible(i, now);
                        result(OpStatus::Accepted, None, None, None)
                    }
                }
                Operation::Renew => {
                    let order = self.tick();
                    let new_lease = now.saturating_add(self.policy.lease);
                    let r = &mut self.recs[i];
                    r.msg.updated_at = now;
                    r.order = order;
                    r.state = MState::Reserved {
                        token: current,
                        lease_expires_at: new_lease,
                    };
                    result(OpStatus::Accepted, None, Some(new_lease), None)
                }
            }
        };
        self.end_step();
        Ok(out)
    }

    pub fn prune(&mut self, limit: usize, now: Timestamp) -> usize {
        let Some(ret) = self.policy.completed_retention else {
            return 0;
        };
        // Oldest completion first; ties by pool, then by enqueue order (the engine's
        // tombstone index is keyed by completion time, pool and enqueue sequence). `recs`
        // is in enqueue order: new messages are pushed, removals keep the order.
        let mut due: Vec<(Timestamp, Uuid, usize)> = self
            .recs
            .iter()
            .enumerate()
            .filter_map(|(i, r)| match r.state {
                MState::Acked { completed_at }
                    if completed_at.as_micros() + ret.as_micros() as i64 <= now.as_micros() =>
                {
                    Some((completed_at, r.msg.work_pool_id, i))
                }
                _ => None,
            })
            .collect();
        due.sort();
        due.truncate(limit);
        let mut i = 0;
        self.recs.retain(|_| {
            i += 1;
            !due.iter().any(|(_, _, at)| *at == i - 1)
        });
        due.len()
    }

    pub fn wake_dispatchers(&mut self, pool: Uuid) -> Wakeup {
        self.wake_in_step(pool);
        self.end_step();
        Wakeup {
            work_pool_id: pool,
            sequence: self.sequence(pool),
        }
    }

    pub fn sequence(&self, pool: Uuid) -> u64 {
        self.wake.get(&pool).copied().unwrap_or(0)
    }

    pub fn wait(&self, pool: Uuid, after: u64) -> Option<Wakeup> {
        let s = self.sequence(pool);
        (s > after).then_some(Wakeup {
            work_pool_id: pool,
            sequence: s,
        })
    }

    pub fn set_policy(&mut self, p: Policy) -> MResult<()> {
        if p.lease.as_micros() == 0 || p.max_delivery_attempts == 0 {
            return Err("POLICY".into());
        }
        self.policy = p;
        Ok(())
    }

    pub fn read_message(&self, pool: Uuid, id: Uuid) -> Option<Message> {
        self.find(pool, id)
            .filter(|&i| self.recs[i].is_active())
            .map(|i| self.recs[i].msg.clone())
    }

    pub fn read_dead_letter(&self, pool: Uuid, id: Uuid) -> Option<DeadLetter> {
        self.find(pool, id).and_then(|i| self.recs[i].dead_letter())
    }

    pub fn read_reservation(&self, pool: Uuid, id: Uuid) -> Option<Reservation> {
        self.find(pool, id).and_then(|i| self.recs[i].reservation())
    }

    pub fn incarnation(&self, pool: Uuid, id: Uuid) -> u64 {
        self.find(pool, id).map_or(0, |i| self.recs[i].incarnation)
    }

    /// The current token of a reserved message.
    pub fn current_token(&self, pool: Uuid, id: Uuid) -> Option<String> {
        self.find(pool, id)
            .and_then(|i| self.recs[i].reservation())
            .map(|r| r.reservation_token)
    }
}

// ---------------------------------------------------------------------------------------
// Observation
// ---------------------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq)]
pub struct Slot {
    pub message: Option<Message>,
    pub dead_letter: Option<DeadLetter>,
    pub reservation: Option<Reservation>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Observation {
    /// `POOLS * IDS` slots, pool-major.
    pub slots: Vec<Slot>,
    pub sequences: Vec<u64>,
}

fn slot_index(p: usize, i: usize) -> usize {
    p * IDS + i
}

fn observe_model(m: &Model) -> Observation {
    let mut slots = Vec::new();
    for p in 0..POOLS as u8 {
        for i in 0..IDS as u8 {
            slots.push(Slot {
                message: m.read_message(pool(p), msg_id(i)),
                dead_letter: m.read_dead_letter(pool(p), msg_id(i)),
                reservation: m.read_reservation(pool(p), msg_id(i)),
            });
        }
    }
    Observation {
        slots,
        sequences: (0..POOLS as u8).map(|p| m.sequence(pool(p))).collect(),
    }
}

fn observe_engine(q: &Queue) -> Result<Observation, String> {
    let mut slots = Vec::new();
    for p in 0..POOLS as u8 {
        for i in 0..IDS as u8 {
            let (pp, ii) = (pool(p), msg_id(i));
            slots.push(Slot {
                message: q.read_message(pp, ii).map_err(engine_failure)?,
                dead_letter: q.read_dead_letter(pp, ii).map_err(engine_failure)?,
                reservation: q.read_reservation(pp, ii).map_err(engine_failure)?,
            });
        }
    }
    let mut sequences = Vec::new();
    for p in 0..POOLS as u8 {
        sequences.push(q.read_wakeup_sequence(pool(p)).map_err(engine_failure)?);
    }
    Ok(Observation { slots, sequences })
}

fn engine_failure(e: Error) -> String {
    format!("engine failed: {e}")
}

/// An engine result with input errors as their sentence (policy errors as "POLICY").
fn engine_result<T>(r: Result<T, Error>) -> Result<MResult<T>, String> {
    match r {
        Ok(v) => Ok(Ok(v)),
        Err(Error::InvalidInput(InputError::InvalidPolicy(_))) => Ok(Err("POLICY".into())),
        Err(Error::InvalidInput(e)) => Ok(Err(e.to_string())),
        Err(e) => Err(engine_failure(e)),
    }
}

fn same<T: PartialEq + std::fmt::Debug>(what: &str, engine: &T, model: &T) -> Result<(), String> {
    if engine == model {
        Ok(())
    } else {
        Err(format!(
            "{what} differs\n  engine: {engine:?}\n  model:  {model:?}"
        ))
    }
}

// ---------------------------------------------------------------------------------------
// The harness
// ---------------------------------------------------------------------------------------

/// How often each kind of outcome happened (to see what the inputs reach).
static STATS: std::sync::Mutex<std::collections::BTreeMap<String, u64>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

fn count(what: impl Into<String>) {
    let mut s = STATS.lock().unwrap_or_else(|p| p.into_inner());
    *s.entry(what.into()).or_insert(0) += 1;
}

/// The outcome counts so far, one `name=count` per outcome.
pub fn stats() -> String {
    let s = STATS.lock().unwrap_or_else(|p| p.into_inner());
    let mut out: Vec<String> = s.iter().map(|(k, v)| format!("{k}={v}")).collect();
    out.push(format!(
        "reopen-in-use-retries={}",
        IN_USE_RETRIES.load(std::sync::atomic::Ordering::Relaxed)
    ));
    out.join(" ")
}

/// How often a reopen had to wait for sled to release the database lock.
pub static IN_USE_RETRIES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Where the engine's database lives for one run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Storage {
    /// `Queue::temporary()` (no restarts possible).
    Temporary(Durability),
    /// A temporary directory that is reopened on `Restart`.
    Directory(Durability),
}

/// How a run is set up: restarts need a directory and a durability that keeps returned
/// operations; a few runs use the strict modes.
pub fn storage_for(data: &[u8], steps: &[Step]) -> Storage {
    let h = data
        .iter()
        .fold(0u32, |a, b| a.wrapping_mul(31).wrapping_add(u32::from(*b)));
    let buffered = Durability::Buffered {
        every: Duration::from_secs(1),
    };
    if steps.contains(&Step::Restart) {
        // Half with the write-ahead log (`Fsync`), half flushing sled (`Flush`).
        Storage::Directory(if h % 2 == 0 {
            Durability::Fsync
        } else {
            Durability::Flush
        })
    } else if h % 8 == 0 {
        Storage::Temporary(Durability::Flush)
    } else {
        Storage::Temporary(buffered)
    }
}

struct Harness {
    storage: Storage,
    clock: ManualClock,
    dir: Option<tempfile::TempDir>,
    queue: Option<Queue>,
    model: Model,
    /// Every token the engine handed out, per `(pool, id)`, oldest first.
    history: HashMap<(Uuid, Uuid), Vec<String>>,
    /// Every token, in the order handed out.
    all_tokens: Vec<String>,
    seen_tokens: HashSet<String>,
    prev: Observation,
    prev_incarnations: Vec<u64>,
    /// Times the engine was opened: every other opening sends each logged batch of the
    /// `Fsync` log through the background applier thread.
    opens: u64,
}

/// What one step returned on the engine (for the model-independent invariant checks).
enum Returned {
    Nothing,
    Enqueued(cleanup_queue::Enqueued),
    Reserved(cleanup_queue::Reserved),
    Lease(Uuid, Operation, OperationResult),
    Expired(Option<Uuid>, LeaseExpiryResult),
    Woken(Uuid),
}

impl Harness {
    fn new(storage: Storage) -> Result<Harness, String> {
        let clock = ManualClock::new(Timestamp::from_micros(START_MICROS));
        let dir = match storage {
            // tmpfs when there is one (like sled's own temporary databases): restarts here
            // are clean drops, not crashes, so the medium does not matter, only speed.
            Storage::Directory(_) => Some(
                match std::path::Path::new("/dev/shm").is_dir() {
                    true => tempfile::tempdir_in("/dev/shm"),
                    false => tempfile::tempdir(),
                }
                .map_err(|e| e.to_string())?,
            ),
            Storage::Temporary(_) => None,
        };
        let policy = Policy::default();
        let mut h = Harness {
            storage,
            clock,
            dir,
            queue: None,
            model: Model::new(policy),
            history: HashMap::new(),
            all_tokens: Vec::new(),
            seen_tokens: HashSet::new(),
            prev: observe_model(&Model::default()),
            prev_incarnations: vec![0; POOLS * IDS],
            opens: 0,
        };
        h.open()?;
        Ok(h)
    }

    fn builder(&self) -> Result<cleanup_queue::QueueBuilder, String> {
        let (builder, durability) = match (self.storage, &self.dir) {
            (Storage::Temporary(d), _) => (Queue::temporary(), d),
            (Storage::Directory(d), Some(dir)) => (Queue::builder(dir.path().join("db")), d),
            (Storage::Directory(_), None) => return Err("no directory".into()),
        };
        let builder = match self.opens % 2 {
            0 => builder.background_apply_writes(0),
            _ => builder,
        };
        Ok(builder
            .clock(self.clock.clone())
            .sweep_interval(None)
            .durability(durability)
            .cache_capacity(1 << 20)
            .policy(self.model.policy.clone()))
    }

    fn open(&mut self) -> Result<(), String> {
        // sled releases its file lock when its last background I/O thread lets go of the
        // database, which may be a moment after the last handle is dropped: an immediate
        // reopen can see `InUse`. Retry for a while (see FUZZING.md, "Findings").
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match self.builder()?.open() {
                Ok(q) => {
                    self.queue = Some(q);
                    self.opens += 1;
                    return Ok(());
                }
                Err(Error::InUse { .. }) if std::time::Instant::now() < deadline => {
                    IN_USE_RETRIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => return Err(engine_failure(e)),
            }
        }
    }

    fn q(&self) -> &Queue {
        self.queue.as_ref().expect("the queue is open")
    }

    fn token_for(&self, p: Uuid, id: Uuid, pick: TokenPick) -> String {
        let hist = self.history.get(&(p, id));
        match pick {
            TokenPick::Current => self
                .model
                .current_token(p, id)
                .or_else(|| hist.and_then(|h| h.last().cloned()))
                .unwrap_or_else(|| "no-token-yet".into()),
            TokenPick::Stale(n) => hist
                .filter(|h| !h.is_empty())
                .map(|h| h[usize::from(n) % h.len()].clone())
                .unwrap_or_else(|| "stale-but-never-issued".into()),
            TokenPick::Other(n) => {
                if self.all_tokens.is_empty() {
                    "other-but-none-issued".into()
                } else {
                    self.all_tokens[usize::from(n) % self.all_tokens.len()].clone()
                }
            }
            TokenPick::Garbage => "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".into(),
        }
    }

    fn note_token(&mut self, p: Uuid, id: Uuid, token: &str) -> Result<(), String> {
        let ok_chars = token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if token.len() <= 32 || !ok_chars {
            return Err(format!("malformed token {token:?}"));
        }
        if !self.seen_tokens.insert(token.to_string()) {
            return Err(format!("token {token:?} handed out twice"));
        }
        self.history
            .entry((p, id))
            .or_default()
            .push(token.to_string());
        self.all_tokens.push(token.to_string());
        Ok(())
    }

    fn step(&mut self, step: &Step) -> Result<Returned, String> {
        let now = self.clock.now();
        Ok(match step {
            Step::Enqueue {
                pool: p,
                id,
                key: k,
                kind: kd,
                queue,
                target,
                data,
            } => {
                let mut m = NewMessage::new(
                    pool(*p),
                    msg_id(*id),
                    key(*k),
                    kind(*kd),
                    match target {
                        Some(t) => json!({ "flow_run_id": format!("run-{t}"), "t": t }),
                        None => json!("not an object"),
                    },
                );
                if let Some(q) = queue {
                    m = m.work_queue(queue_id(*q));
                }
                match data {
                    0 => {}
                    1 => m = m.data(json!({})),
                    2 => m = m.data(json!({ "n": id, "nested": { "k": [k] } })),
                    _ => m = m.data(json!([1, 2])),
                }
                let e = engine_result(self.q().enqueue_detailed(m.clone()))?;
                let mo = self.model.enqueue(&m, now);
                let e_cmp = e.as_ref().map(|x| MEnqueued {
                    message: x.message.clone(),
                    duplicate: x.duplicate,
                });
                same("enqueue result", &e_cmp, &mo.as_ref().cloned())?;
                match e {
                    Ok(x) => Returned::Enqueued(x),
                    Err(_) => Returned::Nothing,
                }
            }
            Step::Reserve {
                pool: p,
                kinds,
                queues,
                fallback,
            } => {
                let filter = ReserveFilter {
                    cleanup_kinds: kinds
                        .as_ref()
                        .map(|ks| ks.iter().map(|k| kind(*k)).collect()),
                    preferred_work_queue_ids: queues
                        .as_ref()
                        .map(|qs| qs.iter().map(|q| queue_id(*q)).collect()),
                    allow_fallback_to_any_queue: *fallback,
                };
                // Every returned call waited for its flush, so the read-only check never
                // has to hedge here: it must say "nothing" exactly when the reserve does
                // nothing.
                let nothing = self
                    .q()
                    .reserve_finds_nothing(pool(*p), &filter)
                    .map_err(engine_failure)?;
                let e = self
                    .q()
                    .reserve_detailed(pool(*p), &filter)
                    .map_err(engine_failure)?;
                let did_nothing =
                    e.reservation.is_none() && e.expired.is_empty() && e.dead_lettered.is_empty();
                if nothing != did_nothing {
                    return Err(format!(
                        "reserve_finds_nothing said {nothing}, but the reserve did {e:?}"
                    ));
                }
                let token = e.reservation.as_ref().map(|r| r.reservation_token.clone());
                let mo = self.model.reserve(pool(*p), &filter, now, token);
                let e_cmp = MReserved {
                    reservation: e.reservation.clone(),
                    expired: e.expired.clone(),
                    dead_lettered: e.dead_lettered.clone(),
                };
                same("reserve result", &e_cmp, &mo)?;
                if let Some(r) = &e.reservation {
                    self.note_token(pool(*p), r.message.message_id, &r.reservation_token)?;
                }
                Returned::Reserved(e)
            }
            Step::Lease {
                op,
                pool: p,
                id,
                reserved,
                token,
                wrong_pool,
                empty_reason,
            } => {
                let (p, id) = match reserved {
                    None => (*p, *id),
                    Some(n) => {
                        let held: Vec<(u8, u8)> = (0..POOLS as u8)
                            .flat_map(|p| (0..IDS as u8).map(move |i| (p, i)))
                            .filter(|(p, i)| {
                                self.model.current_token(pool(*p), msg_id(*i)).is_some()
                            })
                            .collect();
                        match held.get(usize::from(*n) % held.len().max(1)) {
                            Some(&(p, i)) => (p, i),
                            None => (*p, *id),
                        }
                    }
                };
                let tok = self.token_for(pool(p), msg_id(id), *token);
                let at = if *wrong_pool {
                    pool((p + 1) % POOLS as u8)
                } else {
                    pool(p)
                };
                let reason = if *empty_reason { "" } else { "worker gave up" };
                let (id, q) = (msg_id(id), self.q());
                let e = engine_result(match op {
                    Operation::Ack => q.ack(at, id, &tok),
                    Operation::Release => q.release(at, id, &tok, reason),
                    Operation::Renew => q.renew(at, id, &tok),
                })?;
                let release_reason = (*op == Operation::Release).then_some(reason);
                let mo = self.model.lease_op(*op, at, id, &tok, release_reason, now);
                same("lease operation result", &e, &mo)?;
                match e {
                    Ok(r) => Returned::Lease(at, *op, r),
                    Err(_) => Returned::Nothing,
                }
            }
            Step::Expire { limit, pool: p } => {
                let p = p.map(pool);
                let e = engine_result(self.q().expire_leases(*limit, p))?;
                let mo = self.model.expire_leases(*limit, p, now);
                same("expire_leases result", &e, &mo)?;
                match e {
                    Ok(r) => Returned::Expired(p, r),
                    Err(_) => Returned::Nothing,
                }
            }
            Step::Advance(x) => {
                self.clock.advance(advance_amount(*x, &self.model.policy));
                Returned::Nothing
            }
            Step::SetPolicy {
                lease_micros,
                max,
                retention_micros,
            } => {
                let p = Policy {
                    lease: Duration::from_micros(*lease_micros),
                    max_delivery_attempts: *max,
                    completed_retention: retention_micros.map(Duration::from_micros),
                };
                let e = engine_result(self.q().set_policy(p.clone()))?;
                let mo = self.model.set_policy(p);
                same("set_policy result", &e, &mo)?;
                same("policy", &self.q().policy(), &self.model.policy)?;
                Returned::Nothing
            }
            Step::Wake { pool: p } => {
                let e = self
                    .q()
                    .wake_dispatchers(pool(*p))
                    .map_err(engine_failure)?;
                let mo = self.model.wake_dispatchers(pool(*p));
                same("wake_dispatchers result", &e, &mo)?;
                Returned::Woken(pool(*p))
            }
            Step::ReadSequence { pool: p } => {
                let e = self
                    .q()
                    .read_wakeup_sequence(pool(*p))
                    .map_err(engine_failure)?;
                same("read_wakeup_sequence", &e, &self.model.sequence(pool(*p)))?;
                Returned::Nothing
            }
            Step::Wait { pool: p, after } => {
                let cur = self.model.sequence(pool(*p));
                let after = match after {
                    0 => 0,
                    1 => cur.saturating_sub(1),
                    2 => cur,
                    _ => cur + 1,
                };
                let e = self
                    .q()
                    .wait_for_wakeup(pool(*p), after, Some(Duration::ZERO))
                    .map_err(engine_failure)?;
                same("wait_for_wakeup", &e, &self.model.wait(pool(*p), after))?;
                Returned::Nothing
            }
            Step::Prune { limit } => {
                let e = self.q().prune_tombstones(*limit).map_err(engine_failure)?;
                same("prune_tombstones count", &e, &self.model.prune(*limit, now))?;
                Returned::Nothing
            }
            Step::Restart => {
                // Drop the only handle (stops nothing: the sweeper is off) and reopen.
                self.queue = None;
                self.open()?;
                Returned::Nothing
            }
        })
    }

    /// After a step: the observable state, integrity, and the model-independent invariants.
    fn check(&mut self, step: &Step, returned: &Returned) -> Result<(), String> {
        let q = self.q();
        let engine = observe_engine(q)?;
        let problems = q.check_integrity().map_err(engine_failure)?;
        if !problems.is_empty() {
            return Err(format!("check_integrity: {problems:?}"));
        }
        let model = observe_model(&self.model);
        for (n, (e, m)) in engine.slots.iter().zip(&model.slots).enumerate() {
            same(
                &format!("state of pool {} message {}", n / IDS, n % IDS),
                e,
                m,
            )?;
        }
        same("wakeup sequences", &engine.sequences, &model.sequences)?;
        let incarnations: Vec<u64> = (0..POOLS as u8)
            .flat_map(|p| (0..IDS as u8).map(move |i| (p, i)))
            .map(|(p, i)| self.model.incarnation(pool(p), msg_id(i)))
            .collect();
        self.check_invariants(step, returned, &engine, &incarnations)?;
        if COUNT_OUTCOMES.load(std::sync::atomic::Ordering::Relaxed) {
            count(outcome(step, returned));
        }
        self.prev = engine;
        self.prev_incarnations = incarnations;
        Ok(())
    }

    /// Invariants checked on the engine's own outputs, independently of the model.
    fn check_invariants(
        &self,
        step: &Step,
        returned: &Returned,
        now: &Observation,
        incarnations: &[u64],
    ) -> Result<(), String> {
        let max = self.model.policy.max_delivery_attempts;
        // Each message in exactly one state; a reservation is of an active message; reads
        // never cross pools.
        for (n, s) in now.slots.iter().enumerate() {
            let (p, i) = (pool((n / IDS) as u8), msg_id((n % IDS) as u8));
            if s.message.is_some() && s.dead_letter.is_some() {
                return Err(format!("slot {n}: both active and dead"));
            }
            if let Some(r) = &s.reservation {
                if s.message.as_ref() != Some(&r.message) {
                    return Err(format!("slot {n}: reservation of a message not active"));
                }
                if r.message.delivery_count < 1 {
                    return Err(format!("slot {n}: reserved with delivery_count 0"));
                }
            }
            let m = s
                .message
                .as_ref()
                .or(s.dead_letter.as_ref().map(|d| &d.message));
            if let Some(m) = m {
                if m.work_pool_id != p || m.message_id != i {
                    return Err(format!(
                        "slot {n}: read returned another pool's or id's message"
                    ));
                }
            }
        }
        // Delivery counts only grow, only at reserve, by one, for one message, within max.
        let count = |o: &Observation, n: usize| {
            let s = &o.slots[n];
            s.message
                .as_ref()
                .or(s.dead_letter.as_ref().map(|d| &d.message))
                .map(|m| m.delivery_count)
        };
        let mut grown = 0;
        for (n, (was, is)) in self.prev_incarnations.iter().zip(incarnations).enumerate() {
            if was != is {
                continue;
            }
            if let (Some(a), Some(b)) = (count(&self.prev, n), count(now, n)) {
                if b < a {
                    return Err(format!("slot {n}: delivery_count fell from {a} to {b}"));
                }
                if b > a {
                    grown += 1;
                    if !matches!(step, Step::Reserve { .. }) || b != a + 1 || b > max {
                        return Err(format!(
                            "slot {n}: delivery_count went {a} -> {b} (max {max}) outside a reserve"
                        ));
                    }
                }
            }
        }
        if grown > 1 {
            return Err("one reserve delivered more than one message".into());
        }
        // Duplicates change nothing.
        if let Returned::Enqueued(e) = returned {
            if e.duplicate && now.slots != self.prev.slots {
                return Err("a duplicate enqueue changed stored state".into());
            }
        }
        // Results never cross pools.
        let in_pool = |m: &Message, p: Uuid, what: &str| {
            if m.work_pool_id == p {
                Ok(())
            } else {
                Err(format!("{what} returned a message of another pool"))
            }
        };
        match returned {
            Returned::Enqueued(e) => {
                if let Step::Enqueue { pool: p, .. } = step {
                    in_pool(&e.message, pool(*p), "enqueue")?;
                }
            }
            Returned::Reserved(r) => {
                if let Step::Reserve { pool: p, .. } = step {
                    let p = pool(*p);
                    if let Some(res) = &r.reservation {
                        in_pool(&res.message, p, "reserve")?;
                        if res.message.delivery_count > max {
                            return Err("reserve handed out a message past max".into());
                        }
                    }
                    for m in &r.expired.redelivered {
                        in_pool(m, p, "reserve's expiry")?;
                    }
                    for d in r.expired.dead_lettered.iter().chain(&r.dead_lettered) {
                        in_pool(&d.message, p, "reserve's DLQ moves")?;
                    }
                }
            }
            Returned::Lease(p, _, r) => {
                if let Some(d) = &r.dead_letter {
                    in_pool(&d.message, *p, "lease operation")?;
                }
                if (r.status == OpStatus::Accepted) != r.reason.is_none() {
                    return Err("reason must be set exactly when not accepted".into());
                }
            }
            Returned::Expired(Some(p), r) => {
                for m in &r.redelivered {
                    in_pool(m, *p, "expire_leases")?;
                }
                for d in &r.dead_lettered {
                    in_pool(&d.message, *p, "expire_leases")?;
                }
            }
            _ => {}
        }
        // Wake rule: each pool's sequence rises by exactly one when one of its messages
        // became visible in this call (or on an explicit wake), else stays.
        let mut must = [false; POOLS];
        let mut mark = |p: Uuid| {
            if let Some(x) = must.get_mut(pool_index(p)) {
                *x = true;
            }
        };
        match returned {
            Returned::Enqueued(e) => {
                let (pi, ii) = (
                    pool_index(e.message.work_pool_id),
                    id_index(e.message.message_id),
                );
                if pi >= POOLS || ii >= IDS {
                    return Err("enqueue returned a message outside the alphabet".into());
                }
                let was_visible = {
                    let s = &self.prev.slots[slot_index(pi, ii)];
                    s.message.is_some() && s.reservation.is_none()
                };
                if !e.duplicate || was_visible {
                    mark(e.message.work_pool_id);
                }
            }
            Returned::Reserved(r) => {
                for m in &r.expired.redelivered {
                    mark(m.work_pool_id);
                }
            }
            Returned::Lease(p, op, r) => {
                if r.status == OpStatus::Expired
                    || (r.status == OpStatus::Accepted && *op == Operation::Release)
                {
                    mark(*p);
                }
            }
            Returned::Expired(_, r) => {
                for m in &r.redelivered {
                    mark(m.work_pool_id);
                }
            }
            Returned::Woken(p) => mark(*p),
            Returned::Nothing => {}
        }
        for (p, bump) in must.iter().enumerate() {
            let (a, b) = (self.prev.sequences[p], now.sequences[p]);
            if b != a + u64::from(*bump) {
                return Err(format!(
                    "wake rule: pool {p} sequence went {a} -> {b}, expected a bump: {bump}"
                ));
            }
        }
        Ok(())
    }
}

/// Whether to count outcomes (off unless [`count_outcomes`] is called: the fuzz target has
/// no use for them).
static COUNT_OUTCOMES: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Starts counting outcomes for [`stats`].
pub fn count_outcomes() {
    COUNT_OUTCOMES.store(true, std::sync::atomic::Ordering::Relaxed);
}

fn outcome(step: &Step, r: &Returned) -> String {
    match (step, r) {
        (_, Returned::Enqueued(e)) => {
            format!("enqueue:{}", if e.duplicate { "dup" } else { "new" })
        }
        (_, Returned::Reserved(r)) => format!(
            "reserve:{}{}{}",
            if r.reservation.is_some() {
                "got"
            } else {
                "none"
            },
            if r.expired.is_empty() { "" } else { "+expired" },
            if r.dead_lettered.is_empty() {
                ""
            } else {
                "+dlq"
            }
        ),
        (_, Returned::Lease(_, op, r)) => format!("{op}:{}", r.status),
        (_, Returned::Expired(_, r)) => format!(
            "expire:{}r{}d",
            r.redelivered.len().min(2),
            r.dead_lettered.len().min(2)
        ),
        (Step::Enqueue { .. }, _) => "enqueue:error".into(),
        (Step::Lease { .. }, _) => "lease:error".into(),
        (Step::Expire { .. }, _) => "expire:error".into(),
        (s, _) => format!("{s:?}")
            .split([' ', '('])
            .next()
            .unwrap_or("?")
            .to_string(),
    }
}

/// Runs `steps` on a fresh engine and model with the given storage.
pub fn run_steps_with(steps: &[Step], storage: Storage) -> Result<(), String> {
    let mut h = Harness::new(storage)?;
    let initial = observe_engine(h.q())?;
    same("initial state", &initial, &observe_model(&h.model))?;
    for (n, step) in steps.iter().enumerate() {
        let r = h.step(step).and_then(|ret| h.check(step, &ret));
        if let Err(why) = r {
            return Err(format!(
                "divergence at step {n} ({step:?}) with {storage:?}: {why}\nsteps so far:\n{:#?}",
                &steps[..=n]
            ));
        }
    }
    Ok(())
}

/// Runs `steps` on temporary storage, or a reopened directory if they contain a restart.
pub fn run_steps(steps: &[Step]) -> Result<(), String> {
    run_steps_with(steps, storage_for(&[], steps))
}

/// Decodes `data` and runs it: the entry point of the fuzz target and of `cargo test`.
pub fn run_bytes(data: &[u8]) -> Result<(), String> {
    let steps = decode(data);
    run_steps_with(&steps, storage_for(data, &steps))
}
