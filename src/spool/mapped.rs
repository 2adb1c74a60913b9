//! A segment file mapped read-only for recovery's scan: the scan reads the page cache in place,
//! and unmapping gives every page back at once. (Read into a heap buffer instead, 64 MiB per
//! shard stayed resident after recovery: the allocator keeps a freed block that size until the
//! thread allocates again, and a shard with a full queue but no traffic does not.)

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

pub struct MappedSegment {
    ptr: *mut libc::c_void,
    len: usize,
}

impl MappedSegment {
    pub fn open(path: &Path) -> io::Result<MappedSegment> {
        let file = File::open(path)?;
        let len = file.metadata()?.len() as usize;
        if len == 0 {
            return Ok(MappedSegment {
                ptr: std::ptr::null_mut(),
                len: 0,
            });
        }
        // SAFETY: a fresh read-only private mapping of a file we opened for reading; the
        // mapping outlives the descriptor by design (mmap keeps its own reference). Nothing
        // else writes or truncates a segment while the spool lock is held (recovery runs
        // before the shard writes to its own directory; an adopted directory is no running
        // shard's). Covered by every test that restarts a server on a spool.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(MappedSegment { ptr, len })
    }

    pub fn bytes(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `ptr` maps `len` readable bytes until drop, and the slice borrows self.
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.len) }
    }
}

impl Drop for MappedSegment {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: unmaps exactly the mapping made in `open`, once.
            unsafe {
                libc::munmap(self.ptr, self.len);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mapped_file_reads_as_written_and_an_empty_one_as_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seg");
        std::fs::write(&path, b"hello segment").unwrap();
        assert_eq!(MappedSegment::open(&path).unwrap().bytes(), b"hello segment");
        std::fs::write(&path, b"").unwrap();
        assert!(MappedSegment::open(&path).unwrap().bytes().is_empty());
        assert!(MappedSegment::open(&dir.path().join("missing")).is_err());
    }
}
