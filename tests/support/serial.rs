//! `SerialLink`: a pseudo-terminal pair made by socat, standing in for a
//! serial sensor cable. The agent opens `device_path()`, the test talks
//! through `peer_path()`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::util::{log_stdio, read_log, temp_dir, wait_until, ChildGuard, START_TIMEOUT};

pub const SOCAT: &str = "/usr/bin/socat";

pub struct SerialLink {
    dir: tempfile::TempDir,
    device: PathBuf,
    peer: PathBuf,
    log: PathBuf,
    child: ChildGuard,
}

impl SerialLink {
    /// Creates the pty pair (raw, no echo) and waits until both links exist.
    pub fn start() -> Self {
        assert!(
            Path::new(SOCAT).exists(),
            "{SOCAT} not found: run scripts/install-test-deps"
        );
        let dir = temp_dir("serial");
        let mut link = SerialLink {
            device: dir.path().join("dev"),
            peer: dir.path().join("peer"),
            log: dir.path().join("socat.log"),
            dir,
            child: ChildGuard::default(),
        };
        link.spawn();
        link
    }

    /// Path the agent opens (a symlink to a /dev/pts/N slave).
    pub fn device_path(&self) -> &Path {
        &self.device
    }

    /// Path the test writes to / reads from (the other end).
    pub fn peer_path(&self) -> &Path {
        &self.peer
    }

    pub fn is_plugged(&mut self) -> bool {
        self.child.is_running()
    }

    /// "Pulls the cable": kills socat; readers of the device get EOF/EIO and
    /// the link paths disappear.
    pub fn unplug(&mut self) {
        self.child.terminate(Duration::from_secs(5));
        // socat removes its links on SIGTERM; make sure after a SIGKILL too.
        let _ = std::fs::remove_file(&self.device);
        let _ = std::fs::remove_file(&self.peer);
    }

    /// "Plugs the cable back in": a new pty pair behind the same link paths.
    pub fn replug(&mut self) {
        assert!(!self.child.is_running(), "SerialLink is already plugged");
        self.spawn();
    }

    pub fn log(&self) -> String {
        read_log(&self.log)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn spawn(&mut self) {
        let (out, err) = log_stdio(&self.log);
        let started = Instant::now();
        let child = Command::new(SOCAT)
            .args(["-d", "-d"])
            .arg(format!("pty,raw,echo=0,link={}", self.device.display()))
            .arg(format!("pty,raw,echo=0,link={}", self.peer.display()))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {SOCAT}: {e}"));
        self.child = ChildGuard::new(child);
        let ok = wait_until(START_TIMEOUT, || {
            !self.child.is_running()
                || (self.device.exists()
                    && self.peer.exists()
                    && self.log().contains("starting data transfer loop"))
        });
        if !ok || !self.child.is_running() {
            self.child.kill();
            panic!(
                "socat (SerialLink) not ready after {:?}; log {}:\n{}",
                started.elapsed(),
                self.log.display(),
                self.log()
            );
        }
    }
}

impl Drop for SerialLink {
    fn drop(&mut self) {
        self.child.kill();
    }
}
