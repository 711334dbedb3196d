//! What cannot run on this machine — the compose file and the Kubernetes manifests of deploy/
//! (docs/deploy.md) — is parsed and checked here: every YAML document parses, the config file
//! they mount is a valid deskbridge configuration, and the facts that hold them together agree
//! (probe paths and port, grace periods above the shutdown bound, one image name, the Secret's
//! keys, the ingress host among the allowed origins).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use deskbridge::auth::Verifier;
use deskbridge::config::{AuthMode, Config, Overrides, Secret};
use serde::Deserialize as _;
use serde_json::Value;

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy");
/// Where the image documents a mounted config file (Dockerfile) and the deployments mount it.
const CONFIG_PATH: &str = "/etc/deskbridge/deskbridge.toml";
/// The image both deployments run: tagged with this crate's version.
const IMAGE: &str = concat!("registry.example.com/deskbridge:", env!("CARGO_PKG_VERSION"));

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|error| panic!("read {}: {error}", path.display()))
}

/// Every document of a YAML file, merge keys (`<<:`) applied, as JSON values.
fn documents(path: &Path) -> Vec<Value> {
    let text = read(path);
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|document| {
            let mut value = serde_yaml_ng::Value::deserialize(document)
                .unwrap_or_else(|error| panic!("{} is not valid YAML: {error}", path.display()));
            value
                .apply_merge()
                .unwrap_or_else(|error| panic!("{}: a merge key: {error}", path.display()));
            serde_json::to_value(value)
                .unwrap_or_else(|error| panic!("{}: not JSON-like: {error}", path.display()))
        })
        .collect()
}

/// Every `.yaml` file under deploy/.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|error| panic!("read {}: {error}", dir.display())) {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            files.extend(yaml_files(&path));
        } else if path.extension().is_some_and(|ext| ext == "yaml" || ext == "yml") {
            files.push(path);
        }
    }
    files.sort();
    files
}

/// deploy/deskbridge.toml loaded as the deployments run it: the secret from the environment.
fn deployed_config() -> Config {
    let overrides = Overrides {
        jwt_secret: Some(Secret::new("a secret from the Secret".into())),
        ..Overrides::default()
    };
    Config::load(Some(&Path::new(DEPLOY).join("deskbridge.toml")), &overrides)
        .unwrap_or_else(|error| panic!("deploy/deskbridge.toml: {error}"))
}

/// The one Kubernetes object of `kind` in deploy/k8s.
fn k8s(kind: &str) -> Value {
    let objects: Vec<Value> = yaml_files(&Path::new(DEPLOY).join("k8s"))
        .iter()
        .flat_map(|path| documents(path))
        .filter(|object| object["kind"] == kind)
        .collect();
    assert_eq!(objects.len(), 1, "one {kind} in deploy/k8s: {objects:?}");
    objects.into_iter().next().expect("checked above")
}

/// `15s`, `1m30s`, `500ms` as milliseconds (compose's durations).
fn duration_ms(text: &str) -> u64 {
    let mut total = 0;
    let mut number = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let n: u64 = number
            .parse()
            .unwrap_or_else(|_| panic!("`{text}` is not a duration"));
        number.clear();
        total += match (c, chars.peek()) {
            ('m', Some('s')) => {
                chars.next();
                n
            }
            ('h', _) => n * 3_600_000,
            ('m', _) => n * 60_000,
            ('s', _) => n * 1_000,
            _ => panic!("`{text}`: unknown unit {c}"),
        };
    }
    assert!(number.is_empty(), "`{text}` ends without a unit");
    total
}

fn port_of(bind: &str) -> u64 {
    bind.rsplit(':')
        .next()
        .and_then(|port| port.parse().ok())
        .unwrap_or_else(|| panic!("bind `{bind}` has a port"))
}

#[test]
fn every_yaml_file_of_deploy_parses() {
    let files = yaml_files(Path::new(DEPLOY));
    assert!(files.len() >= 6, "compose.yaml and the k8s manifests: {files:?}");
    for file in &files {
        let documents = documents(file);
        assert!(!documents.is_empty(), "{} holds a document", file.display());
        if file.starts_with(Path::new(DEPLOY).join("k8s")) {
            for object in &documents {
                for field in ["apiVersion", "kind"] {
                    assert!(
                        object[field].is_string(),
                        "{}: every object has {field}",
                        file.display()
                    );
                }
                assert!(
                    object["metadata"]["name"].is_string(),
                    "{}: every object has a name",
                    file.display()
                );
            }
        }
    }
}

#[test]
fn the_deployed_config_is_a_valid_deskbridge_config_with_jwt_history_and_proxy_limits() {
    let config = deployed_config();
    assert_eq!(config.auth.mode, AuthMode::Jwt);
    Verifier::from_config(&config.auth).expect("the token secret from the environment is usable");
    assert!(
        config.history.enabled,
        "history on: browsers resume on another instance"
    );
    assert!(
        config.ws.max_sessions_per_ip >= config.ws.max_sessions,
        "behind a load balancer every browser shares its address: ws.max_sessions_per_ip ({}) must \
         cover ws.max_sessions ({})",
        config.ws.max_sessions_per_ip,
        config.ws.max_sessions
    );
    assert!(
        !config.ws.allowed_origins.is_empty(),
        "the site's origin is listed"
    );
    let dockerfile = read(&Path::new(env!("CARGO_MANIFEST_DIR")).join("Dockerfile"));
    assert!(
        dockerfile.contains(CONFIG_PATH) && dockerfile.contains("DESKBRIDGE_CONFIG"),
        "the Dockerfile documents the config path {CONFIG_PATH} and DESKBRIDGE_CONFIG"
    );
}

#[test]
fn compose_runs_two_instances_of_the_image_behind_a_websocket_load_balancer() {
    let config = deployed_config();
    let compose = documents(&Path::new(DEPLOY).join("compose.yaml")).remove(0);
    let services = compose["services"].as_object().expect("compose services");
    let bridges: Vec<(&String, &Value)> = services
        .iter()
        .filter(|(_, service)| service["image"] == IMAGE)
        .collect();
    assert_eq!(
        bridges.len(),
        2,
        "two deskbridge instances of {IMAGE}: {services:?}"
    );
    assert!(services.contains_key("rabbitmq"), "RabbitMQ");
    for (name, service) in &bridges {
        assert_eq!(service["environment"]["DESKBRIDGE_CONFIG"], CONFIG_PATH, "{name}");
        let mounts: Vec<&str> = service["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert!(
            mounts.contains(&"./deskbridge.toml:/etc/deskbridge/deskbridge.toml:ro"),
            "{name} mounts deploy/deskbridge.toml at {CONFIG_PATH}: {mounts:?}"
        );
        for secret in ["AMQP_URL", "DESKBRIDGE_JWT_SECRET"] {
            assert!(service["environment"][secret].is_string(), "{name} sets {secret}");
        }
        let grace = duration_ms(service["stop_grace_period"].as_str().expect("stop_grace_period"));
        assert!(
            grace > config.shutdown_timeout_ms,
            "{name}: stop_grace_period {grace} ms must exceed shutdown_timeout_ms {}",
            config.shutdown_timeout_ms
        );
        let test: Vec<&str> = service["healthcheck"]["test"]
            .as_array()
            .expect("a healthcheck")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(
            test,
            ["CMD", "/usr/local/bin/deskbridge", "health", "--path", "/health"],
            "{name}: ready once both links are up"
        );
    }

    // The balancer's upstream is exactly the two instances, on the bridge's port, with upgrades.
    let nginx = read(&Path::new(DEPLOY).join("nginx.conf"));
    let upstream = nginx
        .split_once("upstream ")
        .and_then(|(_, rest)| rest.split_once('}'))
        .map(|(block, _)| block)
        .expect("an upstream block in nginx.conf");
    let upstreams: BTreeSet<String> = upstream
        .lines()
        .filter_map(|line| line.trim().strip_prefix("server "))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    let port = port_of(&config.bind);
    let expected: BTreeSet<String> = bridges.iter().map(|(name, _)| format!("{name}:{port}")).collect();
    assert_eq!(upstreams, expected, "nginx balances over both instances");
    for header in ["proxy_set_header Upgrade $http_upgrade", "proxy_http_version 1.1"] {
        assert!(
            nginx.contains(header),
            "nginx passes WebSocket upgrades: {header}"
        );
    }
    let balancer = services
        .values()
        .find(|service| service["volumes"].to_string().contains("nginx.conf"))
        .expect("a load balancer mounting nginx.conf");
    for (name, _) in &bridges {
        assert_eq!(
            balancer["depends_on"][name.as_str()]["condition"],
            "service_healthy",
            "the balancer waits for {name}"
        );
    }
}

#[test]
fn the_kubernetes_deployment_probes_health_outlasts_the_shutdown_and_takes_its_secrets_from_a_secret() {
    let config = deployed_config();
    let deployment = k8s("Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    let containers = pod["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1);
    let container = &containers[0];
    assert_eq!(container["image"], IMAGE);

    let port = container["ports"][0].clone();
    assert_eq!(port["containerPort"].as_u64(), Some(port_of(&config.bind)));
    for (probe, path) in [("readinessProbe", "/health"), ("livenessProbe", "/health/live")] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(get["port"], port["name"], "{probe} on the bridge's port");
    }

    let grace_ms = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("a grace period")
        * 1000;
    let pre_stop_ms = match container["lifecycle"]["preStop"]["exec"]["command"].as_array() {
        Some(command) => {
            assert_eq!(command[0], "sleep", "preStop only waits");
            command[1]
                .as_str()
                .and_then(|s| s.parse::<u64>().ok())
                .expect("sleep seconds")
                * 1000
        }
        None => 0,
    };
    assert!(
        grace_ms > pre_stop_ms + config.shutdown_timeout_ms,
        "terminationGracePeriodSeconds ({grace_ms} ms) must exceed preStop ({pre_stop_ms} ms) + \
         shutdown_timeout_ms ({})",
        config.shutdown_timeout_ms
    );
    let strategy = &deployment["spec"]["strategy"]["rollingUpdate"];
    assert_eq!(
        strategy["maxUnavailable"], 0,
        "a new pod is ready before an old one stops"
    );

    // Configuration: the ConfigMap is deploy/deskbridge.toml, mounted where DESKBRIDGE_CONFIG says.
    let env = container["env"].as_array().expect("env");
    let var = |name: &str| {
        env.iter()
            .find(|var| var["name"] == name)
            .unwrap_or_else(|| panic!("env {name}"))
            .clone()
    };
    assert_eq!(var("DESKBRIDGE_CONFIG")["value"], CONFIG_PATH);
    let mount = &container["volumeMounts"][0];
    assert_eq!(
        Path::new(mount["mountPath"].as_str().expect("mountPath")).join("deskbridge.toml"),
        Path::new(CONFIG_PATH)
    );
    let volume = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|volume| volume["name"] == mount["name"])
        .expect("the mounted volume")
        .clone();
    let config_map = k8s("ConfigMap");
    assert_eq!(volume["configMap"]["name"], config_map["metadata"]["name"]);
    assert_eq!(
        config_map["data"]["deskbridge.toml"].as_str(),
        Some(read(&Path::new(DEPLOY).join("deskbridge.toml")).as_str()),
        "the ConfigMap holds deploy/deskbridge.toml as it is"
    );

    // Secrets: both from keys of the Secret.
    let secret = k8s("Secret");
    for name in ["AMQP_URL", "DESKBRIDGE_JWT_SECRET"] {
        let reference = &var(name)["valueFrom"]["secretKeyRef"];
        assert_eq!(
            reference["name"], secret["metadata"]["name"],
            "{name} from the Secret"
        );
        let key = reference["key"].as_str().expect("a key");
        assert!(
            secret["stringData"][key].is_string(),
            "the Secret has {key} for {name}"
        );
    }

    // The PodDisruptionBudget and the Service select the Deployment's pods.
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    let pdb = k8s("PodDisruptionBudget");
    assert_eq!(&pdb["spec"]["selector"]["matchLabels"], labels);
    assert!(
        pdb["spec"]["maxUnavailable"] == 1 || pdb["spec"]["minAvailable"].is_u64(),
        "a budget: {pdb}"
    );
    let service = k8s("Service");
    assert_eq!(&service["spec"]["selector"], labels);
    assert_eq!(service["spec"]["ports"][0]["targetPort"], port["name"]);
}

#[test]
fn the_ingress_host_is_an_allowed_origin_and_routes_the_websocket_to_the_service() {
    let config = deployed_config();
    let ingress = k8s("Ingress");
    let rule = &ingress["spec"]["rules"][0];
    let host = rule["host"].as_str().expect("a host");
    let origin = format!("https://{host}");
    assert!(
        config.ws.allowed_origins.contains(&origin),
        "pages of {origin} may open a WebSocket: {:?}",
        config.ws.allowed_origins
    );
    let path = &rule["http"]["paths"][0];
    assert_eq!(path["path"], "/ws");
    assert_eq!(
        path["backend"]["service"]["name"],
        k8s("Service")["metadata"]["name"]
    );
    let timeout: u64 = ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-read-timeout"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("a proxy read timeout");
    assert!(
        timeout * 1000 > config.ws.heartbeat_interval_ms,
        "the ingress keeps an idle WebSocket open between heartbeats"
    );
}

#[test]
fn durations_as_compose_writes_them() {
    for (text, ms) in [
        ("15s", 15_000),
        ("1m30s", 90_000),
        ("500ms", 500),
        ("1h", 3_600_000),
    ] {
        assert_eq!(duration_ms(text), ms, "{text}");
    }
}

#[test]
fn docs_deploy_md_shows_each_deploy_file_as_it_is() {
    let docs = read(&Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/deploy.md"));
    let mut files = yaml_files(Path::new(DEPLOY));
    files.push(Path::new(DEPLOY).join("deskbridge.toml"));
    files.push(Path::new(DEPLOY).join("nginx.conf"));
    for file in files {
        let text = read(&file);
        assert!(
            docs.contains(text.trim_end()),
            "docs/deploy.md shows {} as it is now: copy the file into its code block",
            file.display()
        );
    }
}
