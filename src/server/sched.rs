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
//! Only the calling thread's slice is changed: its policy and nice value stay as they were (an
//! operator's `nice` or `chrt --batch` still holds). A thread under a real-time or deadline
//! policy has no fair-scheduler slice and is left alone. Older kernels ignore the field or
//! refuse it; either way the shard runs on with the default slice.

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

/// Asks the scheduler to give the calling thread `slice`, keeping its policy and nice value.
pub fn set_current_thread_slice(slice: Duration) -> io::Result<()> {
    let mut attr = SchedAttr::default();
    // SAFETY: `attr` is a valid, writable `struct sched_attr` of SCHED_ATTR_SIZE_VER1 bytes
    // (asserted at compile time), the size passed; the kernel writes at most that many. pid 0 is
    // the calling thread and flags must be 0. Covered by the tests below.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_sched_getattr,
            0,
            &mut attr as *mut SchedAttr,
            SCHED_ATTR_SIZE_VER1,
            0,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let policy = attr.sched_policy as i32;
    if policy != libc::SCHED_OTHER && policy != libc::SCHED_BATCH {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("scheduling policy {policy} is not the fair scheduler's, which alone has a slice"),
        ));
    }
    attr.size = SCHED_ATTR_SIZE_VER1;
    attr.sched_runtime = u64::try_from(slice.as_nanos()).unwrap_or(u64::MAX);
    // SAFETY: `attr` is the thread's own `struct sched_attr` as the kernel just returned it, with
    // `size` matching its layout and only the slice changed; the kernel only reads it. Covered by
    // the tests below and by tests/lifecycle.rs, which reads the slice of a running server's
    // shards back from /proc.
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

    #[test]
    fn the_nice_value_and_policy_are_kept() {
        std::thread::spawn(|| {
            // SAFETY: plain system calls on the calling thread (gettid takes no argument;
            // setpriority/getpriority with PRIO_PROCESS and a thread id act on that thread).
            let tid = unsafe { libc::gettid() } as libc::id_t;
            assert_eq!(unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, 5) }, 0);
            set_current_thread_slice(Duration::from_micros(400)).expect("sched_setattr");
            assert_eq!(current_thread_slice_ns(), Some(400_000));
            assert_eq!(unsafe { libc::getpriority(libc::PRIO_PROCESS, tid) }, 5);
            assert_eq!(unsafe { libc::sched_getscheduler(0) }, libc::SCHED_OTHER);
        })
        .join()
        .expect("test thread");
    }
}
