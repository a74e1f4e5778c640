//! `LazyFs`: a LazyFS mount (FUSE, github.com/dsrhaslab/lazyfs) for power-cut tests.
//!
//! LazyFS keeps written data in its own page cache and passes it to the backing
//! directory only on fsync. `clear_cache()` throws away everything not fsynced, as a
//! power cut would; `crash_on()` arms a fault that kills LazyFS itself right before or
//! after an operation on a file. What is left in the backing directory (`root()`) is
//! exactly what a disk would hold after the cut. File creation, rename and unlink go
//! straight to the backing directory (a missing directory fsync is not detected).
//!
//! The binary is built by `scripts/install-test-deps-lazyfs` into a cache outside the
//! repository; [`LazyFs::unavailable`] says why a test cannot run here.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::util::{is_root, temp_dir, wait_until, ChildGuard};

/// The vendored sources, relative to the repository root (CI has `shared/` beside the clone).
const TARBALL: &str = "../shared/vendor/lazyfs-src.tar.gz";

/// Cache size per mount: the database of a test run plus its WAL fits many times over.
const CACHE_SIZE: &str = "256mb";

/// How `tests/powercut.rs` enables itself, for the skip message.
pub const HOW_TO_ENABLE: &str = "run scripts/install-test-deps-lazyfs as root (needs \
    ../shared/vendor/lazyfs-src.tar.gz, /dev/fuse, apt packages cmake g++ libfuse3-dev fuse3 \
    eatmydata), or point OUTPOST_LAZYFS at a lazyfs binary";

/// Where `scripts/install-test-deps-lazyfs` puts the binary for the tarball's hash
/// (the same rule as the script: `OUTPOST_TEST_CACHE`, else /var/cache/outpost-test as
/// root, else ~/.cache/outpost-test).
fn cached_binary(tarball: &Path) -> Result<PathBuf, String> {
    let out = Command::new("sha256sum")
        .arg(tarball)
        .output()
        .map_err(|e| format!("cannot run sha256sum: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let hash = text
        .get(..16)
        .ok_or("sha256sum printed nothing")?
        .to_string();
    let cache = match std::env::var_os("OUTPOST_TEST_CACHE") {
        Some(c) => PathBuf::from(c),
        None if is_root() => PathBuf::from("/var/cache/outpost-test"),
        None => std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .ok_or("no HOME")?
            .join("outpost-test"),
    };
    let dest = cache.join(format!("lazyfs-{hash}"));
    let binary = dest.join("lazyfs/lazyfs/build/lazyfs");
    if binary.exists() && dest.join(".built").exists() {
        Ok(binary)
    } else {
        Err(format!(
            "LazyFS is not built ({} missing)",
            binary.display()
        ))
    }
}

/// What a crash fault waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timing {
    Before,
    After,
}

pub struct LazyFs {
    binary: PathBuf,
    dir: tempfile::TempDir,
    root: PathBuf,
    mount: PathBuf,
    fifo: PathBuf,
    config: PathBuf,
    log: PathBuf,
    child: ChildGuard,
    mounts: usize,
}

impl LazyFs {
    /// The binary to use, or why power-cut tests cannot run on this machine.
    pub fn unavailable() -> Result<PathBuf, String> {
        if !is_root() {
            return Err("not root (FUSE with allow_other needs root here)".into());
        }
        if !Path::new("/dev/fuse").exists() {
            return Err("/dev/fuse does not exist (no FUSE in this container/VM)".into());
        }
        if Command::new("fusermount3")
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_err()
        {
            return Err("fusermount3 is not installed (apt package fuse3)".into());
        }
        if let Some(path) = std::env::var_os("OUTPOST_LAZYFS") {
            return Ok(PathBuf::from(path));
        }
        let tarball = Path::new(env!("CARGO_MANIFEST_DIR")).join(TARBALL);
        if !tarball.exists() {
            return Err(format!(
                "the LazyFS sources {} are missing",
                tarball.display()
            ));
        }
        cached_binary(&tarball)
    }

    /// Mounts a fresh LazyFS (empty backing directory) and waits until it serves.
    pub fn mount(binary: &Path) -> LazyFs {
        // LazyFS (src/main.cpp) takes a `--config-path` value containing "-o" (any
        // case) for a FUSE option and falls back to config/default.toml, so it never
        // mounts: no '-' before tempfile's random suffix, which may start with 'o'.
        let dir = tempfile::Builder::new()
            .prefix("outpost-lazyfs.")
            .tempdir()
            .expect("create temp dir");
        assert!(
            !dir.path().to_string_lossy().to_lowercase().contains("-o"),
            "LazyFS cannot take a config path containing \"-o\": {} (set TMPDIR elsewhere)",
            dir.path().display()
        );
        let root = dir.path().join("root");
        let mount = dir.path().join("mnt");
        fs::create_dir_all(&root).expect("create the LazyFS backing dir");
        fs::create_dir_all(&mount).expect("create the LazyFS mount point");
        let mut fs = LazyFs {
            binary: binary.to_path_buf(),
            fifo: dir.path().join("faults.fifo"),
            config: dir.path().join("lazyfs.toml"),
            log: dir.path().join("lazyfs.log"),
            dir,
            root,
            mount,
            child: ChildGuard::default(),
            mounts: 0,
        };
        fs.start();
        fs
    }

    /// The mount point: put the files under test here.
    pub fn path(&self) -> &Path {
        &self.mount
    }

    /// The backing directory: what survived (everything fsynced, plus file creations).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// LazyFS's own log of the current mount (fault acknowledgements).
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the LazyFS process of the current mount still runs (a crash fault ends it).
    pub fn is_running(&mut self) -> bool {
        self.child.is_running()
    }

    /// Throws away every unsynced write (a power cut) and waits until LazyFS confirms.
    pub fn clear_cache(&mut self) {
        let before = self.log().matches("cache is cleared").count();
        self.command("lazyfs::clear-cache");
        let done = wait_until(Duration::from_secs(30), || {
            self.log().matches("cache is cleared").count() > before
        });
        assert!(done, "LazyFS did not confirm clear-cache:\n{}", self.log());
    }

    /// Arms a fault: LazyFS kills itself `timing` the next `op` (`write`, `fsync`, …)
    /// on a file whose path matches `from_rgx` (matched as `.*PATTERN.*`: anchor it,
    /// e.g. `outpost\.db$`, or it also matches `outpost.db-wal`). Whatever was not
    /// fsynced is gone with the process.
    pub fn crash_on(&mut self, timing: Timing, op: &str, from_rgx: &str) {
        let timing = match timing {
            Timing::Before => "before",
            Timing::After => "after",
        };
        let before = self.log().matches("received").count();
        self.command(&format!(
            "lazyfs::crash::timing={timing}::op={op}::from_rgx={from_rgx}"
        ));
        // Wait until the worker took the command, so the fault is armed before the
        // caller goes on (or LazyFS already crashed on it).
        let taken = wait_until(Duration::from_secs(10), || {
            self.log().matches("received").count() > before || !self.child.is_running()
        });
        assert!(taken, "LazyFS did not take the fault:\n{}", self.log());
    }

    /// A power cut while nothing writes: clear the cache, then end LazyFS without any
    /// chance to flush (SIGKILL) and detach the mount. Call [`LazyFs::remount`] next.
    pub fn power_cut(&mut self) {
        if self.child.is_running() {
            self.clear_cache();
        }
        self.stop();
    }

    /// SIGKILLs the LazyFS process (if still running) and detaches the mount.
    pub fn stop(&mut self) {
        self.child.kill();
        let _ = Command::new("fusermount3")
            .arg("-uz")
            .arg(&self.mount)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        wait_until(Duration::from_secs(10), || !self.is_mounted());
    }

    /// Mounts again over the same backing directory (after a cut or a crash fault).
    pub fn remount(&mut self) {
        self.stop();
        self.start();
    }

    fn is_mounted(&self) -> bool {
        let mount = self.mount.display().to_string();
        fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .any(|l| l.split(' ').nth(4) == Some(mount.as_str()))
    }

    /// Mounts, trying a second time when the first mount does not come up: on a
    /// loaded machine a remount right after a SIGKILLed LazyFS has been seen to hang
    /// once in many runs.
    fn start(&mut self) {
        if !self.try_start(Duration::from_secs(30)) {
            eprintln!("LazyFS did not mount in 30 s; unmounting and trying once more");
            self.stop();
            let ready = self.try_start(Duration::from_secs(60));
            assert!(
                ready,
                "LazyFS did not mount {}:\n{}",
                self.mount.display(),
                self.log()
            );
        }
    }

    /// One mount attempt; `false` when it is not ready within `deadline`.
    fn try_start(&mut self, deadline: Duration) -> bool {
        self.mounts += 1;
        let _ = fs::remove_file(&self.fifo);
        let _ = fs::remove_file(&self.log);
        fs::write(
            &self.config,
            format!(
                "[faults]\nfifo_path=\"{fifo}\"\n[cache]\napply_eviction=false\n\
                 [cache.simple]\ncustom_size=\"{CACHE_SIZE}\"\nblocks_per_page=1\n\
                 [filesystem]\nlog_all_operations=false\nlogfile=\"{log}\"\n",
                fifo = self.fifo.display(),
                log = self.log.display(),
            ),
        )
        .expect("write the LazyFS config");
        let output = self.dir.path().join(format!("lazyfs-{}.out", self.mounts));
        let out = fs::File::create(&output).expect("create the LazyFS output file");
        let child = Command::new(&self.binary)
            .arg(&self.mount)
            .arg("--config-path")
            .arg(&self.config)
            .args(["-o", "allow_other", "-o", "modules=subdir", "-o"])
            .arg(format!("subdir={}", self.root.display()))
            .arg("-f")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("clone the output file"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.binary.display()));
        self.child = ChildGuard::new(child);
        let ready = wait_until(deadline, || {
            self.is_mounted() && self.fifo.exists() && self.log().contains("waiting for fault")
        });
        if !ready {
            eprintln!(
                "LazyFS mount {} not ready:\n{}",
                self.mount.display(),
                fs::read_to_string(&output).unwrap_or_default()
            );
        }
        ready
    }

    fn command(&mut self, command: &str) {
        use std::os::unix::fs::OpenOptionsExt;
        // Non-blocking: opening a FIFO whose reader is gone would block forever.
        let mut fifo = None;
        wait_until(Duration::from_secs(10), || {
            fifo = fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&self.fifo)
                .ok();
            fifo.is_some() || !self.child.is_running()
        });
        let Some(mut fifo) = fifo else {
            panic!(
                "LazyFS is not reading {}:\n{}",
                self.fifo.display(),
                self.log()
            );
        };
        fifo.write_all(format!("{command}\n").as_bytes())
            .expect("write to the LazyFS fault FIFO");
    }
}

impl Drop for LazyFs {
    fn drop(&mut self) {
        self.stop();
    }
}
