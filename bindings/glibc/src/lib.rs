//! Safe wrappers for glibc's malloc tuning (a fixed mmap threshold and giving freed memory back), and
//! for the local time zone's offset from UTC ([`utc_offset`]).
//!
//! Why vmhad needs them (bench/results/scale.md, memory.md): glibc keeps freed memory in its arenas and
//! returns only the free top of each heap. vmhad frees large short-lived buffers (whole CIB texts, parsed
//! documents, archive blocks) on several threads; with glibc's default *dynamic* mmap threshold a freed
//! mmapped buffer raises the threshold (up to 32 MiB), so the next ones land in the arenas and stay there
//! as free but resident pages after they are freed. At 2000 VMs in the CIB, 44 of vmhad's 104 MiB of
//! arena memory were free but resident. `malloc_trim` gives free pages back from every arena (not only
//! the tops: glibc 2.8 and later also release whole free pages inside a heap).
//!
//! These are glibc calls: on another C library they are absent and the functions here do nothing.
#![allow(unsafe_code)]

/// Fixes the size from which an allocation gets its own mapping (returned to the system when it is
/// freed) to `bytes`, and the free top of a heap glibc keeps before giving it back to `trim_bytes`.
/// Setting either turns off glibc's dynamic adjustment of both. Returns false when glibc refused one.
pub fn set_thresholds(mmap_bytes: u32, trim_bytes: u32) -> bool {
    let (Ok(mmap), Ok(trim)) = (i32::try_from(mmap_bytes), i32::try_from(trim_bytes)) else {
        return false;
    };
    imp::set_thresholds(mmap, trim)
}

/// Gives every arena's free pages back to the system. Returns true when memory was released. It locks
/// each arena in turn while it walks its free lists: call it off latency-sensitive threads.
pub fn trim() -> bool {
    imp::trim()
}

/// The local time zone's offset from UTC, in seconds east, at the Unix time `unix` (what the C
/// library's `localtime_r` says, the local time Pacemaker's `date_spec` rules compare against). `None`
/// when the C library cannot say.
pub fn utc_offset(unix: i64) -> Option<i32> {
    imp::utc_offset(unix)
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod imp {
    pub(crate) fn utc_offset(unix: i64) -> Option<i32> {
        // time_t is 32 bits on some targets.
        #[allow(clippy::useless_conversion)]
        let t: libc::time_t = unix.try_into().ok()?;
        // SAFETY: an all-zero `tm` is a valid value of the plain C struct (integers and a null pointer).
        let mut tm: libc::tm = unsafe { std::mem::zeroed() };
        // SAFETY: localtime_r is reentrant; it reads `t` and writes only `tm`, both valid for the call.
        let r = unsafe { libc::localtime_r(&t, &mut tm) };
        if r.is_null() {
            return None;
        }
        i32::try_from(tm.tm_gmtoff).ok()
    }

    pub(crate) fn set_thresholds(mmap: i32, trim: i32) -> bool {
        // SAFETY: mallopt only changes malloc's parameters (under its own lock); M_MMAP_THRESHOLD and
        // M_TRIM_THRESHOLD take a byte count, and mallopt returns 0 for a value it does not take.
        unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, mmap) == 1 && libc::mallopt(libc::M_TRIM_THRESHOLD, trim) == 1 }
    }

    pub(crate) fn trim() -> bool {
        // SAFETY: malloc_trim takes malloc's own locks and only releases pages of free chunks; the
        // argument 0 keeps no extra padding at the heap tops.
        unsafe { libc::malloc_trim(0) == 1 }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod imp {
    pub(crate) fn set_thresholds(_mmap: i32, _trim: i32) -> bool {
        false
    }

    pub(crate) fn trim() -> bool {
        false
    }

    pub(crate) fn utc_offset(_unix: i64) -> Option<i32> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_local_offset_is_a_whole_quarter_hour_within_a_day_and_overflow_is_none() {
        for t in [0, 1_700_000_000, 1_800_000_000] {
            let o = utc_offset(t).expect("glibc knows the local time");
            assert!(o.abs() <= 14 * 3600 && o % 900 == 0, "offset {o} at {t}");
        }
        assert_eq!(utc_offset(i64::MAX), None, "a year beyond an int");
    }

    #[test]
    fn thresholds_in_range_are_taken_and_ones_beyond_an_int_refused() {
        assert!(set_thresholds(256 * 1024, 1024 * 1024));
        // Beyond what mallopt's int can carry: refused before glibc is asked.
        assert!(!set_thresholds(u32::MAX, 1024 * 1024));
    }

    #[test]
    fn memory_freed_in_the_middle_of_the_heap_is_released_by_a_trim() {
        assert!(set_thresholds(256 * 1024, 128 * 1024));
        // Many small blocks (below the mmap threshold: they live in the arena), then free all but a
        // few at the end so the freed memory is not only at the top.
        let mut blocks: Vec<Vec<u8>> = (0..4096).map(|i| vec![i as u8; 8 * 1024]).collect();
        let keep = blocks.split_off(4000);
        drop(blocks);
        let rss_before = rss_kib();
        let released = trim();
        let rss_after = rss_kib();
        drop(keep);
        assert!(released, "nothing released");
        assert!(
            rss_after + 8 * 1024 < rss_before,
            "RSS {rss_before} KiB -> {rss_after} KiB after freeing about 31 MiB and trimming"
        );
    }

    fn rss_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }
}
