//! Issue 18: the manifests in `examples/kubernetes/` parse, the `ConfigMap`'s
//! `gateway.toml` passes the real configuration parser, and the `Deployment`, `Service`s
//! and `PodDisruptionBudget` agree with it: container ports are the listeners' ports, probes
//! hit `/healthz` and `/readyz` on the admin port, every file the config names lies in a
//! mounted volume that provides it, the Redis URL names the Redis Service, the pods run
//! as non-root with resources set, and the grace period covers the drain. (No cluster
//! runs here: `kubectl apply --dry-run=server` and a real rollout were not exercised.)

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/kubernetes")
}

/// Every document of every manifest, by `kind/name`.
fn manifests() -> BTreeMap<String, Value> {
    let mut objects = BTreeMap::new();
    let kustomization: Value =
        serde_norway::from_str(&std::fs::read_to_string(dir().join("kustomization.yaml")).unwrap())
            .unwrap();
    let files: Vec<String> = kustomization["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    let mut on_disk: Vec<String> = std::fs::read_dir(dir())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| {
            Path::new(name)
                .extension()
                .is_some_and(|ext| ext.eq_ignore_ascii_case("yaml"))
                && name != "kustomization.yaml"
        })
        .collect();
    on_disk.sort();
    let mut listed = files.clone();
    listed.sort();
    assert_eq!(listed, on_disk, "kustomization.yaml lists every manifest");
    for file in files {
        let text = std::fs::read_to_string(dir().join(&file)).unwrap();
        for document in serde_norway::Deserializer::from_str(&text) {
            let value = Value::deserialize(document)
                .unwrap_or_else(|err| panic!("{file}: not valid YAML: {err}"));
            let kind = value["kind"]
                .as_str()
                .unwrap_or_else(|| panic!("{file}: no kind"));
            let name = value["metadata"]["name"].as_str().unwrap();
            assert!(
                value["apiVersion"].is_string(),
                "{file}: {kind} without apiVersion"
            );
            objects.insert(format!("{kind}/{name}"), value);
        }
    }
    objects
}

fn port_of(addr: &std::net::SocketAddr) -> u64 {
    u64::from(addr.port())
}

/// The container port named `name` (a probe's or Service's `targetPort` may be a name).
fn container_port(container: &Value, port: &Value) -> u64 {
    if let Some(number) = port.as_u64() {
        return number;
    }
    let name = port.as_str().unwrap();
    container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no container port named {name}"))["containerPort"]
        .as_u64()
        .unwrap()
}

#[test]
fn manifests_agree_with_the_gateway_config() {
    let objects = manifests();
    for kind in [
        "ConfigMap/gatehouse-config",
        "Deployment/gatehouse",
        "Service/gatehouse",
        "Service/gatehouse-admin",
        "PodDisruptionBudget/gatehouse",
        "Deployment/gatehouse-redis",
        "Service/gatehouse-redis",
    ] {
        assert!(objects.contains_key(kind), "missing {kind}");
    }

    // The Deployment's config path, and the ConfigMap mounted as the directory holding it.
    let deployment = &objects["Deployment/gatehouse"];
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let args: Vec<&str> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let config_at = args[args.iter().position(|a| *a == "--config").unwrap() + 1];
    let mounts = container["volumeMounts"].as_array().unwrap();
    let volumes = pod["volumes"].as_array().unwrap();
    // The volume (and the key in it) that provides `path`, through a mount.
    let provider = |path: &str| -> (&Value, String) {
        let mount = mounts
            .iter()
            .find(|m| {
                let dir = m["mountPath"].as_str().unwrap();
                path.strip_prefix(dir)
                    .is_some_and(|rest| rest.starts_with('/'))
            })
            .unwrap_or_else(|| panic!("{path} is in no mounted volume"));
        assert!(
            mount["subPath"].is_null(),
            "subPath mounts never see updates"
        );
        let key = path[mount["mountPath"].as_str().unwrap().len() + 1..].to_owned();
        let volume = volumes
            .iter()
            .find(|v| v["name"] == mount["name"])
            .unwrap_or_else(|| panic!("no volume {}", mount["name"]));
        (volume, key)
    };
    let (config_volume, config_key) = provider(config_at);
    let configmap_name = config_volume["configMap"]["name"].as_str().unwrap();
    let configmap = &objects[&format!("ConfigMap/{configmap_name}")];
    let text = configmap["data"][config_key.as_str()]
        .as_str()
        .unwrap_or_else(|| panic!("ConfigMap {configmap_name} has no {config_key}"));

    // The real parser, as `gatehouse check` would run it in the pod.
    let config = gatehouse::Config::parse(text, Path::new(config_at))
        .unwrap_or_else(|err| panic!("the ConfigMap's gateway.toml is invalid:\n{err}"));

    // Certificates come from the kubernetes.io/tls Secret's keys.
    for source in &config.tls.certificates {
        for file in [&source.cert, &source.key] {
            let (volume, key) = provider(file.to_str().unwrap());
            assert!(
                volume["secret"]["secretName"].is_string(),
                "{file:?} is not from a Secret"
            );
            assert!(
                ["tls.crt", "tls.key", "ca.crt"].contains(&key.as_str()),
                "{file:?}: a kubernetes.io/tls Secret has no key {key}"
            );
        }
    }

    // Container ports are the listeners'; probes hit the admin listener.
    let admin = config
        .admin
        .as_ref()
        .expect("[admin] for the probes")
        .listen;
    let https = config.listen.https;
    let http = config.listen.http.expect("listen.http");
    let named = |name: &str| container_port(container, &Value::from(name));
    assert_eq!(
        named("https"),
        port_of(&https),
        "container port https vs listen.https"
    );
    assert_eq!(
        named("http"),
        port_of(&http),
        "container port http vs listen.http"
    );
    assert_eq!(
        named("admin"),
        port_of(&admin),
        "container port admin vs admin.listen"
    );
    assert!(!admin.ip().is_loopback(), "the kubelet probes the pod IP");
    for (probe, path) in [
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(
            container_port(container, &get["port"]),
            port_of(&admin),
            "{probe}"
        );
    }

    // Services select the pods and point at the right container ports.
    let labels = &pod_labels(deployment);
    for (service, wanted) in [
        (
            "Service/gatehouse",
            vec![(443, port_of(&https)), (80, port_of(&http))],
        ),
        ("Service/gatehouse-admin", vec![(9090, port_of(&admin))]),
    ] {
        let spec = &objects[service]["spec"];
        assert_selects(&spec["selector"], labels, service);
        for (port, target) in wanted {
            let entry = spec["ports"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["port"] == port)
                .unwrap_or_else(|| panic!("{service} has no port {port}"));
            assert_eq!(
                container_port(container, &entry["targetPort"]),
                target,
                "{service}:{port}"
            );
        }
    }
    // The public Service is PROXY-protocol on exactly when the gateway expects it.
    let annotations = &objects["Service/gatehouse"]["metadata"]["annotations"];
    let sends_proxy = annotations.as_object().unwrap().values().any(|v| {
        v.as_str()
            .unwrap_or("")
            .contains("proxy_protocol_v2.enabled=true")
    });
    assert_eq!(sends_proxy, config.listen.proxy_protocol);
    assert!(!config.proxy.trusted_proxies.is_empty());

    // The PDB covers the same pods and leaves replicas serving.
    let pdb = &objects["PodDisruptionBudget/gatehouse"]["spec"];
    assert_selects(
        &pdb["selector"]["matchLabels"],
        labels,
        "PodDisruptionBudget",
    );
    let replicas = deployment["spec"]["replicas"].as_u64().unwrap();
    assert!(replicas >= 2, "one replica cannot survive a node drain");
    assert!(pdb["maxUnavailable"].as_u64().unwrap_or(1) < replicas);

    // Redis: the URL names the Redis Service and its port.
    let rate = config.rate_limit.as_ref().expect("[rate_limit]");
    let url = rate.redis.as_ref().expect("redis_url").urls.join(",");
    let redis_service = &objects["Service/gatehouse-redis"]["spec"];
    let redis_port = redis_service["ports"][0]["port"].as_u64().unwrap();
    assert!(
        url.contains(&format!("gatehouse-redis:{redis_port}")),
        "{url} does not name Service gatehouse-redis:{redis_port}"
    );
    assert_selects(
        &redis_service["selector"],
        &pod_labels(&objects["Deployment/gatehouse-redis"]),
        "Service/gatehouse-redis",
    );

    // Non-root, no privilege escalation, resources, and time for the drain.
    for name in ["Deployment/gatehouse", "Deployment/gatehouse-redis"] {
        let pod = &objects[name]["spec"]["template"]["spec"];
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{name}");
        assert_ne!(pod["securityContext"]["runAsUser"], 0, "{name}");
        for container in pod["containers"].as_array().unwrap() {
            let security = &container["securityContext"];
            assert_eq!(security["allowPrivilegeEscalation"], false, "{name}");
            assert_eq!(security["readOnlyRootFilesystem"], true, "{name}");
            for limit in ["requests", "limits"] {
                for resource in ["cpu", "memory"] {
                    assert!(
                        container["resources"][limit][resource].is_string(),
                        "{name}: resources.{limit}.{resource}"
                    );
                }
            }
        }
    }
    // Non-root without capabilities cannot bind below 1024.
    for addr in [https, http, admin] {
        assert!(addr.port() >= 1024, "{addr}");
    }
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        grace > config.server.shutdown_grace.as_secs(),
        "terminationGracePeriodSeconds {grace} must exceed server.shutdown_grace"
    );
    assert!(
        !config.server.shutdown_delay.is_zero(),
        "endpoints lag behind SIGTERM"
    );
}

fn pod_labels(deployment: &Value) -> Value {
    let labels = deployment["spec"]["template"]["metadata"]["labels"].clone();
    assert_selects(
        &deployment["spec"]["selector"]["matchLabels"],
        &labels,
        "Deployment selector",
    );
    labels
}

/// Every label of `selector` is on the pods.
fn assert_selects(selector: &Value, labels: &Value, what: &str) {
    let selector = selector
        .as_object()
        .unwrap_or_else(|| panic!("{what}: no selector"));
    assert!(!selector.is_empty(), "{what}: empty selector");
    for (key, value) in selector {
        assert_eq!(&labels[key], value, "{what}: label {key}");
    }
}
