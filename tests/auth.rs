//! Identity and permissions (`auth.mode = "jwt"`): every refusal path, the happy paths, rights
//! per desk, refresh and expiry, origins and per-IP limits — real bridge, real browsers, real
//! broker.

mod common;

use std::time::Duration;

use common::browser::{handshake, ws_url};
use common::*;
use deskbridge::config::AuthMode;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "test-secret-for-deskbridge";
const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

use common::bridge::unix_now as now;

/// A bridge that verifies HS256 tokens signed with [`SECRET`].
fn jwt_config(test: &str) -> deskbridge::Config {
    common::bridge::jwt_test_config(test, SECRET)
}

/// Claims for `sub` expiring in `ttl` seconds, with these desk rights.
fn claims(sub: &str, ttl: i64, desks: Value) -> Value {
    json!({"sub": sub, "exp": now() as i64 + ttl, "desks": desks})
}

fn sign(claims: &Value, algorithm: Algorithm, key: &EncodingKey) -> String {
    jsonwebtoken::encode(&Header::new(algorithm), claims, key).expect("sign test token")
}

fn hs256(claims: &Value) -> String {
    sign(
        claims,
        Algorithm::HS256,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!("{FIXTURES}/{name}")).expect("test fixture")
}

/// An unsigned token, `alg: none`.
fn unsigned(claims: &Value) -> String {
    use base64::Engine as _;
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    format!("{}.{}.", b64(&json!({"alg": "none", "typ": "JWT"})), b64(claims))
}

fn with_token(bridge: &TestBridge, token: &str) -> String {
    format!("{}?token={token}", ws_url(bridge.addr))
}

/// Connects with `?token=` and reads the welcome.
async fn signed_in(bridge: &TestBridge, token: &str) -> Browser {
    let ws = handshake(with_token(bridge, token))
        .await
        .unwrap_or_else(|(status, body)| panic!("refused {status}: {body}"));
    Browser::from_stream(ws).await
}

/// A handshake request for `bridge`'s `/ws` sent by a page from `origin`.
fn from_origin(
    bridge: &TestBridge,
    origin: &str,
) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    let mut request = ws_url(bridge.addr).into_client_request().expect("request");
    request
        .headers_mut()
        .insert("Origin", origin.parse().expect("header value"));
    request
}

async fn refused(url: impl IntoClientRequest + Unpin) -> (u16, Value) {
    match handshake(url).await {
        Ok(_) => panic!("the handshake was accepted"),
        Err(refusal) => refusal,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_on_the_query_get_401_and_no_upgrade() {
    let mut config = jwt_config("badquery");
    config.auth.jwt.issuer = Some("https://idp.example".into());
    config.auth.jwt.audience = Some("deskbridge".into());
    let bridge = TestBridge::start_healthy(config).await;
    let good = json!({"sub": "alice", "exp": now() + 300, "iss": "https://idp.example", "aud": "deskbridge"});
    let with = |extra: Value| {
        let mut claims = good.clone();
        if let (Some(claims), Some(extra)) = (claims.as_object_mut(), extra.as_object()) {
            claims.extend(extra.clone());
        }
        claims
    };
    let without = |field: &str| {
        let mut claims = good.clone();
        if let Some(claims) = claims.as_object_mut() {
            claims.remove(field);
        }
        claims
    };
    let other_secret = EncodingKey::from_secret(b"not the bridge's secret");
    let cases = [
        ("missing", String::new()),
        ("malformed", "not-a-jwt".to_string()),
        ("bad_signature", sign(&good, Algorithm::HS256, &other_secret)),
        ("expired", hs256(&with(json!({"exp": now() - 10})))),
        ("not_yet_valid", hs256(&with(json!({"nbf": now() + 600})))),
        (
            "wrong_issuer",
            hs256(&with(json!({"iss": "https://evil.example"}))),
        ),
        ("wrong_issuer", hs256(&without("iss"))),
        ("wrong_audience", hs256(&with(json!({"aud": "someone-else"})))),
        ("wrong_audience", hs256(&without("aud"))),
        ("claims", hs256(&without("sub"))),
        ("algorithm", unsigned(&good)),
    ];
    for (reason, token) in &cases {
        let (status, body) = refused(with_token(&bridge, token)).await;
        assert_eq!(status, 401, "{reason}: {body}");
        assert_eq!(body["error"], "unauthorized", "{reason}: {body}");
        let message = body["message"].as_str().unwrap_or_default();
        assert!(!message.is_empty(), "{reason}: says why: {body}");
        assert!(
            token.is_empty() || !message.contains(token.as_str()),
            "{reason}: never echoes the token: {body}"
        );
    }
    for (reason, count) in [
        ("missing", 1),
        ("malformed", 1),
        ("bad_signature", 1),
        ("expired", 1),
        ("not_yet_valid", 1),
        ("wrong_issuer", 2),
        ("wrong_audience", 2),
        ("claims", 1),
        ("algorithm", 1),
    ] {
        bridge
            .wait_metric(&format!(
                "deskbridge_auth_failures_total{{reason=\"{reason}\"}} {count}"
            ))
            .await;
    }
    let mut alice = signed_in(&bridge, &hs256(&good)).await;
    assert_eq!(alice.welcome["user"], "alice");
    assert_eq!(alice.welcome["expires_at"], good["exp"]);
    alice.assert_quiet().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_keys_verify_rs256_and_es256_and_refuse_an_hmac_signed_with_them() {
    for (private, public, algorithm) in [
        ("rsa_private.pem", "rsa_public.pem", Algorithm::RS256),
        ("ec_private.pem", "ec_public.pem", Algorithm::ES256),
    ] {
        let mut config = test_config("publickey");
        config.auth.mode = AuthMode::Jwt;
        config.auth.jwt.public_key_file = Some(format!("{FIXTURES}/{public}").into());
        let bridge = TestBridge::start_healthy(config).await;
        let claims = claims("bob", 300, json!({"A": ["subscribe"]}));
        let key = match algorithm {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(&fixture(private)),
            _ => EncodingKey::from_ec_pem(&fixture(private)),
        }
        .expect("test private key");
        let mut bob = signed_in(&bridge, &sign(&claims, algorithm, &key)).await;
        assert_eq!(bob.welcome["user"], "bob", "{algorithm:?}");
        bob.subscribe(&["A"]).await;

        // The classic confusion: an HS256 token whose "secret" is the bridge's public key.
        let confused = sign(
            &claims,
            Algorithm::HS256,
            &EncodingKey::from_secret(&fixture(public)),
        );
        let (status, body) = refused(with_token(&bridge, &confused)).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (401, Some("unauthorized")),
            "{body}"
        );
        let (status, _) = refused(with_token(&bridge, &unsigned(&claims))).await;
        assert_eq!(status, 401, "alg none with a public key");
        bridge
            .wait_metric("deskbridge_auth_failures_total{reason=\"algorithm\"} 2")
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_auth_frame_opens_a_session_and_nothing_else_does() {
    let mut config = jwt_config("authframe");
    config.auth.timeout_ms = 500;
    let bridge = TestBridge::start_healthy(config).await;
    let url = ws_url(bridge.addr);

    let mut carol = Browser::unauthenticated(handshake(url.as_str()).await.expect("upgrade"));
    carol.send(json!({"op": "ping"})).await;
    assert_eq!(
        carol.recv().await,
        json!({"op": "pong"}),
        "ping works before auth"
    );
    carol.send(json!({"op": "subscribe", "desks": ["A"]})).await;
    assert_eq!(carol.recv().await["code"], "unauthenticated");
    let token = hs256(&claims("carol", 300, json!({"*": ["subscribe"]})));
    carol.send(json!({"op": "auth", "token": token})).await;
    let welcome = carol.welcomed().await;
    assert_eq!(welcome["user"], "carol");
    carol.subscribe(&["A", "B"]).await;

    let mut forged = Browser::unauthenticated(handshake(url.as_str()).await.expect("upgrade"));
    forged.send_text("{not json").await;
    assert_eq!(
        forged.recv().await["code"],
        "unauthenticated",
        "anything but auth and ping"
    );
    // An algorithm name long enough that quoting it would overflow a close frame's reason.
    let long_alg = {
        use base64::Engine as _;
        let header = json!({"alg": "X".repeat(300)}).to_string();
        format!(
            "{}.e30.c2ln",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(header)
        )
    };
    forged.send(json!({"op": "auth", "token": long_alg})).await;
    assert_eq!(forged.recv().await["code"], "unauthorized");
    let close = forged.closed().await.expect("a valid close frame");
    assert_eq!(close.code, CloseCode::from(4401));

    let mut silent = Browser::unauthenticated(handshake(url.as_str()).await.expect("upgrade"));
    assert_eq!(
        silent.recv().await["code"],
        "unauthorized",
        "no auth frame in time"
    );
    assert_eq!(silent.closed().await.map(|c| c.code), Some(CloseCode::from(4401)));
    bridge
        .wait_metric("deskbridge_auth_failures_total{reason=\"timeout\"} 1")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_and_refresh_answers_echo_their_ref() {
    let bridge = TestBridge::start_healthy(jwt_config("authref")).await;
    let url = ws_url(bridge.addr);

    let mut gina = Browser::unauthenticated(handshake(url.as_str()).await.expect("upgrade"));
    gina.send(json!({"op": "subscribe", "desks": ["A"], "ref": "x1"}))
        .await;
    let early = gina.recv().await;
    assert_eq!(
        (early["code"].as_str(), early["ref"].as_str()),
        (Some("unauthenticated"), Some("x1")),
        "{early}"
    );
    let token = hs256(&claims("gina", 300, json!({"*": ["subscribe"]})));
    gina.send(json!({"op": "auth", "token": token, "ref": "a1"}))
        .await;
    let welcome = gina.welcomed().await;
    assert_eq!(
        (welcome["user"].as_str(), welcome["ref"].as_str()),
        (Some("gina"), Some("a1")),
        "{welcome}"
    );

    gina.send(json!({"op": "auth", "token": token, "ref": "a2"}))
        .await;
    let again = gina.recv().await;
    assert_eq!(
        (again["code"].as_str(), again["ref"].as_str()),
        (Some("bad_request"), Some("a2")),
        "{again}"
    );
    gina.send(json!({"op": "refresh", "token": "not.a.jwt", "ref": "r0"}))
        .await;
    let bad = gina.recv().await;
    assert_eq!(
        (bad["op"].as_str(), bad["code"].as_str(), bad["ref"].as_str()),
        (Some("error"), Some("unauthorized"), Some("r0")),
        "{bad}"
    );
    let other = hs256(&claims("mallory", 600, json!({"*": ["subscribe"]})));
    gina.send(json!({"op": "refresh", "token": other, "ref": "r9"}))
        .await;
    let forbidden = gina.recv().await;
    assert_eq!(
        (forbidden["code"].as_str(), forbidden["ref"].as_str()),
        (Some("forbidden"), Some("r9")),
        "{forbidden}"
    );
    let newer = claims("gina", 600, json!({"*": ["subscribe"]}));
    gina.send(json!({"op": "refresh", "token": hs256(&newer), "ref": "r1"}))
        .await;
    assert_eq!(
        gina.recv().await,
        json!({"op": "refreshed", "expires_at": newer["exp"], "ref": "r1"})
    );
    gina.assert_quiet().await;

    let on_query = signed_in(&bridge, &token).await;
    assert_eq!(
        on_query.welcome.get("ref"),
        None,
        "a welcome that answers no auth op has no ref"
    );

    let mut forged = Browser::unauthenticated(handshake(url.as_str()).await.expect("upgrade"));
    forged
        .send(json!({"op": "auth", "token": "not.a.jwt", "ref": "a3"}))
        .await;
    let refused = forged.recv().await;
    assert_eq!(
        (refused["code"].as_str(), refused["ref"].as_str()),
        (Some("unauthorized"), Some("a3")),
        "{refused}"
    );
    assert_eq!(forged.closed().await.map(|c| c.code), Some(CloseCode::from(4401)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rights_are_per_desk_and_a_forbidden_subscribe_changes_nothing() {
    let bridge = TestBridge::start_healthy(jwt_config("rights")).await;
    let exchange = bridge.config.amqp.inbound_exchange.clone();
    let listener = Listener::bind(&bridge.config.amqp.outbound_exchange, &["B_new_example"]);
    let token = hs256(&claims(
        "dave",
        300,
        json!({"A": ["subscribe"], "B": ["publish"]}),
    ));
    let mut dave = signed_in(&bridge, &token).await;

    dave.send(json!({"op": "subscribe", "desks": ["A", "B"]})).await;
    let error = dave.recv().await;
    assert_eq!(error["code"], "forbidden", "{error}");
    let mut desktop = Desktop::connect();
    desktop.publish_json(&exchange, "A_new_example", &json!({"n": 1}));
    // Not subscribed to A: the refused request changed nothing, so nobody gets the event.
    bridge
        .wait_metric("deskbridge_messages_in_total{direction=\"desktop_to_web\"} 1")
        .await;
    bridge
        .wait_metric("deskbridge_messages_out_total{direction=\"desktop_to_web\"} 0")
        .await;
    dave.assert_quiet().await;
    dave.subscribe(&["A"]).await;
    desktop.publish_json(&exchange, "A_new_example", &json!({"n": 2}));
    assert_eq!(dave.recv().await["data"], json!({"n": 2}));

    let error = dave.publish("A", "new_example", json!({}), "p1").await;
    assert_eq!(
        (error["code"].as_str(), error["ref"].as_str()),
        (Some("forbidden"), Some("p1"))
    );
    let ack = dave.publish("B", "new_example", json!({"px": 1}), "p2").await;
    assert_eq!(ack["op"], "ack", "{ack}");
    let delivery = listener.next();
    let headers = delivery.properties.headers().clone().unwrap_or_default();
    assert_eq!(
        headers.get("x-user"),
        Some(&amiquip::AmqpValue::LongString("dave".into())),
        "desktop apps see who published"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_keeps_the_user_replaces_rights_and_leaves_what_is_no_longer_allowed() {
    let bridge = TestBridge::start_healthy(jwt_config("refresh")).await;
    let exchange = bridge.config.amqp.inbound_exchange.clone();
    // Less than a minute left: the warning comes at once.
    let token = hs256(&claims("erin", 50, json!({"*": ["subscribe"]})));
    let mut erin = signed_in(&bridge, &token).await;
    let expiring = erin.recv().await;
    assert_eq!(expiring["op"], "expiring", "{expiring}");
    assert_eq!(expiring["expires_at"], erin.welcome["expires_at"]);
    erin.subscribe(&["A", "B"]).await;

    let mallory = hs256(&claims("mallory", 600, json!({"*": ["subscribe"]})));
    erin.send(json!({"op": "refresh", "token": mallory})).await;
    assert_eq!(
        erin.recv().await["code"],
        "forbidden",
        "a refresh may not change the user"
    );

    let narrower = claims("erin", 600, json!({"B": ["subscribe"]}));
    erin.send(json!({"op": "refresh", "token": hs256(&narrower)}))
        .await;
    assert_eq!(
        erin.recv().await,
        json!({"op": "refreshed", "expires_at": narrower["exp"]})
    );
    assert_eq!(
        erin.recv().await,
        json!({"op": "unsubscribed", "desks": ["A"], "reason": "permission"})
    );
    let mut desktop = Desktop::connect();
    desktop.publish_json(&exchange, "A_new_example", &json!({"desk": "A"}));
    desktop.publish_json(&exchange, "B_new_example", &json!({"desk": "B"}));
    assert_eq!(
        erin.recv().await["data"],
        json!({"desk": "B"}),
        "A is gone, B stays"
    );
    bridge
        .wait_metric("deskbridge_auth_failures_total{reason=\"other_user\"} 1")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_expiry_the_session_closes_with_4401_and_no_event_follows() {
    let bridge = TestBridge::start_healthy(jwt_config("expiry")).await;
    let exchange = bridge.config.amqp.inbound_exchange.clone();
    let token_claims = claims("frank", 2, json!({"A": ["subscribe"]}));
    let exp = token_claims["exp"].as_u64().expect("exp");
    let mut frank = signed_in(&bridge, &hs256(&token_claims)).await;
    assert_eq!(frank.recv().await["op"], "expiring");
    frank.subscribe(&["A"]).await;

    // A desktop app publishes throughout, past the expiry.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publishing = {
        let stop = std::sync::Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut desktop = Desktop::connect();
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && n < 2_000 {
                desktop.publish_json(&exchange, "A_new_example", &json!({"n": n}));
                n += 1;
            }
        })
    };
    let mut events = 0;
    let error = loop {
        let frame = frank.recv().await;
        match frame["op"].as_str() {
            Some("event") => events += 1,
            _ => break frame,
        }
    };
    assert_eq!(error["code"], "token_expired", "{error}");
    let at = now();
    assert!(at >= exp, "closed at {at}, before exp {exp}");
    match frank.next_frame().await {
        Some(Message::Close(Some(close))) => assert_eq!(close.code, CloseCode::from(4401)),
        other => panic!("the close must follow the error directly, got {other:?}"),
    }
    assert!(events > 0, "events flowed before the expiry");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = tokio::task::spawn_blocking(move || publishing.join()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_site_pages_are_refused_and_listed_origins_allowed() {
    let bridge = TestBridge::start_healthy(test_config("origins")).await;
    let request = |origin: &str| from_origin(&bridge, origin);
    let (status, body) = refused(request("https://evil.example")).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("origin_not_allowed")),
        "{body}"
    );
    let own = format!("http://{}", bridge.addr);
    Browser::from_stream(handshake(request(&own)).await.expect("same origin"))
        .await
        .assert_quiet()
        .await;
    Browser::connect(&bridge).await.assert_quiet().await; // no Origin: not a browser
    bridge
        .wait_metric("deskbridge_handshakes_refused_total{reason=\"origin\"} 1")
        .await;

    let mut config = test_config("origins-listed");
    config.ws.allowed_origins = vec!["https://desk.example.com".into()];
    let listed = TestBridge::start_healthy(config).await;
    let request = |origin: &str| from_origin(&listed, origin);
    assert!(handshake(request("https://desk.example.com")).await.is_ok());
    assert_eq!(refused(request(&format!("http://{}", listed.addr))).await.0, 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_may_hold_only_its_share_of_sessions() {
    let mut config = test_config("perip");
    config.ws.max_sessions_per_ip = 2;
    let bridge = TestBridge::start_healthy(config).await;
    let first = Browser::connect(&bridge).await;
    let _second = Browser::connect(&bridge).await;
    let (status, body) = refused(ws_url(bridge.addr)).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (429, Some("too_many_sessions")),
        "{body}"
    );
    drop(first);
    // The place comes back once the bridge has seen the first session end.
    poll(DEADLINE, Duration::from_millis(20), || async {
        match handshake(ws_url(bridge.addr)).await {
            Ok(_) => Ok(()),
            Err(refusal) => Err(format!("still refused: {refusal:?}")),
        }
    })
    .await;
}

#[test]
fn an_open_bridge_on_a_public_address_refuses_to_start() {
    let mut config = test_config("anonymous");
    config.bind = "0.0.0.0:0".into();
    let file = common::process::ConfigFile::write(&common::process::config_toml(&config));
    let output = common::process::bridge_command(env!("CARGO_BIN_EXE_deskbridge"), file.path())
        .output()
        .expect("run deskbridge");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("auth.mode"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_command_mints_what_the_bridge_accepts() {
    let bridge = TestBridge::start_healthy(jwt_config("mint")).await;
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_deskbridge"))
        .args([
            "token",
            "--sub",
            "grace",
            "--desk",
            "A:subscribe,publish",
            "--ttl",
            "120",
        ])
        .env("DESKBRIDGE_JWT_SECRET", SECRET)
        .env_remove("DESKBRIDGE_BIND")
        .output()
        .expect("run deskbridge token");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let token = String::from_utf8_lossy(&output.stdout).trim().to_string();
    let mut grace = signed_in(&bridge, &token).await;
    assert_eq!(grace.welcome["user"], "grace");
    let expires_at = grace.welcome["expires_at"].as_u64().unwrap_or_default();
    assert!((now() + 100..=now() + 121).contains(&expires_at), "{expires_at}");
    grace.subscribe(&["A"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_desktop_message_for_a_user_reaches_their_sessions_that_may_read_the_desk() {
    let bridge = TestBridge::start_healthy(jwt_config("touser")).await;
    let exchange = bridge.config.amqp.inbound_exchange.clone();
    let mut laptop = signed_in(
        &bridge,
        &hs256(&claims("heidi", 300, json!({"A": ["subscribe"]}))),
    )
    .await;
    let mut phone = signed_in(
        &bridge,
        &hs256(&claims("heidi", 300, json!({"*": ["subscribe"]}))),
    )
    .await;
    let mut kiosk = signed_in(
        &bridge,
        &hs256(&claims("heidi", 300, json!({"B": ["subscribe"]}))),
    )
    .await;
    let mut ivan = signed_in(&bridge, &hs256(&claims("ivan", 300, json!({"*": ["subscribe"]})))).await;
    let mut headers = amiquip::FieldTable::new();
    headers.insert("x-to-user".into(), amiquip::AmqpValue::LongString("heidi".into()));
    let properties = amiquip::AmqpProperties::default().with_headers(headers);
    Desktop::connect().publish_with(&exchange, "A_new_example", br#"{"for":"heidi"}"#, properties);
    for heidi in [&mut laptop, &mut phone] {
        assert_eq!(heidi.recv().await["data"], json!({"for": "heidi"}));
    }
    bridge
        .wait_metric("deskbridge_messages_out_total{direction=\"desktop_to_web\"} 2")
        .await;
    kiosk.assert_quiet().await; // heidi, but this token may not read desk A
    ivan.assert_quiet().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_needs_the_request_right_and_publish_does_not_grant_it() {
    let bridge = TestBridge::start_healthy(jwt_config("reqright")).await;
    let _pricing =
        common::desktop::Responder::start(&bridge.config.amqp.outbound_exchange, &["A_new_example"], |_| {
            br#"{"price":1}"#.to_vec()
        });
    let request = |reference: &str| json!({"op": "request", "desk": "A", "event": "new_example", "data": {}, "ref": reference});
    let publisher = hs256(&claims("pat", 300, json!({"A": ["publish"]})));
    let mut pat = signed_in(&bridge, &publisher).await;
    pat.send(request("q1")).await;
    let error = pat.recv().await;
    assert_eq!(
        (error["code"].as_str(), error["ref"].as_str()),
        (Some("forbidden"), Some("q1")),
        "the publish right does not let a browser ask desktop apps: {error}"
    );

    let asker = hs256(&claims("quinn", 300, json!({"A": ["request"]})));
    let mut quinn = signed_in(&bridge, &asker).await;
    quinn.send(request("q2")).await;
    let reply = quinn.recv().await;
    assert_eq!(
        (reply["op"].as_str(), reply["ref"].as_str()),
        (Some("reply"), Some("q2")),
        "the request right alone is enough: {reply}"
    );
    bridge
        .wait_metric("deskbridge_requests_total{outcome=\"answered\"} 1")
        .await;
    pat.assert_quiet().await;
}

/// A validly signed HS256 token whose header carries these fields besides `alg`.
fn hs256_with_header(extra: Value, claims: &Value) -> String {
    use base64::Engine as _;
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let mut header = json!({"alg": "HS256", "typ": "JWT"});
    if let (Some(header), Some(extra)) = (header.as_object_mut(), extra.as_object()) {
        header.extend(extra.clone());
    }
    let message = format!("{}.{}", b64(&header), b64(claims));
    let key = EncodingKey::from_secret(SECRET.as_bytes());
    let signature =
        jsonwebtoken::crypto::sign(message.as_bytes(), &key, Algorithm::HS256).expect("sign test token");
    format!("{message}.{signature}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_with_critical_header_extensions_is_refused() {
    let bridge = TestBridge::start_healthy(jwt_config("crit")).await;
    let rights = claims("rita", 300, json!({"*": ["subscribe"]}));
    let plain = hs256_with_header(json!({}), &rights);
    let _rita = signed_in(&bridge, &plain).await;

    // RFC 7515 §4.1.11: a recipient that does not understand an extension listed in `crit`
    // must refuse the token, however well it is signed.
    let critical = hs256_with_header(json!({"crit": ["b64"], "b64": false}), &rights);
    let mut mallory = Browser::unauthenticated(handshake(ws_url(bridge.addr)).await.expect("upgrade"));
    mallory.send(json!({"op": "auth", "token": critical})).await;
    let error = mallory.recv().await;
    assert_eq!(error["code"], "unauthorized", "{error}");
    assert_eq!(
        mallory.closed().await.map(|c| c.code),
        Some(CloseCode::from(4401))
    );
    bridge
        .wait_metric("deskbridge_auth_failures_total{reason=\"critical\"} 1")
        .await;
}
