//! A real headless Chromium for the console's browser tests: Debian's `chromium` and
//! `chromium-driver` (`scripts/install-test-deps` installs them), driven over
//! WebDriver with `fantoccini`. `Browser::start()` runs chromedriver on a free port in
//! its own process group (so the browsers it starts go with it) and kills that group
//! on drop; `Browser::client()` opens a headless session with a fresh profile and a
//! download directory of its own.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// `Err(why)` when this machine has no browser to test with (the tests then skip,
/// saying so; CI installs both packages).
pub fn available() -> Result<(), String> {
    for path in [CHROMIUM, CHROMEDRIVER] {
        if !Path::new(path).exists() {
            return Err(format!(
                "{path} is missing; `scripts/install-test-deps` (as root) installs chromium and chromium-driver"
            ));
        }
    }
    Ok(())
}

/// A running chromedriver; killed (with the browsers it started) on drop.
pub struct Browser {
    driver: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Browser {
    pub fn start() -> Browser {
        use std::os::unix::process::CommandExt;
        let dir = tempfile::tempdir().expect("the browser's directory");
        let port = super::free_port();
        let log = std::fs::File::create(dir.path().join("chromedriver.log")).expect("log");
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("start chromedriver");
        let browser = Browser { driver, port, dir };
        assert!(
            super::wait_until(Duration::from_secs(20), || super::port_open(port)),
            "chromedriver did not listen on {port}: {}",
            browser.log()
        );
        std::fs::create_dir_all(browser.downloads()).expect("downloads directory");
        browser
    }

    /// Where downloads land.
    pub fn downloads(&self) -> PathBuf {
        self.dir.path().join("downloads")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("chromedriver.log")).unwrap_or_default()
    }

    /// A new headless session (window 1366×768 until resized).
    pub async fn client(&self) -> fantoccini::Client {
        let profile = self.dir.path().join("profile");
        let mut args = vec![
            "--headless".to_string(),
            "--disable-gpu".into(),
            "--disable-quic".into(),
            "--no-first-run".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--disable-dev-shm-usage".into(),
            "--hide-scrollbars".into(),
            "--window-size=1366,768".into(),
            format!("--user-data-dir={}", profile.display()),
        ];
        // Chromium refuses to run as root without it (CI runs as root).
        if unsafe { libc::geteuid() } == 0 {
            args.push("--no-sandbox".into());
        }
        let caps = serde_json::json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": args,
                "prefs": {
                    "download.default_directory": self.downloads().display().to_string(),
                    "download.prompt_for_download": false,
                    "download.directory_upgrade": true,
                    "safebrowsing.enabled": false,
                },
            },
        });
        let serde_json::Value::Object(caps) = caps else {
            unreachable!()
        };
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        fantoccini::ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{}", self.port))
            .await
            .unwrap_or_else(|e| panic!("a chromium session: {e}\n{}", self.log()))
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The whole group: chromedriver and every chromium it started.
        unsafe {
            libc::kill(-(self.driver.id() as i32), libc::SIGKILL);
        }
        let _ = self.driver.wait();
    }
}

/// Whether a PNG screenshot shows something: it decodes, and its pixels are not all
/// (nearly) one colour. Returns the share of the most common colour.
pub fn png_not_blank(png_bytes: &[u8]) -> Result<f64, String> {
    let decoder = png::Decoder::new(std::io::Cursor::new(png_bytes));
    let mut reader = decoder.read_info().map_err(|e| e.to_string())?;
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).map_err(|e| e.to_string())?;
    let channels = info.color_type.samples();
    let pixels = &buf[..info.buffer_size()];
    if info.width < 100 || info.height < 100 {
        return Err(format!("only {}×{} pixels", info.width, info.height));
    }
    let mut counts = std::collections::HashMap::new();
    for px in pixels.chunks(channels) {
        *counts.entry(px[..channels.min(3)].to_vec()).or_insert(0u64) += 1;
    }
    let total = (pixels.len() / channels) as f64;
    let top = counts.values().copied().max().unwrap_or(0) as f64 / total;
    if counts.len() < 8 || top > 0.985 {
        return Err(format!(
            "blank: {} colours, the most common covers {:.1}%",
            counts.len(),
            top * 100.0
        ));
    }
    Ok(top)
}

/// The first finished file ending in `.EXT` in `dir` (Chromium writes
/// `*.crdownload` until it is complete), waiting up to `timeout`.
pub fn wait_for_download(dir: &Path, ext: &str, timeout: Duration) -> Option<PathBuf> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let found = std::fs::read_dir(dir).ok().and_then(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .find(|p| p.extension().is_some_and(|e| e == ext))
        });
        if found.is_some() || std::time::Instant::now() > deadline {
            return found;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
