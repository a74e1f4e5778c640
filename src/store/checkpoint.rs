//! The WAL checkpoint on its own thread and connection.
//!
//! SQLite checkpoints the WAL into the database file from the connection whose commit
//! took the WAL past `wal_autocheckpoint`: the store writer, which then copies and
//! fsyncs up to 16 MiB before it can take its next group. At full TTN ingest that was
//! 8 % of the writer's CPU time and a sixth of its time asleep, and without it the
//! agent kept up about 12 % better (docs/benchmarks.md, "Session 11"); on an SD card
//! the commit after which it runs, and every reading waiting behind it, waits as long.
//!
//! Here the writer's connection reports the WAL's size after each commit (SQLite's WAL
//! hook, which takes the place of the auto-checkpoint) and a thread with a connection
//! of its own checkpoints it (`PASSIVE`: it never blocks the writer or a reader):
//! once the WAL holds [`Sizes::start`] pages, and from then on every
//! [`Sizes::chunk`] pages more. SQLite restarts the WAL from its beginning when a write
//! transaction starts with everything in it checkpointed. At a site's rate that
//! happens after the first checkpoint, so the WAL cycles as it did with the
//! auto-checkpoint at the same size (the same pages reach the database file, as
//! often). Under sustained ingest the thread seldom finishes between two commits, so
//! at [`Sizes::limit`] pages the writer checkpoints itself, as the auto-checkpoint did
//! (by then the thread has copied all but the last few commits' pages), and the WAL
//! restarts. The thread starts no checkpoint of its own from `limit` on, so the WAL
//! file grows beyond `limit` pages only by what is committed while one of the
//! thread's, started before, is still running (the writer's is busy then, and is
//! tried again after each commit).
//!
//! Durability is SQLite's own: a checkpoint by another connection of the same process
//! is ordinary SQLite use, with the same fsyncs (`synchronous=FULL`: the WAL before
//! the copy, the database file after it).

use rusqlite::{ffi, Connection};
use std::ffi::{c_char, c_int, c_void};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// When the checkpoints happen, in WAL pages (frames).
#[derive(Debug, Clone, Copy)]
pub(super) struct Sizes {
    /// The thread starts checkpointing once the WAL holds this many pages.
    pub start: i64,
    /// It checkpoints again once this many more pages were committed.
    pub chunk: i64,
    /// The writer checkpoints itself at this many pages.
    pub limit: i64,
}

impl Sizes {
    /// For a WAL checkpointed after `pages` pages: the thread starts there and follows
    /// each 1/16 of it; the writer steps in at twice that.
    pub(super) fn after(pages: i64) -> Sizes {
        let start = pages.max(16);
        Sizes {
            start,
            chunk: (start / 16).max(1),
            limit: 2 * start,
        }
    }

    /// For the auto-checkpoint `conn` was opened with (`wal_autocheckpoint`, which
    /// the store sets from the page size), read before the hook replaces it.
    pub(super) fn of(conn: &Connection) -> rusqlite::Result<Sizes> {
        let pages: i64 = conn.query_row("PRAGMA wal_autocheckpoint", [], |r| r.get(0))?;
        Ok(Sizes::after(pages))
    }
}

/// What the writer's WAL hook tells the thread.
#[derive(Default)]
struct Wal {
    /// Pages in the WAL after the latest commit.
    frames: i64,
    /// Times the WAL was seen to restart (fewer pages than at the previous commit).
    restarts: u64,
    stop: bool,
}

struct Shared {
    wal: Mutex<Wal>,
    changed: Condvar,
    sizes: Sizes,
}

/// The checkpoint thread of one writer connection. Dropping it stops the thread and
/// waits for it (after a checkpoint in progress): its connection is closed then, so
/// that once the writer's is closed too, the last connection's close checkpoints the
/// WAL and removes it, as at every clean shutdown before.
pub(super) struct Checkpointer {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Checkpointer {
    /// Opens the thread's connection to `path`, starts the thread and hooks the
    /// writer's connection `writer`. The hook holds a reference of its own to what it
    /// shares with the thread, never given back (a few dozen bytes per store opened):
    /// a connection may outlive its `Checkpointer`, and rusqlite does not unregister
    /// a WAL hook, so the hook's argument must stay valid for the life of the process.
    pub(super) fn start(
        writer: &Connection,
        path: &Path,
        busy_timeout: Duration,
        sizes: Sizes,
    ) -> Result<Checkpointer, String> {
        let conn = Connection::open(path).map_err(|e| e.to_string())?;
        conn.busy_timeout(busy_timeout).map_err(|e| e.to_string())?;
        // The checkpoint's own fsyncs follow this connection's setting.
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(|e| e.to_string())?;
        let shared = Arc::new(Shared {
            wal: Mutex::new(Wal::default()),
            changed: Condvar::new(),
            sizes,
        });
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("outpost-ckpt".into())
            .spawn(move || run(conn, &thread_shared))
            .map_err(|e| e.to_string())?;
        let hook_arg = Arc::into_raw(shared.clone()).cast_mut().cast::<c_void>();
        // SAFETY: `hook_arg` is a reference to `Shared` that is never released (see
        // above), and the hook only reads through it; `writer` is a live connection.
        unsafe {
            ffi::sqlite3_wal_hook(writer.handle(), Some(on_commit), hook_arg);
        }
        Ok(Checkpointer {
            shared,
            thread: Some(thread),
        })
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        if let Ok(mut wal) = self.shared.wal.lock() {
            wal.stop = true;
        }
        self.shared.changed.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// SQLite's WAL hook on the writer's connection, called after each commit with the
/// WAL's size in pages, once the write lock is released.
unsafe extern "C" fn on_commit(
    arg: *mut c_void,
    db: *mut ffi::sqlite3,
    name: *const c_char,
    frames: c_int,
) -> c_int {
    // SAFETY: `arg` is a `Shared` that is never freed (see `Checkpointer::start`).
    let shared = unsafe { &*(arg as *const Shared) };
    let frames = i64::from(frames);
    if frames >= shared.sizes.limit {
        // The thread has not caught up: checkpoint here, as SQLite's auto-checkpoint
        // does (what is left is what the thread has not yet copied), so that the next
        // write restarts the WAL. A failure (a reader holding old pages) is retried
        // after the next commit, as the auto-checkpoint's would be.
        // SAFETY: called by SQLite on this connection with its own handle and name.
        unsafe {
            ffi::sqlite3_wal_checkpoint_v2(
                db,
                name,
                ffi::SQLITE_CHECKPOINT_PASSIVE,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            );
        }
    }
    // Never panics (this is called from C): a poisoned lock only skips the news. The
    // thread is woken only when it may have work: below `start` pages it has none.
    let mut wake = frames >= shared.sizes.start;
    if let Ok(mut wal) = shared.wal.lock() {
        if frames < wal.frames {
            wal.restarts += 1;
            wake = true;
        }
        wal.frames = frames;
    }
    if wake {
        shared.changed.notify_one();
    }
    ffi::SQLITE_OK
}

/// Whether the thread checkpoints now: the WAL holds `start` pages and `chunk` more
/// than at its last checkpoint (all of them in a restarted WAL), and fewer than
/// `limit`. From `limit` on the writer's checkpoint is due: the thread starts none of
/// its own until the WAL restarts, or back-to-back checkpoints of the thread (a slow
/// disk) would keep the writer's busy for ever.
fn due(wal: &Wal, sizes: Sizes, ran_at: i64, restarts: u64) -> bool {
    let since = if wal.restarts == restarts {
        wal.frames - ran_at
    } else {
        wal.frames
    };
    (sizes.start..sizes.limit).contains(&wal.frames) && since >= sizes.chunk
}

/// The thread: waits for the WAL to need a checkpoint, checkpoints, repeats.
fn run(conn: Connection, shared: &Shared) {
    let sizes = shared.sizes;
    // The WAL's size at the last checkpoint, and the restart it belongs to.
    let mut ran_at = 0i64;
    let mut restarts = 0u64;
    loop {
        let frames = {
            let Ok(wal) = shared.wal.lock() else { return };
            let wal = shared
                .changed
                .wait_while(wal, |wal| !(wal.stop || due(wal, sizes, ran_at, restarts)));
            let Ok(wal) = wal else { return };
            if wal.stop {
                return;
            }
            restarts = wal.restarts;
            wal.frames
        };
        // The next one after `chunk` more pages, whatever this one copied: a reader of
        // older pages can hold part of the WAL back (the next run copies it), and
        // the writer's own checkpoint can make this one busy.
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::debug!(error = %e, "A WAL checkpoint failed; the next commits ask again.");
        }
        ran_at = frames;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_follow_the_checkpoint_size() {
        let conn = Connection::open_in_memory().unwrap();
        conn.pragma_update(None, "wal_autocheckpoint", 16384)
            .unwrap();
        let s = Sizes::of(&conn).unwrap();
        assert_eq!((s.start, s.chunk, s.limit), (16384, 1024, 32768));
        let s = Sizes::after(4096);
        assert_eq!((s.start, s.chunk, s.limit), (4096, 256, 8192));
        let tiny = Sizes::after(0);
        assert!(tiny.start >= 16 && tiny.chunk >= 1 && tiny.limit > tiny.start);
    }

    /// A database like the store's (1 KiB pages, WAL, FULL) with one table, its
    /// writing connection and that connection's checkpoint thread.
    fn writer_db(dir: &Path, sizes: Sizes) -> (std::path::PathBuf, Connection, Checkpointer) {
        let path = dir.join("t.db");
        let writer = Connection::open(&path).unwrap();
        writer
            .execute_batch(
                "PRAGMA page_size = 1024; PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;
                 CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB NOT NULL);",
            )
            .unwrap();
        let checkpointer =
            Checkpointer::start(&writer, &path, Duration::from_secs(5), sizes).unwrap();
        (path, writer, checkpointer)
    }

    #[test]
    fn the_thread_checkpoints_between_start_and_limit_every_chunk() {
        let sizes = Sizes {
            start: 100,
            chunk: 10,
            limit: 200,
        };
        let wal = |frames, restarts| Wal {
            frames,
            restarts,
            stop: false,
        };
        assert!(!due(&wal(99, 0), sizes, 0, 0), "below start");
        assert!(due(&wal(100, 0), sizes, 0, 0));
        assert!(!due(&wal(105, 0), sizes, 100, 0), "less than a chunk since");
        assert!(due(&wal(110, 0), sizes, 100, 0));
        assert!(
            !due(&wal(200, 0), sizes, 100, 0),
            "the writer's turn at limit"
        );
        assert!(!due(&wal(5_000, 0), sizes, 100, 0), "and beyond it");
        // A restarted WAL counts from 0, whatever the last run saw.
        assert!(due(&wal(150, 1), sizes, 190, 0));
        assert!(!due(&wal(50, 1), sizes, 190, 0));
    }

    fn wal_pages(path: &Path) -> i64 {
        let wal = path.with_extension("db-wal");
        let bytes = std::fs::metadata(wal).map(|m| m.len()).unwrap_or(0) as i64;
        (bytes - 32).max(0) / (1024 + 24)
    }

    /// A writer committing as fast as it can: the thread checkpoints, the WAL stays
    /// bounded, and nothing is lost.
    #[test]
    fn the_thread_checkpoints_and_the_wal_stays_bounded() {
        let sizes = Sizes {
            start: 200,
            chunk: 20,
            limit: 400,
        };
        let dir = tempfile::tempdir().unwrap();
        let (path, writer, checkpointer) = writer_db(dir.path(), sizes);
        let mut stmt = writer.prepare("INSERT INTO t (v) VALUES (?1)").unwrap();
        let mut largest = 0;
        for _ in 0..400 {
            writer.execute_batch("BEGIN IMMEDIATE").unwrap();
            for _ in 0..5 {
                stmt.execute([vec![7u8; 900]]).unwrap();
            }
            writer.execute_batch("COMMIT").unwrap();
            largest = largest.max(wal_pages(&path));
        }
        // One commit writes about 6 pages; the WAL restarts after the limit, or
        // once the thread's checkpoint in progress there ends (the writer's is then
        // busy), which a loaded machine can delay by some commits.
        assert!(
            largest <= 2 * sizes.limit,
            "the WAL grew to {largest} pages"
        );
        assert!(
            largest >= sizes.start,
            "no checkpoint was needed ({largest} pages)"
        );
        let rows: i64 = writer
            .query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 2000);
        // Checkpoints (the thread's or the writer's) copied pages: the database file
        // holds more than its schema.
        let db_pages = std::fs::metadata(&path).unwrap().len() / 1024;
        assert!(db_pages > 100, "the database file has {db_pages} pages");
        drop(stmt);
        drop(writer);
        drop(checkpointer);
    }

    /// The writer's connection closed first, then the checkpointer: the last close
    /// checkpoints the WAL and removes it, as a clean shutdown did before the thread.
    #[test]
    fn a_clean_shutdown_leaves_no_wal() {
        let sizes = Sizes::after(16384);
        let dir = tempfile::tempdir().unwrap();
        let (path, writer, checkpointer) = writer_db(dir.path(), sizes);
        for _ in 0..50 {
            writer
                .execute("INSERT INTO t (v) VALUES (?1)", [vec![3u8; 900]])
                .unwrap();
        }
        assert!(wal_pages(&path) > 0);
        drop(writer);
        drop(checkpointer);
        assert!(!path.with_extension("db-wal").exists(), "the WAL is left");
        let rows: i64 = Connection::open(&path)
            .unwrap()
            .query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 50);
    }

    /// At a slow rate the thread's first checkpoint catches up and the WAL restarts
    /// without the writer checkpointing: the WAL never reaches the limit.
    #[test]
    fn at_a_slow_rate_the_wal_restarts_after_the_threads_checkpoint() {
        let sizes = Sizes {
            start: 60,
            chunk: 10,
            limit: 100_000,
        };
        let dir = tempfile::tempdir().unwrap();
        let (_path, writer, checkpointer) = writer_db(dir.path(), sizes);
        let mut restarted = false;
        let mut previous = 0;
        for _ in 0..60 {
            writer
                .execute("INSERT INTO t (v) VALUES (?1)", [vec![1u8; 900]])
                .unwrap();
            std::thread::sleep(Duration::from_millis(20));
            let frames: i64 = {
                // The WAL's size as the hook sees it: pages of the current cycle.
                let wal = checkpointer.shared.wal.lock().unwrap();
                wal.frames
            };
            restarted |= frames < previous;
            previous = frames;
        }
        assert!(restarted, "the WAL never restarted");
    }
}
