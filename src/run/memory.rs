//! Gives back the memory that only start-up needed.
//!
//! Start-up runs code an idle agent never runs again (the configuration parser and its
//! checks, migrations, the command line, TLS set-up) and reads constants spread over
//! the binary's read-only data; the kernel maps each page it faults in together with
//! up to 15 neighbours already in the page cache. Those pages stay resident until the
//! kernel needs memory: about 1.2 MiB of an idle agent's 7–8 MiB (docs/benchmarks.md,
//! "Session 12"). Once the agent runs, [`release_startup_pages`] asks the kernel to
//! reclaim the binary's code and read-only data (`MADV_PAGEOUT`, Linux 5.4); what the
//! running agent uses is faulted in again at once, from the page cache or the disk,
//! and what only start-up used is freed. Only pages of the binary's own file are
//! affected: they are clean, so nothing is written, and anonymous memory (the heap,
//! relocated data) is never touched.

/// Asks the kernel to reclaim the pages of this executable's code and read-only data.
/// Returns the bytes of address space advised. An older kernel (`EINVAL`) or a
/// missing `/proc` is an error the caller only logs: nothing depends on it.
pub fn release_startup_pages() -> std::io::Result<usize> {
    let exe = std::fs::read_link("/proc/self/exe")?;
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    let mut advised = 0;
    for (start, end) in startup_ranges(&maps, &exe.to_string_lossy()) {
        // SAFETY: the range is a whole mapping of this process's own executable,
        // read-only or executable and file-backed, as /proc/self/maps lists it.
        // MADV_PAGEOUT only drops clean pages (they fault in again unchanged); it does
        // not unmap the range or change its contents.
        let rc =
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_PAGEOUT) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        advised += end - start;
    }
    Ok(advised)
}

/// The executable's mappings that hold code or read-only data straight from the file:
/// the executable one (`r-xp`) and the read-only one at file offset 0 (headers,
/// `.rodata`, unwind tables). The read-only mapping after the code is left alone: it
/// holds `.data.rel.ro`, which relocation made anonymous (reclaiming it would mean
/// swapping it).
fn startup_ranges(maps: &str, exe: &str) -> Vec<(usize, usize)> {
    maps.lines()
        .filter_map(|line| {
            let mut fields = line.splitn(6, ' ');
            let range = fields.next()?;
            let perms = fields.next()?;
            let offset = fields.next()?;
            let path = fields.nth(2)?.trim_start();
            let wanted =
                perms == "r-xp" || (perms == "r--p" && offset.trim_start_matches('0').is_empty());
            if path != exe || !wanted {
                return None;
            }
            let (start, end) = range.split_once('-')?;
            let start = usize::from_str_radix(start, 16).ok()?;
            let end = usize::from_str_radix(end, 16).ok()?;
            (end > start).then_some((start, end))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
55668b38b000-55668b610000 r--p 00000000 fe:00 5459157                    /usr/bin/outpost
55668b610000-55668bcc7000 r-xp 00284000 fe:00 5459157                    /usr/bin/outpost
55668bcc7000-55668bd1f000 r--p 0093a000 fe:00 5459157                    /usr/bin/outpost
55668bd1f000-55668bd26000 rw-p 00991000 fe:00 5459157                    /usr/bin/outpost
55668bd26000-55668bd47000 rw-p 00000000 00:00 0                          [heap]
7f0000000000-7f0000028000 r--p 00000000 fe:00 1234                       /usr/lib/x86_64-linux-gnu/libc.so.6
7f0000028000-7f000017d000 r-xp 00028000 fe:00 1234                       /usr/lib/x86_64-linux-gnu/libc.so.6
7f1000000000-7f1000001000 r--p 00000000 fe:00 99                         /usr/bin/outpost-other
not a mapping line
zz-yy r-xp 00000000 fe:00 5459157 /usr/bin/outpost
";

    #[test]
    fn only_the_executables_code_and_read_only_data_from_the_file() {
        assert_eq!(
            startup_ranges(MAPS, "/usr/bin/outpost"),
            vec![
                (0x55668b38b000, 0x55668b610000),
                (0x55668b610000, 0x55668bcc7000)
            ]
        );
        assert!(startup_ranges(MAPS, "/usr/bin/other").is_empty());
        assert!(startup_ranges("", "/usr/bin/outpost").is_empty());
    }

    #[test]
    fn a_replaced_executable_still_matches_its_own_name() {
        let maps = "1000-2000 r-xp 00001000 fe:00 1 /usr/bin/outpost (deleted)\n";
        assert_eq!(
            startup_ranges(maps, "/usr/bin/outpost (deleted)"),
            vec![(0x1000, 0x2000)]
        );
    }

    /// Resident KiB of this test binary's own file mappings.
    fn resident_exe_kib() -> u64 {
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let exe = exe.to_string_lossy();
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut ours = false;
        let mut kib = 0;
        for line in smaps.lines() {
            if line.starts_with(|c: char| c.is_ascii_hexdigit()) && line.contains('-') {
                ours = line.ends_with(&*exe);
            } else if let Some(rss) = line.strip_prefix("Rss:") {
                if ours {
                    kib += rss.trim().trim_end_matches(" kB").parse::<u64>().unwrap();
                }
            }
        }
        kib
    }

    #[test]
    fn the_kernel_reclaims_the_pages() {
        let before = resident_exe_kib();
        match release_startup_pages() {
            Ok(advised) => assert!(advised > 0),
            // A kernel before 5.4 has no MADV_PAGEOUT: nothing to show here.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return,
            Err(e) => panic!("{e}"),
        }
        let after = resident_exe_kib();
        assert!(
            after < before,
            "resident KiB of the executable: {before} -> {after}"
        );
    }
}
