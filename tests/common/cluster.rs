//! A private three-node RabbitMQ cluster for one test, started and driven through
//! `scripts/cluster.sh` (docs/cluster.md). It has node names, ports and a directory of its own,
//! so it never meets the machine's broker (5672), the suite's private node
//! (`deskbridge-tests-*`), the TLS and fault tests' nodes (`deskbridge-test-*`), the default
//! cluster (`deskbridge-c*`) or another run of the same test.
//!
//! `Drop` stops every node and deletes the directory, also when the test panics. A test process
//! that dies without unwinding (Ctrl-C, SIGKILL, a CI timeout) runs no `Drop`: for that, a small
//! watchdog process of its own (a shell blocked reading a pipe only the test process holds) runs
//! `stop` when the pipe closes.
//!
//! Stream replication needs no ports of ours: in RabbitMQ 3.10.8 (osiris 1.3.1) each replica
//! listens on a random port of 6001–6500 and on `eaddrinuse` tries another, up to 100 times, so
//! clusters side by side (and anything else in that range) share it without colliding.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::time::Instant;

use super::private_broker::{rabbitmq_server, CLI_PORTS, RESERVED_PORTS};

/// Nodes in the cluster (the script's fixed size).
pub const NODES: u16 = 3;

/// Where the base ports are drawn from: clear of the machine broker's, the bench node's, the
/// CLI's and osiris's ranges, and below the kernel's ephemeral ports (32768+), which a client
/// socket could take between our check and the node's bind.
const PORT_RANGE: std::ops::Range<u16> = 20_000..32_000;

/// A running cluster; stopped, and its directory deleted, on drop.
pub struct Cluster {
    /// Node names are `<prefix>1@localhost` … `<prefix>3@localhost`.
    pub prefix: String,
    /// AMQP port of node 1; node N listens on `amqp_base + N − 1`, on 127.0.0.1.
    pub amqp_base: u16,
    /// One AMQP URL per node, node 1 first (the script's `start` output).
    pub urls: Vec<String>,
    /// The `CLUSTER_*` variables that name this cluster in every script call.
    env: Vec<(&'static str, String)>,
    dir: PathBuf,
    /// Runs `stop` if this process dies without dropping us; `None` once stopped.
    watchdog: Option<(Child, ChildStdin)>,
}

impl Cluster {
    /// Boots the three nodes and joins them (32–41 s on two cores): call it from
    /// `block_in_place` in async tests. Fails the test, after stopping whatever started, when
    /// RabbitMQ is missing or a node does not boot.
    pub fn start() -> Cluster {
        // Before anything runs: on a machine without RabbitMQ say how to get it.
        let _ = rabbitmq_server();
        let id = &uuid::Uuid::new_v4().simple().to_string()[..8];
        // Root runs the nodes as `rabbitmq` (the script uses su), which must be able to reach
        // the directory: /tmp is, a private TMPDIR (e.g. under /root) may not be.
        let tmp = if is_root() {
            PathBuf::from("/tmp")
        } else {
            std::env::temp_dir()
        };
        let (amqp_base, dist_base) = free_port_bases();
        let mut cluster = Cluster {
            prefix: format!("deskbridge-failover-{id}-"),
            amqp_base,
            urls: Vec::new(),
            env: Vec::new(),
            dir: tmp.join(format!("deskbridge-failover-{id}")),
            watchdog: None,
        };
        cluster.env = vec![
            ("CLUSTER_NODE_PREFIX", cluster.prefix.clone()),
            ("CLUSTER_AMQP_PORT", amqp_base.to_string()),
            ("CLUSTER_DIST_PORT", dist_base.to_string()),
            ("CLUSTER_DIR", cluster.dir.display().to_string()),
        ];
        // From here on, `Drop` (or the watchdog) cleans up whatever happens.
        cluster.watchdog = Some(cluster.spawn_watchdog());
        let started = Instant::now();
        let output = cluster.run(&["start"]);
        assert!(
            output.status.success(),
            "scripts/cluster.sh start failed for nodes {}1..3 (amqp {amqp_base}.., dist {dist_base}..):\n{}",
            cluster.prefix,
            String::from_utf8_lossy(&output.stderr)
        );
        // stdout carries only the answer: the URLs, comma-separated, on the last line.
        let stdout = String::from_utf8_lossy(&output.stdout);
        cluster.urls = stdout
            .lines()
            .last()
            .unwrap_or_default()
            .split(',')
            .map(str::to_owned)
            .collect();
        assert_eq!(
            cluster.urls.len(),
            usize::from(NODES),
            "start prints one URL per node: {stdout:?}"
        );
        eprintln!(
            "cluster {}1..3 up in {:.1} s: {}",
            cluster.prefix,
            started.elapsed().as_secs_f64(),
            cluster.urls.join(" ")
        );
        cluster
    }

    /// `scripts/cluster.sh` with this cluster's variables, as a command to run.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(script());
        command.args(args).envs(self.env.iter().cloned());
        command
    }

    /// Runs the script with `args` and returns what it did.
    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args)
            .output()
            .unwrap_or_else(|error| panic!("cannot run {}: {error}", script().display()))
    }

    /// The node (1, 2 or 3) leading the stream or quorum queue `queue`.
    pub fn leader(&self, queue: &str) -> u16 {
        let output = self.run(&["leader", queue]);
        let answer = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "scripts/cluster.sh leader {queue}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        answer
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("leader answers a node number, not {answer:?}"))
    }

    /// Node `n`'s AMQP port.
    pub fn amqp_port(&self, n: u16) -> u16 {
        self.amqp_base + n - 1
    }

    /// A shell that blocks reading a pipe whose other end only this process holds (Rust opens
    /// it close-on-exec, so no node inherits it); when the pipe closes, also when this process
    /// dies, it runs `stop`. It has a process group of its own, so a Ctrl-C meant for the test
    /// does not reach it.
    fn spawn_watchdog(&self) -> (Child, ChildStdin) {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(r#"read -r _; exec "$0" stop"#)
            .arg(script())
            .envs(self.env.iter().cloned())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start the cluster's watchdog shell: {error}"));
        // Just spawned with a piped stdin.
        let stdin = child.stdin.take().expect("piped stdin");
        (child, stdin)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let started = Instant::now();
        let output = self.run(&["stop"]);
        if output.status.success() {
            eprintln!(
                "cluster {}1..3 stopped in {:.1} s",
                self.prefix,
                started.elapsed().as_secs_f64()
            );
        } else {
            eprintln!(
                "scripts/cluster.sh stop failed for {}1..3 (its nodes may still run: `CLUSTER_NODE_PREFIX={} CLUSTER_DIR={} scripts/cluster.sh stop`):\n{}",
                self.prefix,
                self.prefix,
                self.dir.display(),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        if let Some((mut child, stdin)) = self.watchdog.take() {
            // Our own stop ran: the watchdog has nothing left to do. It is a shell blocked in
            // `read`, with no child of its own, so killing it leaves nothing behind.
            let _ = child.kill();
            drop(stdin);
            let _ = child.wait();
        }
    }
}

/// `scripts/cluster.sh` of this checkout.
fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/cluster.sh")
}

fn is_root() -> bool {
    // SAFETY: geteuid(2) has no preconditions and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

/// Two base ports, each starting [`NODES`] consecutive free ones (AMQP, Erlang distribution),
/// none reserved. Free when checked: the script checks again before it starts a node.
fn free_port_bases() -> (u16, u16) {
    let mut bases = Vec::with_capacity(2);
    // Held until both are chosen, so that the two runs of ports cannot overlap.
    let mut held: Vec<TcpListener> = Vec::new();
    let span = PORT_RANGE.end - PORT_RANGE.start - NODES;
    for _ in 0..1000 {
        let random = uuid::Uuid::new_v4().as_u64_pair().0;
        let base = PORT_RANGE.start + (random % u64::from(span)) as u16;
        let ports: Vec<u16> = (base..base + NODES).collect();
        if ports
            .iter()
            .any(|port| RESERVED_PORTS.contains(port) || CLI_PORTS.contains(port))
        {
            continue;
        }
        // Erlang's distribution listens on every interface: bind the same way.
        let listeners: Vec<TcpListener> = ports
            .iter()
            .filter_map(|port| TcpListener::bind(("0.0.0.0", *port)).ok())
            .collect();
        if listeners.len() == ports.len() {
            held.extend(listeners);
            bases.push(base);
            if bases.len() == 2 {
                return (bases[0], bases[1]);
            }
        }
    }
    panic!("no two runs of {NODES} free ports in {PORT_RANGE:?} after 1000 tries");
}
