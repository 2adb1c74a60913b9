//! The scheduler time slice a shard thread asks for (`server.sched_slice`).
//!
//! Why: on Linux 6.6+ the fair scheduler (EEVDF) gives each task a virtual deadline one slice
//! after it becomes eligible, and since 6.12 a task may ask for its own slice
//! (`sched_setattr` with `sched_runtime`, clamped by the kernel to 100 us..100 ms). A shard
//! works in short bursts between sleeps (read a command, answer it, go back to io_uring), far
//! shorter than the default slice (0.75-3 ms, by CPU count). With a slice to match, a waking
//! shard's deadline is earlier, so it gets its core back sooner from the clients and workers it
//! shares the machine with. Measured on this project's 2-vCPU test machine (docs/benchmarks.md):
//! 300 us cut the shards' CPU per message by 7-14% and raised throughput by 2-9%.
//!
//! Only the calling thread is changed; the policy stays SCHED_OTHER at nice 0. Older kernels
//! ignore the field or refuse it; either way the shard runs on with the default slice.

use std::io;
use std::time::Duration;

/// `struct sched_attr` from `include/uapi/linux/sched/types.h` (version 1, 56 bytes).
#[repr(C)]
#[derive(Default)]
struct SchedAttr {
    size: u32,
    sched_policy: u32,
    sched_flags: u64,
    sched_nice: i32,
    sched_priority: u32,
    sched_runtime: u64,
    sched_deadline: u64,
    sched_period: u64,
    sched_util_min: u32,
    sched_util_max: u32,
}

const SCHED_ATTR_SIZE_VER1: u32 = 56;
const _: () = assert!(std::mem::size_of::<SchedAttr>() == SCHED_ATTR_SIZE_VER1 as usize);

/// Asks the scheduler to give the calling thread `slice` (SCHED_OTHER, nice 0).
pub fn set_current_thread_slice(slice: Duration) -> io::Result<()> {
    let attr = SchedAttr {
        size: SCHED_ATTR_SIZE_VER1,
        sched_policy: libc::SCHED_OTHER as u32,
        sched_runtime: u64::try_from(slice.as_nanos()).unwrap_or(u64::MAX),
        ..SchedAttr::default()
    };
    // SAFETY: `attr` is a valid, fully initialised `struct sched_attr` whose `size` field
    // matches its layout (asserted at compile time); the kernel only reads it. pid 0 is the calling thread
    // and flags must be 0. Covered by the test below and by tests/lifecycle.rs, which reads the
    // slice of a running server's shards back from /proc.
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The calling thread's slice as /proc reports it (`se.slice`, in nanoseconds).
#[cfg(test)]
fn current_thread_slice_ns() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/thread-self/sched").ok()?;
    text.lines()
        .find(|line| line.starts_with("se.slice"))
        .and_then(|line| line.split(':').nth(1))
        .and_then(|value| value.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_thread_gets_the_slice_it_asks_for() {
        std::thread::spawn(|| {
            set_current_thread_slice(Duration::from_micros(300)).expect("sched_setattr");
            assert_eq!(current_thread_slice_ns(), Some(300_000));
            set_current_thread_slice(Duration::from_micros(700)).expect("sched_setattr");
            assert_eq!(current_thread_slice_ns(), Some(700_000));
        })
        .join()
        .expect("test thread");
    }
}
