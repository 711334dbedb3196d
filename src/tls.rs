//! The TLS half of `amqps://`: the connector built from the `amqp.tls` files, and the hints
//! that turn OpenSSL's handshake errors into something an operator can act on.
//!
//! The broker's certificate is always verified, host name included: nothing here (and no
//! setting) turns that off. Every error names the config key of the file at fault.

use std::path::{Path, PathBuf};

use native_tls::{Certificate, Identity, TlsConnector};

/// Config key of the CA certificate(s) that sign the broker's certificate.
pub const CA_FILE: &str = "amqp.tls.ca_file";
/// Config key of the client certificate (PEM, optionally followed by its chain).
pub const CERT_FILE: &str = "amqp.tls.cert_file";
/// Config key of the client certificate's private key (unencrypted PKCS#8 PEM).
pub const KEY_FILE: &str = "amqp.tls.key_file";

/// What native-tls accepts as a client key; anything else gets a conversion hint.
const PKCS8_HEADER: &str = "-----BEGIN PRIVATE KEY-----";
/// How to turn any PEM private key into what [`PKCS8_HEADER`] announces.
const TO_PKCS8: &str = "convert it with `openssl pkcs8 -topk8 -nocrypt -in KEY -out KEY.pkcs8.pem`";

/// A TLS file that cannot be used, named by its config key.
#[derive(Debug, thiserror::Error)]
pub enum TlsFileError {
    /// The file could not be read.
    #[error("cannot read {key} {}: {source}", path.display())]
    Unreadable {
        /// Its config key.
        key: &'static str,
        /// The path as configured.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file was read but does not hold what the key needs.
    #[error("{key} {}: {reason}", path.display())]
    Unusable {
        /// Its config key.
        key: &'static str,
        /// The path as configured.
        path: PathBuf,
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// OpenSSL could not build a TLS context at all (not about any one file).
    #[error("cannot set up TLS: {0}")]
    Setup(String),
}

impl TlsFileError {
    /// The config key to fix (`amqp.tls` when no single file is at fault).
    pub fn key(&self) -> &'static str {
        match self {
            TlsFileError::Unreadable { key, .. } | TlsFileError::Unusable { key, .. } => key,
            TlsFileError::Setup(_) => "amqp.tls",
        }
    }
}

/// Builds the connector for `amqps://` URLs. With `ca_file`, its certificates are the only
/// trusted roots (a private CA vouches for the broker, and no public CA can stand in for it);
/// without, the system's trust store is used. `client` is (cert_file, key_file).
pub fn connector(
    ca_file: Option<&Path>,
    client: Option<(&Path, &Path)>,
) -> Result<TlsConnector, TlsFileError> {
    let mut builder = TlsConnector::builder();
    if let Some(path) = ca_file {
        builder.disable_built_in_roots(true);
        for certificate in certificates(CA_FILE, path)?.1 {
            builder.add_root_certificate(certificate);
        }
    }
    if let Some((cert_file, key_file)) = client {
        builder.identity(identity(cert_file, key_file)?);
    }
    builder.build().map_err(|error| match client {
        // With an identity the only file-specific failure left is a key that is not the
        // certificate's (OpenSSL: "key values mismatch").
        Some((cert_file, key_file)) if error.to_string().contains("key values mismatch") => {
            TlsFileError::Unusable {
                key: KEY_FILE,
                path: key_file.to_owned(),
                reason: format!("is not the private key of {CERT_FILE} {}", cert_file.display()),
            }
        }
        _ => TlsFileError::Setup(error.to_string()),
    })
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsFileError> {
    std::fs::read(path).map_err(|source| TlsFileError::Unreadable {
        key,
        path: path.to_owned(),
        source,
    })
}

fn unusable(key: &'static str, path: &Path, reason: impl Into<String>) -> TlsFileError {
    TlsFileError::Unusable {
        key,
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// The file's bytes and every PEM certificate in them; at least one.
fn certificates(key: &'static str, path: &Path) -> Result<(Vec<u8>, Vec<Certificate>), TlsFileError> {
    let pem = read(key, path)?;
    let certificates = Certificate::stack_from_pem(&pem)
        .map_err(|error| unusable(key, path, format!("is not a PEM certificate file: {error}")))?;
    if certificates.is_empty() {
        return Err(unusable(
            key,
            path,
            "holds no PEM certificate (`-----BEGIN CERTIFICATE-----`)",
        ));
    }
    Ok((pem, certificates))
}

/// The client certificate (and any chain after it) with its PKCS#8 key.
fn identity(cert_file: &Path, key_file: &Path) -> Result<Identity, TlsFileError> {
    let (chain, _) = certificates(CERT_FILE, cert_file)?;
    let key = read(KEY_FILE, key_file)?;
    // native-tls looks for the PKCS#8 header at the very first byte.
    let key = key.trim_ascii_start();
    if !key.starts_with(PKCS8_HEADER.as_bytes()) {
        return Err(unusable(KEY_FILE, key_file, key_format_problem(key)));
    }
    Identity::from_pkcs8(&chain, key).map_err(|error| {
        unusable(
            KEY_FILE,
            key_file,
            format!("is not a usable PKCS#8 private key: {error}"),
        )
    })
}

/// Why a key file is not an unencrypted PKCS#8 PEM, and what to do about it.
fn key_format_problem(key: &[u8]) -> String {
    let head = String::from_utf8_lossy(&key[..key.len().min(64)]);
    let found = if head.starts_with("-----BEGIN ENCRYPTED PRIVATE KEY-----") {
        "is an encrypted key; deskbridge needs it unencrypted (protect the file instead)"
    } else if head.starts_with("-----BEGIN RSA PRIVATE KEY-----")
        || head.starts_with("-----BEGIN EC PRIVATE KEY-----")
        || head.starts_with("-----BEGIN EC PARAMETERS-----")
    {
        "is a traditional (PKCS#1/SEC1) key; deskbridge needs PKCS#8"
    } else {
        "is not a PEM private key; deskbridge needs PKCS#8"
    };
    format!("{found} (`{PKCS8_HEADER}`): {TO_PKCS8}")
}

/// Where a TLS connection failed, as the client saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// During the handshake.
    Handshake,
    /// At the first AMQP bytes, after the client's side of the handshake was done. TLS 1.3
    /// lets a client get there before the broker has checked the client's certificate, so a
    /// refusal shows here: as OpenSSL's alert, or as a dropped connection.
    FirstBytes,
}

/// What the operator should check after a TLS failure whose message is `message`, as ` (...)`
/// to append to it; empty when the message speaks for itself. `ca_file` and `client_cert`
/// say whether those are configured.
pub fn handshake_hint(message: &str, stage: Stage, port: u16, ca_file: bool, client_cert: bool) -> String {
    let message = message.to_ascii_lowercase();
    let has = |symptoms: &[&str]| symptoms.iter().any(|symptom| message.contains(symptom));
    let dropped = has(&[
        "reset by peer",
        "closed unexpectedly",
        "broken pipe",
        "unexpected eof",
    ]);
    let hint = if has(&["hostname mismatch", "ip address mismatch"]) {
        "the broker's certificate does not name the URL's host: use a host name (or address) \
         its subjectAltName lists"
            .to_owned()
    } else if has(&["certificate verify failed"]) && !has(&["expired"]) {
        if ca_file {
            format!("is {CA_FILE} the CA that signed the broker's certificate?")
        } else {
            format!(
                "the system's trust store does not know the CA that signed the broker's \
                 certificate: set {CA_FILE} to it"
            )
        }
    } else if has(&[
        "wrong version number",
        "packet length too long",
        "record layer failure",
    ]) || (dropped && stage == Stage::Handshake)
    {
        format!("does port {port} speak TLS? RabbitMQ's TLS listener is usually on 5671, plain AMQP on 5672")
    } else if has(&["certificate required"])
        || (!client_cert && (dropped || has(&["alert handshake failure"])))
    {
        if client_cert {
            "the broker wants a client certificate it did not get".to_owned()
        } else {
            format!("does the broker require a client certificate? set {CERT_FILE} and {KEY_FILE}")
        }
    } else if dropped || has(&["unknown ca", "bad certificate", "alert handshake failure"]) {
        format!(
            "did the broker refuse the client certificate? is {CERT_FILE} signed by a CA in the \
             broker's ssl_options.cacertfile?"
        )
    } else {
        return String::new();
    };
    format!(" ({hint})")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory of its own for one test, deleted on drop.
    struct Dir(PathBuf);

    impl Dir {
        fn new(name: &str) -> Dir {
            let dir = std::env::temp_dir().join(format!("deskbridge-tls-{name}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("temp dir");
            Dir(dir)
        }

        fn file(&self, name: &str, text: &str) -> PathBuf {
            let path = self.0.join(name);
            std::fs::write(&path, text).expect("write");
            path
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A self-signed certificate valid until 2126 and its key, made for these tests only.
    const FIXTURE_CERT: &str = "-----BEGIN CERTIFICATE-----
MIIBpTCCAUugAwIBAgIUPKaHOdNKufkDhwMSpz0FhZYYZEEwCgYIKoZIzj0EAwIw
JzElMCMGA1UEAwwcZGVza2JyaWRnZSB1bml0LXRlc3QgZml4dHVyZTAgFw0yNjEx
MjEyMTA5MjVaGA8yMTI2MTAyODIxMDkyNVowJzElMCMGA1UEAwwcZGVza2JyaWRn
ZSB1bml0LXRlc3QgZml4dHVyZTBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABI2c
T2uv2l9F+NZD0Coku2NOdeNvv87nzkGqFYX/Yv8ADqKRpaFeE4mzMTaCQWbAd0hg
zTszjs97HmM9Q0ycBEOjUzBRMB0GA1UdDgQWBBT1sj/rykWotYeJRbn8F0iIOOne
1jAfBgNVHSMEGDAWgBT1sj/rykWotYeJRbn8F0iIOOne1jAPBgNVHRMBAf8EBTAD
AQH/MAoGCCqGSM49BAMCA0gAMEUCIEKdMwvJBB9tt1Lifa0dx8RaSq6Ft/1m9xUq
jpnwRuPyAiEA3zbjLXxF24/2lYAxltSrBI75utRrhidfBLUlfY5NvvA=
-----END CERTIFICATE-----
";
    const FIXTURE_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgtlCvnwf1FasL5V9F
KiEfcBfcQBTMgJ/xNLwyZZF+KhKhRANCAASNnE9rr9pfRfjWQ9AqJLtjTnXjb7/O
585BqhWF/2L/AA6ikaWhXhOJszE2gkFmwHdIYM07M47Pex5jPUNMnARD
-----END PRIVATE KEY-----
";
    /// A key of no certificate here.
    const OTHER_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgF67/+LDEPGPqqgiY
v14XbxweKgwfjqFpMDDdQMiFgiuhRANCAAT0+6qekQnaw+FIMPS/F1wcKVVCLOmI
Un78ayu7vLlrv5dBhJXD0AreReAwYCmRkx86uR3/URmBG5rpRzFXNLoo
-----END PRIVATE KEY-----
";

    #[test]
    fn a_ca_file_and_a_matching_pkcs8_client_key_load() {
        let dir = Dir::new("good");
        // Text around the blocks (as `openssl x509 -text` leaves it) is fine.
        let ca = dir.file("ca.pem", &format!("subject=CN = fixture\n{FIXTURE_CERT}"));
        let key = dir.file("client.key", &format!("\n{FIXTURE_KEY}"));
        connector(Some(&ca), Some((&ca, &key))).expect("a CA and a matching key load");
        connector(None, None).expect("the system's trust store loads");
    }

    /// (cert_file, key_file), as `connector` takes them.
    type Client<'a> = Option<(&'a Path, &'a Path)>;

    #[test]
    fn unusable_files_name_their_key_and_say_what_to_do() {
        let dir = Dir::new("files");
        let not_pem = dir.file("not.pem", "hello\n");
        let rsa_key = dir.file(
            "rsa.key",
            "-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n",
        );
        let encrypted = dir.file(
            "enc.key",
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n",
        );
        let missing = dir.0.join("missing.pem");
        let cert = dir.file("cert.pem", FIXTURE_CERT);
        let other_key = dir.file("other.key", OTHER_KEY);
        let cases: [(Option<&Path>, Client, &str, &str); 8] = [
            (Some(&missing), None, CA_FILE, "cannot read amqp.tls.ca_file"),
            (Some(&not_pem), None, CA_FILE, "holds no PEM certificate"),
            (
                None,
                Some((&not_pem, &rsa_key)),
                CERT_FILE,
                "holds no PEM certificate",
            ),
            (
                None,
                Some((&missing, &rsa_key)),
                CERT_FILE,
                "cannot read amqp.tls.cert_file",
            ),
            (
                Some(&missing),
                Some((&not_pem, &encrypted)),
                CA_FILE,
                "cannot read",
            ),
            (
                None,
                Some((&cert, &missing)),
                KEY_FILE,
                "cannot read amqp.tls.key_file",
            ),
            (None, Some((&cert, &rsa_key)), KEY_FILE, "needs PKCS#8"),
            (
                None,
                Some((&cert, &other_key)),
                KEY_FILE,
                "is not the private key of amqp.tls.cert_file",
            ),
        ];
        for (ca, client, key, says) in cases {
            let error = connector(ca, client).expect_err("refused");
            assert_eq!(error.key(), key, "{error}");
            assert!(error.to_string().contains(says), "{error}");
        }
        for (path, says) in [(&rsa_key, "PKCS#1/SEC1"), (&encrypted, "encrypted")] {
            let problem = key_format_problem(&std::fs::read(path).expect("read"));
            assert!(
                problem.contains(says) && problem.contains("openssl pkcs8"),
                "{problem}"
            );
        }
    }

    #[test]
    fn handshake_failures_point_at_the_setting_to_check() {
        let verify = "error:0A000086:SSL routines:tls_post_process_server_certificate:certificate verify \
                      failed:ssl/statem/statem_clnt.c:1889: (unable to get local issuer certificate)";
        use Stage::{FirstBytes, Handshake};
        let reset = "I/O error while writing socket: Connection reset by peer (os error 104)";
        let cases = [
            (verify, Handshake, true, false, "is amqp.tls.ca_file the CA"),
            (verify, Handshake, false, false, "system's trust store"),
            (
                "certificate verify failed (hostname mismatch)",
                Handshake,
                true,
                false,
                "subjectAltName",
            ),
            (
                "tlsv13 alert certificate required",
                FirstBytes,
                true,
                false,
                "set amqp.tls.cert_file",
            ),
            (
                "sslv3 alert handshake failure",
                Handshake,
                true,
                false,
                "require a client certificate",
            ),
            (
                "tlsv1 alert unknown ca",
                FirstBytes,
                true,
                true,
                "refuse the client certificate",
            ),
            (
                "wrong version number",
                Handshake,
                true,
                false,
                "does port 5672 speak TLS",
            ),
            (reset, Handshake, true, false, "does port 5672 speak TLS"),
            (
                reset,
                FirstBytes,
                true,
                false,
                "require a client certificate? set amqp.tls.cert_file",
            ),
            (
                "underlying socket closed unexpectedly",
                FirstBytes,
                true,
                true,
                "refuse the client certificate",
            ),
            (
                "certificate verify failed (certificate has expired)",
                Handshake,
                true,
                false,
                "",
            ),
            ("no route to host", Handshake, true, false, ""),
        ];
        for (message, stage, ca_file, client_cert, says) in cases {
            let hint = handshake_hint(message, stage, 5672, ca_file, client_cert);
            if says.is_empty() {
                assert_eq!(hint, "", "{message}");
            } else {
                assert!(hint.contains(says), "{message}: {hint}");
            }
        }
    }
}
