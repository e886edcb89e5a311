//! The write-ahead log of the durable modes: the file `wal` in the database directory (the
//! record format is `codec`'s). `store` owns the protocol; this module only reads the file
//! and writes records into it.
//!
//! The file is overwritten from the start after every checkpoint rather than appended to
//! forever, and it grows in zero-filled steps: overwriting bytes that are already allocated
//! lets `fdatasync` skip the file-size metadata that an append would make it write (a
//! throwaway probe on the run-8 machine, 512-byte records: 148 µs against 212 µs per sync). Stale records after the end
//! are of an earlier generation, and zeros are of none, so neither is ever replayed. The
//! file is allocated up to the checkpoint size when it is opened: a step of growth during
//! a round cost that round 3–11 ms of kernel time in session 6's probe (a 456 KB record of
//! `expire_leases(1000)`: 0.11 ms to write when no growth was due), so only a record
//! that ends past the checkpoint size still grows it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::codec;

/// The log's file name inside the database directory (sled ignores files it did not make).
pub(crate) const FILE_NAME: &str = "wal";

/// Once this much is logged, the next round checkpoints (`Store::checkpoint`) and the log
/// starts over (the default; `QueueBuilder::wal_checkpoint_bytes`).
pub(crate) const CHECKPOINT_BYTES: u64 = 8 << 20;

/// The file grows in zero-filled steps of this size.
const GROW: u64 = 1 << 20;

/// `Wal::open` zero-fills a new log up to its checkpoint size, but never beyond this (a
/// very large checkpoint size, chosen to checkpoint rarely, must not cost that much disk
/// at once).
pub(crate) const PREALLOCATE_MAX: u64 = 64 << 20;

/// The whole log file, or nothing when there is none.
pub(crate) fn read(dir: &Path) -> io::Result<Vec<u8>> {
    match std::fs::read(dir.join(FILE_NAME)) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        other => other,
    }
}

/// The log, open for writing records of one generation from the start of the file.
pub(crate) struct Wal {
    file: File,
    generation: u64,
    checkpoint_bytes: u64,
    /// Where the next record goes.
    offset: u64,
    /// The file's length: everything below it is allocated (written).
    len: u64,
    buf: Vec<u8>,
}

impl Wal {
    /// Opens the log in `dir` (creating it, durably) to write records of `generation`.
    pub fn open(dir: &Path, generation: u64, checkpoint_bytes: u64) -> io::Result<Wal> {
        let path = dir.join(FILE_NAME);
        let created = !path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        if created {
            file.sync_all()?;
            File::open(dir)?.sync_all()?;
        }
        let len = file.metadata()?.len();
        let mut log = Wal {
            file,
            generation,
            checkpoint_bytes,
            offset: 0,
            len,
            buf: Vec::new(),
        };
        // Allocated up to the checkpoint size at once (at most `PREALLOCATE_MAX`): growing
        // the file while records are written costs the round that grows it milliseconds of
        // kernel time per step.
        let prefill = checkpoint_bytes.min(PREALLOCATE_MAX);
        if log.len < prefill {
            log.grow(prefill)?;
        }
        Ok(log)
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Writes one record after the previous ones (into the OS: [`sync`](Wal::sync) makes it
    /// durable).
    pub fn append(&mut self, payload: &[u8]) -> io::Result<()> {
        self.buf.clear();
        codec::encode_wal_record(self.generation, payload, &mut self.buf)
            .map_err(io::Error::other)?;
        let end = self.offset + self.buf.len() as u64;
        if end > self.len {
            self.grow(end)?;
        }
        self.file.write_all_at(&self.buf, self.offset)?;
        self.offset = end;
        Ok(())
    }

    /// Zero-fills the file up to the next step at or above `end`, durably.
    fn grow(&mut self, end: u64) -> io::Result<()> {
        let target = end.div_ceil(GROW).saturating_mul(GROW);
        let zeros = vec![0u8; GROW as usize];
        while self.len < target {
            let n = (target - self.len).min(GROW);
            self.file.write_all_at(&zeros[..n as usize], self.len)?;
            self.len += n;
        }
        self.file.sync_all()
    }

    /// `fdatasync`: every record appended so far is on disk.
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Whether enough is logged that the next round should checkpoint.
    pub fn is_full(&self) -> bool {
        self.offset >= self.checkpoint_bytes
    }

    /// Starts writing `generation` from the start of the file (after a checkpoint).
    pub fn restart(&mut self, generation: u64) {
        self.generation = generation;
        self.offset = 0;
    }

    /// Bytes the file occupies.
    pub fn len(&self) -> u64 {
        self.len
    }
}
