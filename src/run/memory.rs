//! Unmaps the code and read-only data that only start-up touched.
//!
//! Start-up runs code an idle agent never runs again (the command line, the
//! configuration parser and its checks, migrations, TLS set-up) and reads constants
//! spread over the binary's read-only data. The kernel maps each page of a file that a
//! fault touches together with neighbours already in the page cache (64 KiB around it),
//! and those stay mapped, counted in the agent's RSS, until reclaim takes them: about
//! 1 MiB of an idle agent's 7–8 MiB (docs/benchmarks.md, "Session 13").
//!
//! [`unmap_startup_pages`] drops the process's mappings of those pages
//! (`MADV_DONTNEED`): the pages stay in the page cache, and what the running agent uses
//! is mapped again at its next touch (a minor fault, with its neighbours). Unlike
//! `MADV_PAGEOUT`, which frees only pages of a file the process owns or may write (and
//! so nothing under the unit's `User=outpost`), this works for any user.
//!
//! Only the executable and libc are advised, the two objects that hold nearly all of
//! those pages and that are loaded before `main` and never unloaded, so their ranges
//! cannot be unmapped or reused meanwhile. Of each, only the segments the program
//! headers load without write permission, minus the `PT_GNU_RELRO` range, and only
//! when the object has no text relocations: those pages are never written, so they hold
//! exactly the file's bytes and dropping them loses nothing. Relocated data (the GOT,
//! `.data.rel.ro`) is never advised. A debugger's breakpoint or a uprobe placed in that
//! code would be dropped with its page.

use std::ffi::c_void;

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Unmapped {
    /// Ranges advised.
    pub ranges: usize,
    /// Bytes of address space advised (resident or not).
    pub bytes: usize,
}

/// Drops the mappings of the executable's and libc's code and read-only data; their
/// pages are mapped again as they are used. A range the kernel refuses is skipped.
pub fn unmap_startup_pages() -> Unmapped {
    let mut done = Unmapped::default();
    // SAFETY: `visit` receives a pointer to `done`, which outlives the call; it is
    // called synchronously, on this thread, and never unwinds.
    unsafe {
        libc::dl_iterate_phdr(Some(visit), (&mut done as *mut Unmapped).cast());
    }
    done
}

/// `dl_iterate_phdr`'s callback, once per loaded object.
unsafe extern "C" fn visit(
    info: *mut libc::dl_phdr_info,
    _size: libc::size_t,
    data: *mut c_void,
) -> libc::c_int {
    // SAFETY: `data` is the `&mut Unmapped` of `unmap_startup_pages`; `info` and its
    // program headers are the loader's, valid for the duration of the call.
    let (done, info) = unsafe { (&mut *data.cast::<Unmapped>(), &*info) };
    let base = info.dlpi_addr as usize;
    let headers: Vec<Segment> = (0..usize::from(info.dlpi_phnum))
        // SAFETY: `dlpi_phdr` points at `dlpi_phnum` program headers.
        .map(|i| Segment::from(unsafe { &*info.dlpi_phdr.add(i) }))
        .collect();
    // The executable is the object whose name is empty; libc is the one holding `free`.
    // SAFETY: `dlpi_name` is a NUL-terminated string or null.
    let unnamed = info.dlpi_name.is_null() || unsafe { *info.dlpi_name } == 0;
    let libc_address = libc::free as *const () as usize;
    let is_libc = headers
        .iter()
        .any(|s| s.kind == libc::PT_LOAD && s.contains(base, libc_address));
    // SAFETY: the dynamic section of a loaded object is mapped and readable.
    if !(unnamed || is_libc) || unsafe { has_text_relocations(base, &headers) } {
        return 0;
    }
    let page = page_size();
    for (start, end) in unchanged_ranges(base, &headers, page) {
        // SAFETY: the range lies in a segment of the executable or libc that was loaded
        // without write permission, outside PT_GNU_RELRO, of an object without text
        // relocations: its pages were never written and hold the file's bytes. Neither
        // object is ever unloaded, so the range is still theirs. MADV_DONTNEED only
        // drops the mappings; each page is mapped again, unchanged, when touched.
        let rc = unsafe { libc::madvise(start as *mut c_void, end - start, libc::MADV_DONTNEED) };
        if rc == 0 {
            done.ranges += 1;
            done.bytes += end - start;
        }
    }
    0
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size)
        .ok()
        .filter(|s| *s > 0)
        .unwrap_or(4096)
}

/// A program header, in the widths of either ELF class.
#[derive(Debug, Clone, Copy)]
struct Segment {
    kind: u32,
    flags: u32,
    vaddr: usize,
    memsz: usize,
}

impl Segment {
    fn contains(&self, base: usize, address: usize) -> bool {
        let start = base.wrapping_add(self.vaddr);
        address >= start && address - start < self.memsz
    }
}

#[cfg(target_pointer_width = "64")]
type Phdr = libc::Elf64_Phdr;
#[cfg(target_pointer_width = "32")]
type Phdr = libc::Elf32_Phdr;

impl From<&Phdr> for Segment {
    fn from(h: &Phdr) -> Self {
        Segment {
            kind: h.p_type,
            flags: h.p_flags,
            vaddr: h.p_vaddr as usize,
            memsz: h.p_memsz as usize,
        }
    }
}

/// An entry of the dynamic section (`ElfN_Dyn`: a signed tag and a value, each a word).
#[repr(C)]
struct Dyn {
    tag: isize,
    value: usize,
}

const DT_NULL: isize = 0;
const DT_TEXTREL: isize = 22;
const DT_FLAGS: isize = 30;
const DF_TEXTREL: usize = 0x4;

/// Whether the object's code was written to at load time (`DT_TEXTREL`).
///
/// # Safety
/// `base` and `headers` must describe an object the loader has loaded.
unsafe fn has_text_relocations(base: usize, headers: &[Segment]) -> bool {
    let Some(dynamic) = headers.iter().find(|s| s.kind == libc::PT_DYNAMIC) else {
        return false;
    };
    let entries = dynamic.memsz / std::mem::size_of::<Dyn>();
    let first = base.wrapping_add(dynamic.vaddr) as *const Dyn;
    for i in 0..entries {
        // SAFETY: the dynamic section is mapped for its whole `memsz`.
        let entry = unsafe { &*first.add(i) };
        match entry.tag {
            DT_NULL => break,
            DT_TEXTREL => return true,
            DT_FLAGS if entry.value & DF_TEXTREL != 0 => return true,
            _ => {}
        }
    }
    false
}

/// The whole pages of the segments loaded without write permission, minus the
/// `PT_GNU_RELRO` range (relocated, then made read-only).
fn unchanged_ranges(base: usize, headers: &[Segment], page: usize) -> Vec<(usize, usize)> {
    let relro = headers
        .iter()
        .find(|s| s.kind == libc::PT_GNU_RELRO)
        .map(|s| {
            let start = base.wrapping_add(s.vaddr);
            (start, start.saturating_add(s.memsz))
        });
    let mut ranges = Vec::new();
    for s in headers
        .iter()
        .filter(|s| s.kind == libc::PT_LOAD && s.flags & libc::PF_W == 0)
    {
        let start = base.wrapping_add(s.vaddr);
        let end = start.saturating_add(s.memsz);
        let mut pieces = vec![(start, end)];
        if let Some((r_start, r_end)) = relro {
            pieces = vec![(start, end.min(r_start)), (start.max(r_end), end)];
        }
        for (from, to) in pieces {
            // Only whole pages: a page shared with a neighbouring segment is left alone.
            let from = from.div_ceil(page).saturating_mul(page);
            let to = to / page * page;
            if to > from {
                ranges.push((from, to));
            }
        }
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(flags: u32, vaddr: usize, memsz: usize) -> Segment {
        Segment {
            kind: libc::PT_LOAD,
            flags,
            vaddr,
            memsz,
        }
    }

    fn relro(vaddr: usize, memsz: usize) -> Segment {
        Segment {
            kind: libc::PT_GNU_RELRO,
            flags: libc::PF_R,
            vaddr,
            memsz,
        }
    }

    const R: u32 = libc::PF_R;
    const RX: u32 = libc::PF_R | libc::PF_X;
    const RW: u32 = libc::PF_R | libc::PF_W;

    #[test]
    fn whole_pages_of_the_segments_never_written() {
        let headers = [
            load(R, 0, 0x2850),
            load(RX, 0x2850, 0x6000),
            load(RW, 0x9000, 0x3000),
            relro(0x9000, 0x2000),
        ];
        assert_eq!(
            unchanged_ranges(0x10000, &headers, 0x1000),
            vec![(0x10000, 0x12000), (0x13000, 0x18000)]
        );
    }

    #[test]
    fn a_relro_range_inside_a_read_only_segment_is_cut_out() {
        let headers = [load(R, 0, 0x8000), relro(0x3000, 0x2000)];
        assert_eq!(
            unchanged_ranges(0, &headers, 0x1000),
            vec![(0, 0x3000), (0x5000, 0x8000)]
        );
        assert!(unchanged_ranges(0, &[load(RW, 0, 0x8000)], 0x1000).is_empty());
        assert!(unchanged_ranges(0, &[], 0x1000).is_empty());
        assert!(unchanged_ranges(0, &[load(R, 0x100, 0x200)], 0x1000).is_empty());
    }

    #[test]
    fn text_relocations_are_found_in_the_dynamic_section() {
        let dynamic = |entries: &[Dyn]| {
            let headers = [Segment {
                kind: libc::PT_DYNAMIC,
                flags: RW,
                vaddr: entries.as_ptr() as usize,
                memsz: std::mem::size_of_val(entries),
            }];
            // SAFETY: `headers` describes `entries`, which is alive and readable.
            unsafe { has_text_relocations(0, &headers) }
        };
        let entry = |tag, value| Dyn { tag, value };
        assert!(!dynamic(&[
            entry(1, 5),
            entry(DT_FLAGS, 0x8),
            entry(DT_NULL, 0)
        ]));
        assert!(dynamic(&[
            entry(1, 5),
            entry(DT_TEXTREL, 0),
            entry(DT_NULL, 0)
        ]));
        assert!(dynamic(&[
            entry(DT_FLAGS, DF_TEXTREL | 0x8),
            entry(DT_NULL, 0)
        ]));
        assert!(!dynamic(&[entry(DT_NULL, 0), entry(DT_TEXTREL, 0)]));
    }

    #[test]
    fn the_executable_and_libc_are_advised_and_keep_running() {
        let done = unmap_startup_pages();
        // Executable and libc: at least their code and read-only data.
        assert!(done.ranges >= 2, "{done:?}");
        assert!(done.bytes > 1 << 20, "{done:?}");
        let text = format!("{:?}", std::collections::BTreeMap::from([(1, "a")]));
        assert_eq!(text, r#"{1: "a"}"#);
    }
}
