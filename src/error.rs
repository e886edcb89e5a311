//! [`Error`]: failures. Expected outcomes of ack / release / renew are not errors: they are
//! [`OpStatus`](crate::OpStatus) values inside an [`OperationResult`](crate::OperationResult).

use std::path::PathBuf;

/// Something went wrong: bad input, storage trouble, a corrupt record, or a poisoned engine.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The caller's input was rejected before anything was written.
    #[error("{0}")]
    InvalidInput(#[from] InputError),
    /// Another process holds the database open.
    #[error("database at {} is in use by another process", path.display())]
    InUse {
        /// The database directory.
        path: PathBuf,
    },
    /// The configuration given to the builder cannot work.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The storage library failed (I/O error, unsupported setting, ...).
    #[error("storage error: {0}")]
    Storage(String),
    /// An operating-system I/O error outside the storage library (e.g. `fdatasync`).
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// Bytes read from disk could not be decoded, or the indexes disagree with the records.
    #[error("corrupted data in tree `{tree}` at key {key}: {detail}")]
    Corrupted {
        /// The sled tree the bad bytes came from.
        tree: &'static str,
        /// The key, in hex.
        key: String,
        /// What was wrong.
        detail: String,
    },
    /// A durability flush or the background sweeper failed earlier; the engine refuses further
    /// work because its in-memory view may be ahead of the disk. Reopen the database.
    #[error("the engine is poisoned and refuses further work: {0}")]
    Poisoned(String),
}

impl Error {
    pub(crate) fn corrupted(tree: &'static str, key: &[u8], detail: impl Into<String>) -> Error {
        Error::Corrupted {
            tree,
            key: hex(key),
            detail: detail.into(),
        }
    }
}

impl From<sled::Error> for Error {
    fn from(e: sled::Error) -> Error {
        match e {
            sled::Error::Corruption { at, .. } => Error::Corrupted {
                tree: "(sled log)",
                key: format!("{at:?}"),
                detail: "the storage library found a corrupt log entry".into(),
            },
            other => Error::Storage(other.to_string()),
        }
    }
}

/// Lower-case hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Input the engine rejects. `Display` gives Prefect's exact sentences where Prefect has one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InputError {
    /// `enqueue` with `idempotency_key == ""`.
    #[error("idempotency_key must be non-empty")]
    EmptyIdempotencyKey,
    /// `enqueue` with an idempotency key longer than the engine stores.
    #[error("idempotency_key must be at most {max} bytes, got {len}")]
    IdempotencyKeyTooLong {
        /// The key's length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A cleanup kind outside the closed set.
    #[error("unknown cleanup kind {0:?}; expected one of cancelling_timeout_teardown.v1, pending_claim_teardown.v1")]
    UnknownKind(String),
    /// `target` or `data` is not a JSON object.
    #[error("{field} must be a JSON object")]
    NotAnObject {
        /// `"target"` or `"data"`.
        field: &'static str,
    },
    /// `target` and `data` together are larger than the configured limit.
    #[error("target and data together are {size} bytes of JSON, over the limit of {limit} bytes")]
    PayloadTooLarge {
        /// Their encoded size.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The message id is taken in this pool by a message with another idempotency key.
    #[error("message_id is already associated with a different cleanup message")]
    MessageIdConflict,
    /// `release` with `reason == ""`.
    #[error("release reason must be non-empty")]
    EmptyReleaseReason,
    /// `expire_leases` with `limit == 0`.
    #[error("limit must be at least 1")]
    LimitTooSmall,
    /// `redrive` with an empty reason.
    #[error("redrive reason must be non-empty")]
    EmptyRedriveReason,
    /// `import` into a database that already holds state.
    #[error("import needs an empty database")]
    ImportIntoNonEmpty,
    /// A line of an import file that cannot be used.
    #[error("import line {line}: {detail}")]
    BadImportLine {
        /// 1-based line number.
        line: u64,
        /// What is wrong with it.
        detail: String,
    },
    /// A policy value out of range.
    #[error("{0}")]
    InvalidPolicy(String),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
