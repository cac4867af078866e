//! Injected faults, so that tests can show how the engine behaves when its
//! disk fills up or its writer panics, without filling a real disk.
//!
//! A store opened without [`Faults`] uses redb's own file backend directly;
//! with them, every file operation goes through [`FaultyFile`], which fails
//! writes with "storage full" while the fault is on.

use redb::backends::FileBackend;
use redb::{BackendError, StorageBackend};
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, Ordering};

/// Faults a test can switch on and off while the store runs.
#[derive(Debug, Default)]
pub struct Faults {
    disk_full: AtomicBool,
    panic_next_group: AtomicBool,
}

impl Faults {
    /// While on, every write to the file fails as if the disk were full.
    pub fn set_disk_full(&self, on: bool) {
        self.disk_full.store(on, Ordering::SeqCst);
    }

    /// The writer panics while applying the next group of writes.
    pub fn panic_in_next_group(&self) {
        self.panic_next_group.store(true, Ordering::SeqCst);
    }

    pub(crate) fn take_panic(&self) -> bool {
        self.panic_next_group.swap(false, Ordering::SeqCst)
    }

    fn full(&self) -> std::io::Result<()> {
        if self.disk_full.load(Ordering::SeqCst) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                "No space left on device (injected)",
            ));
        }
        Ok(())
    }
}

/// redb's file backend with [`Faults`] in front of its writes.
#[derive(Debug)]
pub(crate) struct FaultyFile {
    inner: FileBackend,
    faults: std::sync::Arc<Faults>,
}

impl FaultyFile {
    pub(crate) fn open(
        path: &std::path::Path,
        faults: std::sync::Arc<Faults>,
    ) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let inner = FileBackend::new(file).map_err(std::io::Error::other)?;
        Ok(Self { inner, faults })
    }
}

impl StorageBackend for FaultyFile {
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.inner.read(offset, out)
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.faults.full()?;
        self.inner.set_len(len)
    }

    fn sync_data(&self) -> std::io::Result<()> {
        self.faults.full()?;
        self.inner.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.faults.full()?;
        self.inner.write(offset, data)
    }

    fn close(&self) -> std::io::Result<()> {
        self.inner.close()
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.try_lock_range(start, end)
    }

    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.inner.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_range(start, end)
    }

    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.unlock_range(start, end)
    }

    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.query_lock_range(start, end)
    }
}
