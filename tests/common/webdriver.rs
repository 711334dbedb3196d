//! A real browser: headless Chromium driven over WebDriver (fantoccini and Debian's
//! chromedriver), for the console and the browser client.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder};
use serde_json::{json, Value};

use super::{poll, unique, DEADLINE};

/// One browser at a time per test binary: each is a chromedriver and a Chromium with its
/// renderers, and two cores do not run several of them next to a bridge and a broker.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const HOW_TO_INSTALL: &str = "the browser tests need Chromium and its WebDriver: \
     `apt-get install chromium chromium-driver` (or set CHROMEDRIVER and CHROMIUM)";

/// A headless Chromium of its own (fresh profile), through its own chromedriver.
pub struct Chrome {
    pub client: Client,
    driver: Child,
    profile: PathBuf,
    _turn: tokio::sync::MutexGuard<'static, ()>,
}

impl Chrome {
    /// Starts chromedriver on a free port and opens a 1280×800 headless Chromium; fails the
    /// test (never skips it) when either is missing.
    pub async fn start() -> Chrome {
        let turn = TURN.lock().await;
        let driver_path = std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into());
        let port = free_port();
        let mut driver = {
            use std::os::unix::process::CommandExt;
            Command::new(&driver_path)
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                // Its own process group, so that `drop` can end Chromium with it even when
                // the test failed before closing the session.
                .process_group(0)
                .spawn()
                .unwrap_or_else(|error| panic!("cannot run `{driver_path}` ({error}): {HOW_TO_INSTALL}"))
        };
        let profile = std::env::temp_dir().join(unique("chromium-profile"));
        let mut chrome_options = json!({
            "args": [
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--force-device-scale-factor=1",
                "--window-size=1280,800",
                format!("--user-data-dir={}", profile.display()),
            ]
        });
        if let Ok(binary) = std::env::var("CHROMIUM") {
            chrome_options["binary"] = binary.into();
        }
        let mut capabilities = serde_json::Map::new();
        capabilities.insert("goog:chromeOptions".into(), chrome_options);
        let webdriver = format!("http://127.0.0.1:{port}");
        // chromedriver takes a moment to listen; a session it refuses outright (no Chromium)
        // is an error worth showing.
        let client = poll(DEADLINE, Duration::from_millis(50), || {
            let capabilities = capabilities.clone();
            let webdriver = webdriver.clone();
            let driver_path = driver_path.clone();
            let exited = driver.try_wait().ok().flatten();
            async move {
                if let Some(status) = exited {
                    panic!("`{driver_path}` exited at once ({status}): {HOW_TO_INSTALL}");
                }
                ClientBuilder::native()
                    .capabilities(capabilities)
                    .connect(&webdriver)
                    .await
                    .map_err(|error| {
                        format!("no WebDriver session from {webdriver}: {error}\n{HOW_TO_INSTALL}")
                    })
            }
        })
        .await;
        Chrome {
            client,
            driver,
            profile,
            _turn: turn,
        }
    }

    /// Opens `url`, failing the test when the page cannot be loaded.
    pub async fn open(&self, url: &str) {
        self.client
            .goto(url)
            .await
            .unwrap_or_else(|error| panic!("cannot open {url}: {error}"));
    }

    /// Runs `script` in the page (a function body; a returned promise is awaited) and returns
    /// its result; fails the test when it throws.
    pub async fn run(&self, script: &str) -> Value {
        self.client
            .execute(script, Vec::new())
            .await
            .unwrap_or_else(|error| panic!("the page failed to run\n{script}\n: {error}"))
    }

    /// Evaluates `expression` until it is truthy, and returns it; fails after the deadline
    /// saying `what` never happened and what `expression` was last.
    pub async fn wait_for(&self, what: &str, expression: &str) -> Value {
        let script = format!("return ({expression});");
        poll(DEADLINE, Duration::from_millis(25), || {
            let script = script.clone();
            async move {
                let value = self
                    .client
                    .execute(&script, Vec::new())
                    .await
                    .map_err(|error| format!("{what}: the page failed to run `{expression}`: {error}"))?;
                match value {
                    Value::Null | Value::Bool(false) => {
                        Err(format!("timed out waiting for {what} (`{expression}`)"))
                    }
                    Value::Number(ref n) if n.as_f64() == Some(0.0) => {
                        Err(format!("timed out waiting for {what} (`{expression}` stayed 0)"))
                    }
                    Value::String(ref s) if s.is_empty() => Err(format!(
                        "timed out waiting for {what} (`{expression}` stayed empty)"
                    )),
                    value => Ok(value),
                }
            }
        })
        .await
    }

    /// Resizes the page's viewport to `width`×`height` and saves a PNG of it as
    /// `target/screenshots/<name>.png`, for review.
    pub async fn screenshot(&self, name: &str, width: u32, height: u32) -> PathBuf {
        self.client
            .set_window_size(width, height)
            .await
            .expect("resize the window");
        // The window size includes whatever the browser draws around the page: grow it by
        // that much, so the page itself gets the size asked for.
        let inner = self.run("return [window.innerWidth, window.innerHeight];").await;
        let inner = |i: usize| inner[i].as_u64().and_then(|n| u32::try_from(n).ok()).unwrap_or(0);
        let (outer_width, outer_height) =
            (2 * width - inner(0).min(width), 2 * height - inner(1).min(height));
        if (outer_width, outer_height) != (width, height) {
            self.client
                .set_window_size(outer_width, outer_height)
                .await
                .expect("resize the window");
        }
        // Two animation frames: the page has laid out and painted at the new size.
        self.run("return new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(() => done(true))));")
            .await;
        let png = self.client.screenshot().await.expect("screenshot");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
        let dir = target.join("screenshots");
        std::fs::create_dir_all(&dir).unwrap_or_else(|error| panic!("create {}: {error}", dir.display()));
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap_or_else(|error| panic!("write {}: {error}", path.display()));
        path
    }

    /// Ends the WebDriver session (chromedriver closes Chromium), then the driver.
    pub async fn quit(self) {
        // A clone: `close` consumes its client, and `Chrome` (which has a `Drop`) cannot give
        // its own away. `drop` then ends the driver's process group and deletes the profile.
        let _ = self.client.clone().close().await;
    }
}

impl Drop for Chrome {
    fn drop(&mut self) {
        if let Ok(pid) = libc::pid_t::try_from(self.driver.id()) {
            // SAFETY: kill(2) touches no memory of ours. The group is the one chromedriver
            // leads (process_group(0)); our child is not reaped before this, so its id still
            // names that group.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
        }
        let _ = self.driver.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// A TCP port nothing listens on right now (the OS picks it; it is free again once dropped).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("a free port on loopback")
}
