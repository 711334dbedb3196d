//! A private RabbitMQ node: its own node name, free ports, data directory and, on request, a
//! TLS listener with throwaway certificates. Tests that need a broker configured unlike the
//! shared one (TLS here; later the whole suite, to stop sharing 5672) start one, use its
//! URLs, and drop it: `Drop` stops the node and deletes its directory, also when the test
//! fails.
//!
//! Starting a node takes about ten seconds: start one per group of checks, not per check.
//! It is started the way `scripts/bench-broker.sh` starts the bench node (`RABBITMQ_*`
//! variables, `rabbitmq-server -detached`, `rabbitmqctl await_startup`); Debian's scripts run
//! it as the `rabbitmq` user, so its directory is handed to that user when we are root.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// Ports a private node must never take: the shared broker's and the bench node's.
pub const RESERVED_PORTS: &[u16] = &[5672, 5673, 15672, 15684, 25672, 25673, 61613, 61614];
/// Ports `rabbitmqctl` itself listens on while it runs (its distribution range).
pub const CLI_PORTS: std::ops::RangeInclusive<u16> = 35672..=35682;
/// A loopback address the TLS listener also answers on, which the server certificate does
/// not name: connecting to it must fail host-name verification.
pub const UNNAMED_ADDRESS: &str = "127.0.0.2";
/// Bound on a node's boot; a healthy one takes about ten seconds on two cores.
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);

/// Whether the TLS listener insists on a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientCertificates {
    /// Verified when presented, not required (`fail_if_no_peer_cert = false`).
    Optional,
    /// Connections without a certificate signed by the test CA are refused
    /// (`fail_if_no_peer_cert = true`).
    Required,
}

/// How to configure a private node.
#[derive(Debug, Clone, Copy, Default)]
pub struct NodeOptions {
    /// A TLS listener (beside the plain one), and how it treats client certificates.
    pub tls: Option<ClientCertificates>,
    /// `max_message_size`: larger publishes close their channel with 406 PRECONDITION_FAILED.
    pub max_message_size: Option<u32>,
}

/// Throwaway PEM files made with the `openssl` CLI: a CA, a server certificate for `localhost`
/// and `127.0.0.1` signed by it, a client certificate signed by it, and a second CA that signed
/// nothing (a "wrong CA"). Keys are unencrypted PKCS#8.
#[derive(Debug, Clone)]
pub struct Certificates {
    /// The CA that signed the server and client certificates.
    pub ca: PathBuf,
    /// The node's certificate: `localhost` and `127.0.0.1`.
    pub server_cert: PathBuf,
    /// Its key.
    pub server_key: PathBuf,
    /// A client certificate the node accepts.
    pub client_cert: PathBuf,
    /// Its key.
    pub client_key: PathBuf,
    /// A CA that signed nothing here.
    pub stranger_ca: PathBuf,
}

impl Certificates {
    /// Generates the files in `dir` (which must exist).
    pub fn generate(dir: &Path) -> Certificates {
        let file = |name: &str| dir.join(name);
        let certificates = Certificates {
            ca: file("ca.pem"),
            server_cert: file("server.pem"),
            server_key: file("server.key"),
            client_cert: file("client.pem"),
            client_key: file("client.key"),
            stranger_ca: file("stranger-ca.pem"),
        };
        self_signed_ca(&certificates.ca, &file("ca.key"), "deskbridge test CA");
        self_signed_ca(
            &certificates.stranger_ca,
            &file("stranger-ca.key"),
            "deskbridge stranger CA",
        );
        let ca = (certificates.ca.as_path(), file("ca.key"));
        signed(
            dir,
            "server",
            "localhost",
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
            (ca.0, &ca.1),
        );
        signed(
            dir,
            "client",
            "deskbridge-test-client",
            "extendedKeyUsage=clientAuth\n",
            (ca.0, &ca.1),
        );
        certificates
    }
}

/// Runs `openssl` with `args`, failing the test with its output if it fails.
fn openssl(args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .output()
        .unwrap_or_else(|error| panic!("cannot run openssl ({error}): `apt-get install openssl`"));
    assert!(
        output.status.success(),
        "openssl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A P-256 key and a certificate valid for two days: quick to make, and never worth keeping.
const NEW_KEY: &[&str] = &[
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:prime256v1",
    "-noenc",
];

fn self_signed_ca(cert: &Path, key: &Path, name: &str) {
    let subject = format!("/CN={name}");
    let mut args = vec!["req", "-x509"];
    args.extend_from_slice(NEW_KEY);
    args.extend_from_slice(&[
        "-keyout",
        path_str(key),
        "-out",
        path_str(cert),
        "-days",
        "2",
        "-subj",
        &subject,
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    openssl(&args);
}

/// `<dir>/<name>.pem` and `.key` for `common_name`, signed by `ca` (cert, key) with `extensions`.
fn signed(dir: &Path, name: &str, common_name: &str, extensions: &str, ca: (&Path, &Path)) {
    let key = dir.join(format!("{name}.key"));
    let request = dir.join(format!("{name}.csr"));
    let cert = dir.join(format!("{name}.pem"));
    let extfile = dir.join(format!("{name}.ext"));
    std::fs::write(
        &extfile,
        format!("basicConstraints=critical,CA:FALSE\n{extensions}"),
    )
    .unwrap_or_else(|error| panic!("write {}: {error}", extfile.display()));
    let subject = format!("/CN={common_name}");
    let mut args = vec!["req", "-new"];
    args.extend_from_slice(NEW_KEY);
    args.extend_from_slice(&[
        "-keyout",
        path_str(&key),
        "-out",
        path_str(&request),
        "-subj",
        &subject,
    ]);
    openssl(&args);
    openssl(&[
        "x509",
        "-req",
        "-in",
        path_str(&request),
        "-CA",
        path_str(ca.0),
        "-CAkey",
        path_str(ca.1),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        path_str(&extfile),
        "-out",
        path_str(&cert),
    ]);
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("temp paths are UTF-8")
}

/// A running private node; stopped, and its directory deleted, on drop.
pub struct PrivateBroker {
    node: String,
    dir: PathBuf,
    /// Plain AMQP, on 127.0.0.1.
    pub amqp_port: u16,
    /// TLS, on 127.0.0.1, when asked for.
    pub tls_port: Option<u16>,
    /// The CA, server and client files, when TLS was asked for.
    pub certificates: Option<Certificates>,
}

impl PrivateBroker {
    /// Starts a node and returns once it has booted; fails the test (after cleaning up)
    /// when it cannot. Blocks for about ten seconds: call it from `block_in_place` in async
    /// tests.
    pub fn start(options: NodeOptions) -> PrivateBroker {
        let server = rabbitmq_server();
        let id = &uuid::Uuid::new_v4().simple().to_string()[..12];
        let dir = std::env::temp_dir().join(format!("deskbridge-broker-{id}"));
        let ports = free_ports(if options.tls.is_some() { 3 } else { 2 });
        // From here on, `Drop` cleans up whatever happens.
        let mut broker = PrivateBroker {
            node: format!("deskbridge-test-{id}@localhost"),
            dir,
            amqp_port: ports[0],
            tls_port: options.tls.map(|_| ports[2]),
            certificates: None,
        };
        let dist_port = ports[1];
        for sub in ["mnesia", "log", "certs"] {
            let path = broker.dir.join(sub);
            std::fs::create_dir_all(&path)
                .unwrap_or_else(|error| panic!("create {}: {error}", path.display()));
        }
        if options.tls.is_some() {
            broker.certificates = Some(Certificates::generate(&broker.dir.join("certs")));
        }
        broker.write_config(options);
        hand_to_rabbitmq_user(&broker.dir);
        broker.boot(&server, dist_port);
        broker
    }

    /// `amqp://guest:guest@127.0.0.1:<amqp_port>/%2f`.
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.amqp_port)
    }

    /// `amqps://guest:guest@localhost:<tls_port>/%2f` (`localhost` is the name the server
    /// certificate carries); fails the test if the node has no TLS listener.
    pub fn amqps_url(&self) -> String {
        self.amqps_url_at("localhost")
    }

    /// `amqps://guest:guest@<host>:<tls_port>/%2f`, e.g. with [`UNNAMED_ADDRESS`].
    pub fn amqps_url_at(&self, host: &str) -> String {
        let port = self.tls_port.expect("the node was started with a TLS listener");
        format!("amqps://guest:guest@{host}:{port}/%2f")
    }

    /// The throwaway certificates; fails the test if the node has no TLS listener.
    pub fn certificates(&self) -> &Certificates {
        self.certificates
            .as_ref()
            .expect("the node was started with a TLS listener")
    }

    /// The node's name, for `rabbitmqctl -n`.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Runs `rabbitmqctl -n <node> <args>` and returns what it did.
    pub fn rabbitmqctl(&self, args: &[&str]) -> Output {
        Command::new(rabbitmqctl())
            .arg("-n")
            .arg(&self.node)
            .args(args)
            .output()
            .unwrap_or_else(|error| panic!("cannot run rabbitmqctl: {error}"))
    }

    fn pid_file(&self) -> PathBuf {
        self.dir.join("pid")
    }

    fn log_file(&self) -> PathBuf {
        self.dir.join("log").join(format!("{}.log", self.node))
    }

    fn write_config(&self, options: NodeOptions) {
        std::fs::write(self.dir.join("enabled_plugins"), "[].\n").expect("write enabled_plugins");
        let mut conf = format!(
            "listeners.tcp.1 = 127.0.0.1:{}\nloopback_users = none\nlog.console = false\n",
            self.amqp_port
        );
        if let Some(bytes) = options.max_message_size {
            conf.push_str(&format!("max_message_size = {bytes}\n"));
        }
        if let (Some(clients), Some(port), Some(certs)) = (options.tls, self.tls_port, &self.certificates) {
            conf.push_str(&format!(
                "listeners.ssl.1 = 127.0.0.1:{port}\n\
                 listeners.ssl.2 = {UNNAMED_ADDRESS}:{port}\n\
                 ssl_options.cacertfile = {}\n\
                 ssl_options.certfile = {}\n\
                 ssl_options.keyfile = {}\n\
                 ssl_options.verify = verify_peer\n\
                 ssl_options.fail_if_no_peer_cert = {}\n",
                certs.ca.display(),
                certs.server_cert.display(),
                certs.server_key.display(),
                clients == ClientCertificates::Required,
            ));
        }
        std::fs::write(self.dir.join("rabbitmq.conf"), conf).expect("write rabbitmq.conf");
    }

    /// `rabbitmq-server -detached`, then waits for the listeners and for the boot to finish.
    fn boot(&self, server: &Path, dist_port: u16) {
        let started = Instant::now();
        let dir = |name: &str| self.dir.join(name);
        let output = Command::new(server)
            .arg("-detached")
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_PORT", self.amqp_port.to_string())
            .env("RABBITMQ_DIST_PORT", dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", dir("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir("log"))
            .env("RABBITMQ_PID_FILE", self.pid_file())
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir("enabled_plugins"))
            .env("RABBITMQ_CONFIG_FILE", dir("rabbitmq"))
            .output()
            .unwrap_or_else(|error| panic!("cannot run {}: {error}", server.display()));
        assert!(
            output.status.success(),
            "rabbitmq-server -detached failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        // -detached returns before the node listens. Its listeners open at the end of the boot,
        // and a port probe costs nothing, unlike a rabbitmqctl call (a whole Erlang VM).
        let ports: Vec<u16> = std::iter::once(self.amqp_port).chain(self.tls_port).collect();
        while !ports.iter().all(|port| listening(*port)) {
            if let Some(pid) = self.pid().filter(|pid| !alive(*pid)) {
                panic!(
                    "node {} (pid {pid}) died while booting:\n{}",
                    self.node,
                    self.log_tail()
                );
            }
            assert!(
                started.elapsed() < BOOT_TIMEOUT,
                "node {} did not listen on {ports:?} within {BOOT_TIMEOUT:?}:\n{}",
                self.node,
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let awaited = self.rabbitmqctl(&["-q", "await_startup", "--timeout", "60"]);
        assert!(
            awaited.status.success(),
            "node {} did not finish booting: {}\n{}",
            self.node,
            String::from_utf8_lossy(&awaited.stderr),
            self.log_tail()
        );
        eprintln!(
            "private broker {} up in {:.1} s: amqp {}{}",
            self.node,
            started.elapsed().as_secs_f64(),
            self.amqp_port,
            self.tls_port
                .map(|port| format!(", amqps {port}"))
                .unwrap_or_default()
        );
    }

    /// The node's OS pid, once its pid file is written.
    fn pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.pid_file()).ok()?.trim().parse().ok()
    }

    /// The last lines of the node's log, for a failure message.
    fn log_tail(&self) -> String {
        let log =
            std::fs::read_to_string(self.log_file()).unwrap_or_else(|error| format!("(no log: {error})"));
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        // `stop <pid file>` returns once the process has ended, so the directory is free.
        let stopped = Command::new(rabbitmqctl())
            .arg("-n")
            .arg(&self.node)
            .args(["-q", "stop"])
            .arg(self.pid_file())
            .output()
            .is_ok_and(|output| output.status.success());
        if let Some(pid) = self.pid().filter(|pid| alive(*pid)) {
            if !stopped {
                eprintln!(
                    "private broker {}: rabbitmqctl stop failed; killing pid {pid}",
                    self.node
                );
            }
            // SAFETY: kill(2) touches no memory of ours; the pid is the node this value
            // started, read from its own pid file and checked alive just now.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `n` distinct free ports on 127.0.0.1, none of them reserved.
fn free_ports(n: usize) -> Vec<u16> {
    let mut held = Vec::new();
    while held.len() < n {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a free port");
        let port = listener.local_addr().expect("bound address").port();
        if !RESERVED_PORTS.contains(&port) && !CLI_PORTS.contains(&port) {
            held.push(listener);
        }
    }
    held.iter()
        .map(|listener| listener.local_addr().expect("bound address").port())
        .collect()
}

fn listening(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok()
}

fn alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// `name` on `PATH`, or in Debian's sbin and RabbitMQ's own bin (not on a user's `PATH`).
fn find(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/lib/rabbitmq/bin")])
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// Where `rabbitmq-server` is; fails the test saying how to install it.
pub fn rabbitmq_server() -> PathBuf {
    find("rabbitmq-server").unwrap_or_else(|| {
        panic!(
            "rabbitmq-server is not installed: `apt-get install rabbitmq-server` (tests start private nodes)"
        )
    })
}

fn rabbitmqctl() -> PathBuf {
    find("rabbitmqctl").unwrap_or_else(|| PathBuf::from("rabbitmqctl"))
}

/// Debian's scripts run the node as `rabbitmq` even when root starts it: that user must own
/// the directory (data, logs, and the server key, which must not be world-readable).
fn hand_to_rabbitmq_user(dir: &Path) {
    // SAFETY: geteuid(2) has no preconditions and touches no memory.
    let root = unsafe { libc::geteuid() } == 0;
    let has_user = Command::new("id")
        .arg("rabbitmq")
        .output()
        .is_ok_and(|output| output.status.success());
    if root && has_user {
        let output = Command::new("chown")
            .args(["-R", "rabbitmq:rabbitmq"])
            .arg(dir)
            .output()
            .expect("run chown");
        assert!(
            output.status.success(),
            "chown {}: {}",
            dir.display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
