//! [`Policy`]: lease duration, delivery attempts, tombstone retention. Changeable at run time.

use std::time::Duration;

use crate::error::InputError;

/// The retry and retention policy, read at every operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// How long a reservation lives without a renew (default 30 s; must be > 0).
    pub lease: Duration,
    /// How many committed deliveries before a message goes to the DLQ (default 3; >= 1).
    pub max_delivery_attempts: u32,
    /// How long an acked message keeps its idempotency key taken (default `None`: forever).
    pub completed_retention: Option<Duration>,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            lease: Duration::from_secs(30),
            max_delivery_attempts: 3,
            completed_retention: None,
        }
    }
}

impl Policy {
    /// Checks every rule, with a sentence for the first one broken.
    pub fn validate(&self) -> Result<(), InputError> {
        if self.lease.as_micros() == 0 {
            return Err(InputError::InvalidPolicy(
                "lease duration must be at least one microsecond".into(),
            ));
        }
        if self.max_delivery_attempts == 0 {
            return Err(InputError::InvalidPolicy(
                "max delivery attempts must be at least 1".into(),
            ));
        }
        Ok(())
    }
}
