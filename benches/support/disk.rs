//! Writes a block device has completed, from `/proc/diskstats`: how many writes the
//! disk really did for a row, whatever the syscalls asked for. Shared by the benches
//! that compare ways of flushing (`#[path]`-included, benches have no common crate).

use std::os::unix::fs::MetadataExt as _;
use std::path::Path;

/// Writes completed by the block device holding `dir`, or `None` when it cannot be
/// found (no `/proc/diskstats`, or a file system without a block device, e.g. tmpfs).
/// Counts every writer of that disk, so compare rows run on a quiet machine.
pub fn device_writes(dir: &Path) -> Option<u64> {
    let dev = std::fs::metadata(dir).ok()?.dev();
    // glibc's gnu_dev_major / gnu_dev_minor encoding of st_dev.
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    let stats = std::fs::read_to_string("/proc/diskstats").ok()?;
    stats.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        // major minor name reads merged sectors ms writes ...
        if f.len() > 7 && f[0] == major.to_string() && f[1] == minor.to_string() {
            f[7].parse().ok()
        } else {
            None
        }
    })
}
