//! The examples in README.md and docs/*.md, checked so that none goes stale: every fenced code
//! block says in its info string what checks it (docs/testing.md, "The docs' examples"), and
//! each kind is checked here:
//!
//! - `toml config`: loads as a deskbridge config file (`Config::load`), TLS files made for it;
//! - `sh run`: runs in bash against the built binary (`cargo run --release --` is the binary);
//! - `sh no-run`: shown, not run (starts a server, needs a broker of its own, ...);
//! - `python bridge`: runs against a bridge, and a browser gets the event it publishes;
//! - `js node`: is examples/node-client.mjs, which runs in Node against a bridge;
//! - `js browser`: runs in Chromium on a page the bridge serves, against a desktop responder;
//! - `text ...`, `rust excerpt` and blocks without a language: diagrams, output, quotes.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::private_broker::Certificates;
use common::*;
use deskbridge::config::{Config, Overrides};
use serde_json::{json, Value};

/// The info strings a block may carry; anything else fails `every_block_says_what_checks_it`.
const MARKS: &[&str] = &[
    "toml config",
    "sh run",
    "sh no-run",
    "python bridge",
    "js node",
    "js browser",
    "rust excerpt",
    // Copies of deploy/'s files, which tests/deploy.rs parses and checks against docs/deploy.md.
    "yaml deploy",
    "toml deploy",
    "nginx deploy",
];

/// One fenced block: where it is, its info string and its text.
#[derive(Debug)]
struct Block {
    file: PathBuf,
    line: usize,
    info: String,
    code: String,
}

impl Block {
    fn at(&self) -> String {
        format!("{}:{}", self.file.display(), self.line)
    }
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// README.md and every docs/*.md.
fn documents() -> Vec<PathBuf> {
    let mut files = vec![root().join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .expect("docs/ exists")
        .filter_map(|entry| Some(entry.ok()?.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
}

/// Every fenced block (```), in file order.
fn blocks() -> Vec<Block> {
    let mut found = Vec::new();
    for file in documents() {
        let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let mut open: Option<Block> = None;
        for (n, line) in text.lines().enumerate() {
            let Some(info) = line.strip_prefix("```") else {
                if let Some(block) = open.as_mut() {
                    block.code.push_str(line);
                    block.code.push('\n');
                }
                continue;
            };
            match open.take() {
                Some(block) => found.push(block),
                None => {
                    open = Some(Block {
                        file: file.strip_prefix(root()).unwrap_or(&file).to_path_buf(),
                        line: n + 1,
                        info: info.trim().to_string(),
                        code: String::new(),
                    })
                }
            }
        }
        assert!(
            open.is_none(),
            "{}: a fenced block is never closed",
            file.display()
        );
    }
    found
}

fn marked(mark: &str) -> Vec<Block> {
    blocks().into_iter().filter(|block| block.info == mark).collect()
}

/// The one block marked `mark`.
fn the_block(mark: &str) -> Block {
    let mut found = marked(mark);
    assert_eq!(found.len(), 1, "exactly one ```{mark} block: {found:?}");
    found.remove(0)
}

#[test]
fn every_block_says_what_checks_it() {
    let all = blocks();
    for block in &all {
        let known =
            block.info.is_empty() || block.info.starts_with("text") || MARKS.contains(&block.info.as_str());
        assert!(
            known,
            "{}: ```{} does not say what checks it; mark it with one of {MARKS:?}, `text ...` \
             (nothing to run) or no language (output), see docs/testing.md",
            block.at(),
            block.info
        );
    }
    // The checked kinds are all still there: a renamed mark would drop its check silently.
    for mark in ["toml config", "sh run", "python bridge", "js node", "js browser"] {
        assert!(
            all.iter().any(|block| block.info == mark),
            "no ```{mark} block left"
        );
    }
}

#[test]
fn toml_blocks_load_as_deskbridge_config() {
    let dir = std::env::temp_dir().join(unique("docs-toml"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    // The TLS example names files under /etc/deskbridge: real ones stand in for them.
    let certificates = Certificates::generate(&dir);
    let stand_in = |path: &Path| path.to_str().expect("temp paths are UTF-8").to_string();
    let blocks = marked("toml config");
    assert!(blocks.len() >= 4, "{blocks:?}");
    for (i, block) in blocks.iter().enumerate() {
        let text = block
            .code
            .replace("/etc/deskbridge/ca.pem", &stand_in(&certificates.ca))
            .replace("/etc/deskbridge/client.pem", &stand_in(&certificates.client_cert))
            .replace("/etc/deskbridge/client.key", &stand_in(&certificates.client_key));
        assert!(
            !text.contains("/etc/deskbridge/"),
            "{}: a file with no stand-in",
            block.at()
        );
        let file = dir.join(format!("block-{i}.toml"));
        std::fs::write(&file, text).expect("write config");
        if let Err(error) = Config::load(Some(&file), &Overrides::default()) {
            panic!("{}: not a config deskbridge accepts: {error}", block.at());
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs `command` until it exits, for at most `within`; fails the test if it runs longer.
fn run_bounded(mut command: Command, what: &str, within: Duration) -> Output {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| panic!("cannot run {what}: {error}"));
    let started = Instant::now();
    while child.try_wait().expect("child status").is_none() {
        if started.elapsed() > within {
            let _ = child.kill();
            let output = child.wait_with_output().expect("child output");
            panic!(
                "{what} still ran after {within:?}\nstdout: {}\nstderr: {}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("child output")
}

#[test]
fn sh_run_blocks_run_against_the_built_binary() {
    // `cargo run --release -- ARGS` is the binary this test was built with: no release build.
    let prelude = r#"cargo() {
  if [ "$1 $2 $3" != "run --release --" ]; then
    echo "docs test: a \`sh run\` block may only use \`cargo run --release -- ...\`" >&2; return 1
  fi
  shift 3; "$DESKBRIDGE_BIN" "$@"
}
"#;
    let blocks = marked("sh run");
    assert!(!blocks.is_empty());
    for block in blocks {
        let mut command = Command::new("bash");
        command
            .args(["-euo", "pipefail", "-c"])
            .arg(format!("{prelude}{}", block.code))
            .current_dir(root())
            .env("DESKBRIDGE_BIN", env!("CARGO_BIN_EXE_deskbridge"))
            // The README mints a token in "another shell" of the bridge's, which has the secret.
            .env("DESKBRIDGE_JWT_SECRET", "docs-test-secret-docs-test-secret");
        let output = run_bounded(command, &block.at(), Duration::from_secs(30));
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && !stdout.trim().is_empty(),
            "{}: {}\nstdout: {stdout}\nstderr: {}",
            block.at(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        for token in stdout.split_whitespace().filter(|word| word.starts_with("eyJ")) {
            assert_eq!(token.split('.').count(), 3, "{}: a JWT: {token}", block.at());
        }
    }
}

/// Replaces `from` with `to` in `code`, failing when `from` is not there (the example changed:
/// this test must change with it).
fn substitute(code: &str, from: &str, to: &str, block: &Block) -> String {
    assert!(
        code.contains(from),
        "{}: the example no longer has `{from}`",
        block.at()
    );
    code.replace(from, to)
}

/// Whether `program args` runs and succeeds (a tool the example needs is there).
fn works(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_example_reaches_a_browser() {
    let block = the_block("python bridge");
    if !works("python3", &["-c", "import pika"]) {
        eprintln!(
            "{}: not run: python3 with pika is missing (scripts/test-deps installs it)",
            block.at()
        );
        return;
    }
    let bridge = TestBridge::start_healthy(test_config("docs-python")).await;
    let mut browser = Browser::connect(&bridge).await;
    browser.subscribe(&["A"]).await;
    // The example's broker and exchange are the defaults; this bridge's are the test's own.
    let code = substitute(
        &block.code,
        r#"pika.ConnectionParameters("127.0.0.1")"#,
        r#"pika.URLParameters(__import__("os").environ["AMQP_URL"])"#,
        &block,
    );
    let exchange = format!("{:?}", bridge.config.amqp.inbound_exchange);
    let code = substitute(&code, r#""example""#, &exchange, &block);
    let mut command = Command::new("python3");
    command.args(["-c", &code]).env("AMQP_URL", amqp_url());
    let output = tokio::task::spawn_blocking(move || run_bounded(command, "python3", DEADLINE))
        .await
        .expect("python3 ran");
    assert!(
        output.status.success(),
        "{}: {}\n{}",
        block.at(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let event = browser.recv().await;
    assert_eq!(
        event,
        json!({"op": "event", "desk": "A", "event": "new_example", "id": "m-1", "origin": "desktop",
               "data": {"bond": "XS0001", "px": 101.5}}),
        "{}",
        block.at()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_example_publishes_through_a_bridge() {
    let block = the_block("js node");
    let example = root().join("examples/node-client.mjs");
    let file = std::fs::read_to_string(&example).expect("examples/node-client.mjs");
    assert_eq!(
        block.code,
        file,
        "{}: shows examples/node-client.mjs as it is",
        block.at()
    );
    let websocket = "if (typeof WebSocket !== 'function') process.exit(1)";
    if !works("node", &["--experimental-websocket", "-e", websocket]) {
        eprintln!(
            "{}: not run: no Node with WebSocket (20.10 or later) here",
            block.at()
        );
        return;
    }
    let bridge = TestBridge::start_healthy(test_config("docs-node")).await;
    let desktop = Listener::bind(&bridge.config.amqp.outbound_exchange, &["A_new_example"]);
    let mut command = Command::new("node");
    command
        .arg("--experimental-websocket")
        .arg(&example)
        .arg(bridge.ws_url());
    let output = tokio::task::spawn_blocking(move || run_bounded(command, "node", DEADLINE))
        .await
        .expect("node ran");
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        output.status.success(),
        "{}: {}\n{stdout}\n{}",
        block.at(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let ack = stdout
        .lines()
        .find(|line| line.starts_with("ack "))
        .unwrap_or_default();
    assert!(
        ack.ends_with(" routed"),
        "acked and routed to the desktop's queue: {stdout}"
    );
    let delivery = tokio::task::spawn_blocking(move || desktop.next())
        .await
        .expect("the desktop got it");
    let body: Value = serde_json::from_slice(&delivery.body).expect("JSON body");
    assert_eq!(body, json!({"bond": "XS0001", "px": 101.5}));
    assert!(
        ack.contains(delivery.properties.message_id().as_deref().unwrap_or("?")),
        "the ack's id is the message_id: {ack}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_browser_client_block_runs_in_chromium() {
    let block = the_block("js browser");
    let bridge = TestBridge::start_healthy(test_config("docs-browser")).await;
    let answer = json!({"bond": "XS1", "bid": 99.5});
    let body = answer.to_string().into_bytes();
    let _responder = common::desktop::Responder::start(
        &bridge.config.amqp.outbound_exchange,
        &["A_update_example"],
        move |_| body.clone(),
    );
    // The block as a module of the bridge's page: what it leaves undefined stands in, its
    // results are exported. A module from a blob: URL needs the client's full URL.
    let code = substitute(
        &block.code,
        r#"from "/deskbridge.js""#,
        &format!(r#"from "http://{}/deskbridge.js""#, bridge.addr),
        &block,
    );
    let module = format!(
        "const fetchJwt = async () => null; // no token: auth.mode = \"none\"\n\
         const shown = []; const show = (...event) => shown.push(event);\n\
         {code}\n\
         export const results = {{ id, routed, data, sessions }};\n"
    );
    let chrome = Chrome::start().await;
    chrome.open(&format!("http://{}/health/live", bridge.addr)).await;
    let script = format!(
        "const url = URL.createObjectURL(new Blob([{}], {{ type: 'text/javascript' }})); \
         return import(url).then((m) => ({{ results: m.results }}), (e) => ({{ error: String(e && e.stack || e) }}));",
        serde_json::to_string(&module).expect("a JS string")
    );
    let outcome = chrome.run(&script).await;
    chrome.quit().await;
    assert!(outcome["error"].is_null(), "{}: {}", block.at(), outcome["error"]);
    let results = &outcome["results"];
    assert!(
        results["id"].as_str().is_some_and(|id| !id.is_empty()),
        "{results}"
    );
    assert_eq!(
        results["routed"], false,
        "no desktop queue is bound for A_new_example"
    );
    assert_eq!(results["data"], answer, "the responder's answer");
    assert_eq!(results["sessions"].as_array().map(Vec::len), Some(1), "{results}");
}
