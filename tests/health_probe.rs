//! `deskbridge health`, the image's HEALTHCHECK: the binary probes a running bridge (a real
//! process on the real broker) over loopback and exits 0 only on a 200.

mod common;

use std::process::{Command, Output};

use common::bridge::test_config;
use common::process::BridgeProcess;
use common::DEADLINE;

/// `deskbridge health ARGS` configured as the image configures it: by the environment alone,
/// bind `0.0.0.0:PORT` (reached over loopback), auth jwt (which that bind requires).
fn probe(port: u16, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_deskbridge"))
        .arg("health")
        .args(args)
        .env_remove("DESKBRIDGE_CONFIG")
        .env("DESKBRIDGE_BIND", format!("0.0.0.0:{port}"))
        .env("DESKBRIDGE_AUTH_MODE", "jwt")
        .output()
        .expect("run deskbridge health")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_command_passes_on_a_serving_bridge_and_fails_with_the_reason_otherwise() {
    let config = test_config("probe");
    let _topology = common::amqp::TopologyCleanup(config.clone());
    let bridge = BridgeProcess::launch(env!("CARGO_BIN_EXE_deskbridge"), &config).expect("start deskbridge");
    bridge.wait_healthy(DEADLINE).await;
    let port = bridge.addr.port();

    for args in [&[][..], &["--path", "/health"][..]] {
        let output = probe(port, args);
        assert!(
            output.status.success(),
            "health {args:?} on a healthy bridge: {}",
            stderr(&output)
        );
    }
    let missing = probe(port, &["--path", "/no-such-page"]);
    assert_eq!(missing.status.code(), Some(1), "a 404 fails the probe");
    assert!(
        stderr(&missing).contains("/no-such-page") && stderr(&missing).contains("404"),
        "the failure names the path and the status: {}",
        stderr(&missing)
    );

    tokio::task::block_in_place(|| bridge.stop());
    let gone = probe(port, &[]);
    assert_eq!(gone.status.code(), Some(1), "nothing listens: the probe fails");
    assert!(
        stderr(&gone).contains("cannot connect to 127.0.0.1:"),
        "it tried loopback for the 0.0.0.0 bind and says so: {}",
        stderr(&gone)
    );
}
