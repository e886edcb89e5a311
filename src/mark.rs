//! The checkpoint mark: a small file beside sled's that says how many checkpoints the
//! database has completed.
//!
//! sled recovers a prefix of its log, and when it meets a damaged entry it stops there
//! without a word, so a damaged `db` file can open as an earlier state. Whatever was written
//! since the last checkpoint is also in the write-ahead log and is applied again on open; what
//! a checkpoint retired from the log is only in sled. So a checkpoint counts itself in sled
//! (`meta/checkpoint`, written and synced with its new generation) and only then in this file.
//! On open (`Store::open`), sled's count below the file's means sled lost writes that a
//! checkpoint had made durable: the database is refused instead of opening an earlier state
//! silently. sled's count may be above the file's: by one after a crash between the two
//! writes, by more after an older engine, which does not write the mark, checkpointed.
//!
//! The file holds two slots, 4 KiB apart so that no sector holds both; count `n` goes into
//! slot `n % 2`, so a write torn by a crash leaves the other slot, one checkpoint older, intact.
//! The file is created whole (written beside, synced, renamed), so it is either absent (no
//! checkpoint recorded yet) or has a valid slot unless it was damaged.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::codec::{self, MARK_SLOT};
use crate::error::{Error, Result};

pub(crate) const FILE_NAME: &str = "checkpoint";
const STAGING_NAME: &str = "checkpoint.new";
const SLOT_STRIDE: u64 = 4096;

fn slot_offset(count: u64) -> u64 {
    (count % 2) * SLOT_STRIDE
}

fn damaged(detail: impl Into<String>) -> Error {
    Error::Corrupted {
        tree: "(checkpoint mark)",
        key: FILE_NAME.into(),
        detail: detail.into(),
    }
}

/// The count the mark in `dir` holds; `None` when there is no mark.
pub(crate) fn read(dir: &Path) -> Result<Option<u64>> {
    let bytes = match std::fs::read(dir.join(FILE_NAME)) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        other => other?,
    };
    let slot = |count: u64| {
        let at = slot_offset(count) as usize;
        bytes.get(at..).and_then(codec::decode_mark)
    };
    match (slot(0), slot(1)) {
        (None, None) => Err(damaged(format!(
            "neither slot of the {}-byte file holds a valid count; delete the file to open \
             the database without this check",
            bytes.len()
        ))),
        (a, b) => Ok(a.max(b)),
    }
}

/// Records `count` in the mark in `dir`, durably.
pub(crate) fn write(dir: &Path, count: u64) -> io::Result<()> {
    let path = dir.join(FILE_NAME);
    let slot = codec::encode_mark(count);
    match OpenOptions::new().write(true).open(&path) {
        Ok(file) => {
            file.write_all_at(&slot, slot_offset(count))?;
            file.sync_data()
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let staging = dir.join(STAGING_NAME);
            let mut bytes = vec![0u8; SLOT_STRIDE as usize + MARK_SLOT];
            let at = slot_offset(count) as usize;
            bytes[at..at + MARK_SLOT].copy_from_slice(&slot);
            std::fs::write(&staging, &bytes)?;
            File::open(&staging)?.sync_all()?;
            std::fs::rename(&staging, &path)?;
            File::open(dir)?.sync_all()
        }
        Err(e) => Err(e),
    }
}

/// Refuses the database when sled's checkpoint count (`in_sled`) is below the mark's.
pub(crate) fn check(dir: &Path, in_sled: u64) -> Result<()> {
    match read(dir)? {
        Some(marked) if in_sled < marked => Err(damaged(format!(
            "checkpoint {marked} of the database at {} was completed but sled's log reaches \
             only checkpoint {in_sled}: sled lost writes that a checkpoint had made durable \
             (its log is damaged and it stopped reading early, or its files were restored \
             from an older copy). Restore the whole directory from a backup, or delete the \
             file `{FILE_NAME}` to open the earlier state that sled kept",
            dir.display()
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_round_trip_through_alternate_slots() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(read(dir.path()).expect("read"), None, "no file, no mark");
        for n in 1..=5 {
            write(dir.path(), n).expect("write");
            assert_eq!(read(dir.path()).expect("read"), Some(n));
        }
        assert!(!dir.path().join(STAGING_NAME).exists());
    }

    #[test]
    fn a_torn_slot_leaves_the_previous_count() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), 6).expect("write");
        write(dir.path(), 7).expect("write");
        let path = dir.path().join(FILE_NAME);
        let mut bytes = std::fs::read(&path).expect("read");
        // Count 7 is in slot 1; tear its second half.
        let at = slot_offset(7) as usize + MARK_SLOT / 2;
        bytes[at..at + MARK_SLOT / 2].fill(0);
        std::fs::write(&path, &bytes).expect("write");
        assert_eq!(read(dir.path()).expect("read"), Some(6));
    }

    #[test]
    fn a_file_without_a_valid_slot_is_a_typed_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), 1).expect("write");
        let path = dir.path().join(FILE_NAME);
        for damage in [vec![], vec![0u8; 10], vec![0xff; 5000]] {
            std::fs::write(&path, &damage).expect("write");
            match read(dir.path()) {
                Err(Error::Corrupted { tree, .. }) => assert_eq!(tree, "(checkpoint mark)"),
                other => panic!("{} bytes: {other:?}", damage.len()),
            }
        }
    }

    #[test]
    fn sled_may_be_ahead_by_a_crash_but_never_behind() {
        let dir = tempfile::tempdir().expect("tempdir");
        check(dir.path(), 0).expect("no mark: nothing to check");
        write(dir.path(), 3).expect("write");
        check(dir.path(), 3).expect("equal");
        check(dir.path(), 4).expect("sled synced, mark not yet written");
        match check(dir.path(), 2) {
            Err(Error::Corrupted { detail, .. }) => {
                assert!(detail.contains("checkpoint 3 of"), "{detail}")
            }
            other => panic!("{other:?}"),
        }
    }
}
