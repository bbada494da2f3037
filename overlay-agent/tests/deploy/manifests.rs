//! Offline checks of `deploy/`: there is no API server, kind or Docker engine on the
//! build machines, so the manifests are validated against the Kubernetes OpenAPI
//! schemas with kubernetes-validate (installed by `cargo xtask test`), and what the schemas cannot
//! say is asserted here: least privilege, flannel's identity kept for an in-place
//! swap, the agent's agreed command line, the ConfigMap as the agent parses it, and
//! the Dockerfile, kind config and install script against the workspace.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use overlay_agent::net_conf::NetConf;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::pins;

const MANIFEST: &str = "deploy/kube-flannel-overlay.yml";
const CLEANUP: &str = "deploy/rollback/cleanup.yml";
const DOCKERFILE: &str = "deploy/Dockerfile";
const KIND_CONFIG: &str = "deploy/kind/cluster.yaml";
const INSTALL: &str = "deploy/kind/install.sh";

/// The oldest and newest Kubernetes whose schemas kubernetes-validate carries.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.25.0", "1.37.0"];

/// `overlay-agent run`'s flags (flanneld's and the agent's own) that the manifests
/// may use, should an operator add them; no others.
const RUN_FLAGS: &[&str] = &[
    "--kube-subnet-mgr",
    "--ip-masq",
    "--iface",
    "--iface-regex",
    "--public-ip",
    "--net-conf",
    "--subnet-file",
    "--bridge",
    "--bpffs",
    "--http-addr",
    "--log-format",
    "--bpf-log-level",
];
/// `--http-addr`'s default port, where the probes must point unless it is passed.
const DEFAULT_HTTP_PORT: i64 = 9101;

/// What the agent needs and nothing else; deploy/README.md says why each.
const AGENT_CAPABILITIES: [&str; 4] = ["BPF", "NET_ADMIN", "NET_RAW", "PERFMON"];

/// flannel's limits (walkthrough): 100m CPU, 50Mi memory.
const MAX_MILLI_CPU: u64 = 100;
const MAX_MEMORY: u64 = 50 << 20;

/// The agent under test, as cargo builds it for these tests.
pub(super) const AGENT: &str = env!("CARGO_BIN_EXE_overlay-agent");

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

pub(super) fn is_root() -> bool {
    // SAFETY: geteuid takes no arguments, touches no memory and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The file `rel` of the workspace.
pub(super) fn read(rel: &str) -> String {
    let path = workspace().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every YAML document of `text`, as JSON values (empty documents skipped).
fn documents(text: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(text)
        .map(|doc| Value::deserialize(doc).expect("YAML that maps to JSON"))
        .filter(|v| !v.is_null())
        .collect()
}

/// The objects of one manifest file.
struct Objects(Vec<Value>);

impl Objects {
    fn load(rel: &str) -> Self {
        Self(documents(&read(rel)))
    }

    fn all(&self, kind: &str) -> Vec<&Value> {
        self.0.iter().filter(|o| o["kind"] == kind).collect()
    }

    fn one(&self, kind: &str) -> &Value {
        match self.all(kind).as_slice() {
            [one] => one,
            other => panic!("expected one {kind}, found {}", other.len()),
        }
    }
}

/// `v` at JSON pointer `ptr`; panics naming the pointer when it is absent.
fn at<'a>(v: &'a Value, ptr: &str) -> &'a Value {
    v.pointer(ptr)
        .unwrap_or_else(|| panic!("{ptr} is missing in {}", v["metadata"]["name"]))
}

fn pod_spec(workload: &Value) -> &Value {
    at(workload, "/spec/template/spec")
}

fn containers<'a>(pod: &'a Value, field: &str) -> Vec<&'a Value> {
    pod[field]
        .as_array()
        .map(|a| a.iter().collect())
        .unwrap_or_default()
}

fn named<'a>(list: &[&'a Value], name: &str) -> &'a Value {
    list.iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

/// The element of the JSON array `list` whose `key` is `value`.
fn find_by<'a>(list: &'a Value, key: &str, value: &Value) -> &'a Value {
    list.as_array()
        .into_iter()
        .flatten()
        .find(|e| &e[key] == value)
        .unwrap_or_else(|| panic!("no element with {key} {value}"))
}

/// The DaemonSet's agent container.
fn agent(ds: &Value) -> &Value {
    named(&containers(pod_spec(ds), "containers"), "kube-flannel")
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().map(|s| s.as_str().expect("a string")).collect())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------
// Schema validation

/// kubernetes-validate where `cargo xtask test` installs it; a missing one fails the
/// test (a skipped schema check would pass for a valid manifest).
fn kubernetes_validate() -> PathBuf {
    let tool = pins::cache_dir().map(|cache| pins::kubernetes_validate(&cache));
    match tool {
        Some(tool) if tool.exists() => tool,
        Some(tool) => panic!(
            "kubernetes-validate {} is missing at {}: `cargo xtask test` installs it",
            pins::KUBERNETES_VALIDATE_VERSION,
            tool.display()
        ),
        None => panic!(
            "HOME is not set, so kubernetes-validate cannot be found: `cargo xtask test` installs it under ~/.cache/overlay-xtask"
        ),
    }
}

/// Validates `files` (absolute) against Kubernetes `version`'s schemas; Err holds
/// kubernetes-validate's report. Strict: unknown fields are errors. A document whose
/// kind has no schema is only a warning to kubernetes-validate; here it fails too.
fn validate(files: &[PathBuf], version: &str) -> Result<(), String> {
    let tool = kubernetes_validate();
    // As root, in an empty network namespace: proof that it needs no network.
    let mut cmd = if is_root() {
        let mut c = Command::new("unshare");
        c.arg("--net").arg(tool);
        c
    } else {
        Command::new(tool)
    };
    cmd.args(["--strict", "--kubernetes-version", version])
        .args(files);
    let out = cmd.output().expect("running kubernetes-validate");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let documents: usize = files
        .iter()
        .map(|f| documents(&std::fs::read_to_string(f).unwrap()).len())
        .sum();
    let passed = report
        .lines()
        .filter(|l| l.contains(" passed for resource "))
        .count();
    if out.status.success() && passed == documents && !report.contains("WARN") {
        Ok(())
    } else {
        Err(report)
    }
}

#[test]
fn manifests_match_the_kubernetes_schemas() {
    let files = [workspace().join(MANIFEST), workspace().join(CLEANUP)];
    for version in KUBERNETES_VERSIONS {
        if let Err(report) = validate(&files, version) {
            panic!("against Kubernetes {version}:\n{report}");
        }
    }
}

/// The validator is no rubber stamp: our own DaemonSet, broken three ways, fails.
#[test]
fn schema_validation_rejects_broken_manifests() {
    let ds = Objects::load(MANIFEST).one("DaemonSet").clone();
    let dir = tempfile::tempdir().unwrap();
    let mut wrong_type = ds.clone();
    wrong_type["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] =
        json!(["100m"]);
    let mut misspelt = ds.clone();
    let container = &mut misspelt["spec"]["template"]["spec"]["containers"][0];
    container["imagePullPolcy"] = container["imagePullPolicy"].take();
    container.as_object_mut().unwrap().remove("imagePullPolicy");
    let mut unknown_kind = ds;
    unknown_kind["kind"] = json!("DaemonSett");
    for (name, broken, expected) in [
        ("wrong-type", wrong_type, "limits.cpu"),
        ("misspelt", misspelt, "'imagePullPolcy' was unexpected"),
        (
            "unknown-kind",
            unknown_kind,
            "Couldn't find schema for kind DaemonSett",
        ),
    ] {
        let path = dir.path().join(format!("{name}.yml"));
        std::fs::write(&path, serde_norway::to_string(&broken).unwrap()).unwrap();
        let report = validate(&[path], KUBERNETES_VERSIONS[1])
            .expect_err(&format!("the {name} DaemonSet passed validation"));
        assert!(report.contains(expected), "{name}: {report}");
    }
}

// ---------------------------------------------------------------------------------
// flannel's identity, kept so that applying either manifest replaces the other

#[test]
fn keeps_flannels_names_for_an_in_place_swap() {
    let objects = Objects::load(MANIFEST);
    assert_eq!(
        objects.one("Namespace")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
        "privileged"
    );
    for (kind, name) in [
        ("Namespace", "kube-flannel"),
        ("ServiceAccount", "flannel"),
        ("ClusterRole", "flannel"),
        ("ClusterRoleBinding", "flannel"),
        ("ConfigMap", "kube-flannel-cfg"),
        ("DaemonSet", "kube-flannel-ds"),
    ] {
        let object = objects.one(kind);
        assert_eq!(object["metadata"]["name"], name, "{kind}");
        if !matches!(kind, "Namespace" | "ClusterRole" | "ClusterRoleBinding") {
            assert_eq!(object["metadata"]["namespace"], "kube-flannel", "{kind}");
        }
    }
    let ds = objects.one("DaemonSet");
    // Immutable in a DaemonSet: any other selector makes `kubectl apply` fail.
    assert_eq!(
        at(ds, "/spec/selector"),
        &json!({"matchLabels": {"app": "flannel"}})
    );
    assert_eq!(at(ds, "/spec/template/metadata/labels/app"), "flannel");
    let pod = pod_spec(ds);
    assert_eq!(pod["serviceAccountName"], "flannel");
    let config = find_by(&pod["volumes"], "name", &json!("flannel-cfg"));
    assert_eq!(config["configMap"]["name"], "kube-flannel-cfg");
}

/// flannel v0.28.9's init containers, as its kube-flannel.yml has them.
#[test]
fn installs_the_cni_plugin_and_config_as_flannel_does() {
    let ds = Objects::load(MANIFEST);
    let ds = ds.one("DaemonSet");
    let init = containers(pod_spec(ds), "initContainers");
    let plugin = named(&init, "install-cni-plugin");
    assert_eq!(
        plugin["image"],
        "ghcr.io/flannel-io/flannel-cni-plugin:v1.9.1-flannel3"
    );
    assert_eq!(strings(&plugin["command"]), ["cp"]);
    assert_eq!(
        strings(&plugin["args"]),
        ["-f", "/flannel", "/opt/cni/bin/flannel"]
    );
    assert_eq!(
        plugin["volumeMounts"],
        json!([{"name": "cni-plugin", "mountPath": "/opt/cni/bin"}])
    );
    let conf = named(&init, "install-cni");
    assert_eq!(conf["image"], "ghcr.io/flannel-io/flannel:v0.28.9");
    assert_eq!(strings(&conf["command"]), ["/opt/bin/install-conf"]);
    assert_eq!(
        strings(&conf["args"]),
        [
            "/etc/kube-flannel/cni-conf.json",
            "/etc/cni/net.d/10-flannel.conflist"
        ]
    );
    assert_eq!(
        conf["volumeMounts"],
        json!([
            {"name": "cni", "mountPath": "/etc/cni/net.d"},
            {"name": "flannel-cfg", "mountPath": "/etc/kube-flannel/"}
        ])
    );
    let host_path = |volume| &find_by(&pod_spec(ds)["volumes"], "name", &json!(volume))["hostPath"];
    assert_eq!(host_path("cni-plugin"), &json!({"path": "/opt/cni/bin"}));
    assert_eq!(host_path("cni"), &json!({"path": "/etc/cni/net.d"}));
}

// ---------------------------------------------------------------------------------
// Least privilege

#[test]
fn rbac_grants_only_what_the_agent_uses() {
    let objects = Objects::load(MANIFEST);
    assert!(objects.all("Role").is_empty() && objects.all("RoleBinding").is_empty());
    let role = objects.one("ClusterRole");
    let mut granted = BTreeSet::new();
    for rule in role["rules"].as_array().unwrap() {
        assert!(rule.get("resourceNames").is_none() && rule.get("nonResourceURLs").is_none());
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                for verb in strings(&rule["verbs"]) {
                    for word in [group, resource, verb] {
                        assert!(!word.contains('*'), "wildcard in {rule}");
                    }
                    granted.insert((group, resource, verb));
                }
            }
        }
    }
    let expected = BTreeSet::from([
        ("", "nodes", "get"),
        ("", "nodes", "list"),
        ("", "nodes", "watch"),
        ("", "nodes/status", "patch"),
    ]);
    assert_eq!(granted, expected);
    let binding = objects.one("ClusterRoleBinding");
    assert_eq!(
        binding["roleRef"],
        json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "flannel"})
    );
    assert_eq!(
        binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": "flannel", "namespace": "kube-flannel"}])
    );
}

#[test]
fn the_agent_runs_with_exactly_its_capabilities() {
    let objects = Objects::load(MANIFEST);
    let ds = objects.one("DaemonSet");
    let sc = &agent(ds)["securityContext"];
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
    let added: BTreeSet<&str> = strings(&sc["capabilities"]["add"]).into_iter().collect();
    assert_eq!(added, BTreeSet::from(AGENT_CAPABILITIES));
    assert!(
        pod_spec(ds)
            .get("securityContext")
            .is_none_or(|p| p.get("privileged").is_none())
    );
}

/// Only the bpffs mount may be privileged, and it must be: the API server accepts
/// Bidirectional mount propagation from privileged containers only.
#[test]
fn only_the_bpffs_mount_is_privileged() {
    for file in [MANIFEST, CLEANUP] {
        let objects = Objects::load(file);
        for ds in objects.all("DaemonSet") {
            let pod = pod_spec(ds);
            for c in containers(pod, "initContainers")
                .into_iter()
                .chain(containers(pod, "containers"))
            {
                let privileged = c["securityContext"]["privileged"] == true;
                let bidirectional = c["volumeMounts"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|m| m["mountPropagation"] == "Bidirectional");
                assert_eq!(
                    privileged,
                    c["name"] == "mount-bpffs",
                    "{file}: {}",
                    c["name"]
                );
                assert!(!bidirectional || privileged, "{file}: {}", c["name"]);
                let caps = strings(&c["securityContext"]["capabilities"]["add"]);
                assert!(!caps.contains(&"SYS_ADMIN"), "{file}: {}", c["name"]);
            }
        }
    }
    let objects = Objects::load(MANIFEST);
    let init = containers(pod_spec(objects.one("DaemonSet")), "initContainers");
    let mount = named(&init, "mount-bpffs");
    assert_eq!(
        mount["volumeMounts"],
        json!([{"name": "bpffs", "mountPath": "/sys/fs/bpf", "mountPropagation": "Bidirectional"}])
    );
    // After the CNI installers, like flannel's, and before the agent, which needs it.
    assert_eq!(init.last().unwrap()["name"], "mount-bpffs");
}

/// CPU in millicores or memory in bytes, from a Kubernetes quantity.
fn quantity(q: &str) -> u64 {
    let split = q.find(|c: char| !c.is_ascii_digit()).unwrap_or(q.len());
    let (number, unit) = q.split_at(split);
    let n: u64 = number.parse().unwrap_or_else(|_| panic!("quantity {q}"));
    n * match unit {
        "m" => 1,
        "" => 1000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        _ => panic!("unit of {q}"),
    }
}

#[test]
fn resources_stay_within_flannels() {
    assert_eq!(quantity("100m"), 100);
    assert_eq!(quantity("1"), 1000);
    assert_eq!(quantity("50Mi"), 50 << 20);
    let objects = Objects::load(MANIFEST);
    let resources = &agent(objects.one("DaemonSet"))["resources"];
    let requests = &resources["requests"];
    let cpu = quantity(requests["cpu"].as_str().unwrap());
    assert!(cpu <= MAX_MILLI_CPU, "requests.cpu {cpu}m");
    for set in ["requests", "limits"] {
        let memory = quantity(resources[set]["memory"].as_str().unwrap());
        assert!(memory <= MAX_MEMORY, "{set}.memory {memory}");
    }
}

/// flannel requests CPU and sets no limit: a CFS quota would throttle the agent.
#[test]
fn the_agent_has_no_cpu_limit() {
    let objects = Objects::load(MANIFEST);
    let resources = &agent(objects.one("DaemonSet"))["resources"];
    assert!(resources["requests"].get("cpu").is_some());
    assert!(
        resources["limits"].get("cpu").is_none(),
        "CPU limit: {}",
        resources["limits"]
    );
}

// ---------------------------------------------------------------------------------
// The agent's pod

#[test]
fn the_agent_pod_is_a_node_agent() {
    let objects = Objects::load(MANIFEST);
    let ds = objects.one("DaemonSet");
    let pod = pod_spec(ds);
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert!(
        pod["tolerations"]
            .as_array()
            .unwrap()
            .contains(&json!({"operator": "Exists", "effect": "NoSchedule"}))
    );
    let grace = pod["terminationGracePeriodSeconds"].as_i64().unwrap();
    assert!(
        (1..=30).contains(&grace),
        "terminationGracePeriodSeconds {grace}"
    );
    assert_eq!(
        at(ds, "/spec/updateStrategy"),
        &json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}})
    );
    let agent = agent(ds);
    // Where each host path lands, and how.
    let source = |path: &str| {
        let mount = agent["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["mountPath"].as_str().unwrap().trim_end_matches('/') == path)
            .unwrap_or_else(|| panic!("nothing mounted at {path}"));
        (mount, find_by(&pod["volumes"], "name", &mount["name"]))
    };
    let (_, run) = source("/run/flannel");
    assert_eq!(run["hostPath"]["path"], "/run/flannel");
    let (cfg_mount, cfg) = source("/etc/kube-flannel");
    assert_eq!(cfg["configMap"]["name"], "kube-flannel-cfg");
    assert_eq!(cfg_mount["readOnly"], true);
    let (bpf_mount, bpf) = source("/sys/fs/bpf");
    assert_eq!(bpf["hostPath"]["path"], "/sys/fs/bpf");
    // Sees the bpffs the init container mounted on the host.
    assert_eq!(bpf_mount["mountPropagation"], "HostToContainer");
    // The host's iptables lock, as flannel's manifest mounts it: iptables-legacy
    // cannot create it on the read-only root (the forward rules).
    let (lock_mount, lock) = source("/run/xtables.lock");
    assert_eq!(
        lock["hostPath"],
        json!({"path": "/run/xtables.lock", "type": "FileOrCreate"})
    );
    assert_ne!(lock_mount["readOnly"], true);
}

/// flannel's POD_NAME and POD_NAMESPACE, and NODE_NAME, which the agent prefers and
/// which spares it `pods: get` (see rbac_grants_only_what_the_agent_uses), all from
/// the downward API.
#[test]
fn the_node_is_named_through_the_downward_api() {
    let objects = Objects::load(MANIFEST);
    let field = |path: &str| json!({"fieldRef": {"fieldPath": path}});
    assert_eq!(
        agent(objects.one("DaemonSet"))["env"],
        json!([
            {"name": "POD_NAME", "valueFrom": field("metadata.name")},
            {"name": "POD_NAMESPACE", "valueFrom": field("metadata.namespace")},
            {"name": "NODE_NAME", "valueFrom": field("spec.nodeName")},
        ])
    );
}

/// The value of `flag` in `args` (`--flag value` or `--flag=value`).
fn flag_value<'a>(args: &[&'a str], flag: &str) -> Option<&'a str> {
    args.iter().enumerate().find_map(|(i, a)| {
        if *a == flag {
            args.get(i + 1).copied()
        } else {
            a.strip_prefix(flag)?.strip_prefix('=')
        }
    })
}

#[test]
fn probes_point_at_the_agents_http_port() {
    let objects = Objects::load(MANIFEST);
    let agent = agent(objects.one("DaemonSet"));
    let args = strings(&agent["args"]);
    let port = flag_value(&args, "--http-addr").map_or(DEFAULT_HTTP_PORT, |addr| {
        addr.rsplit(':').next().unwrap().parse().unwrap()
    });
    assert_eq!(
        agent["ports"],
        json!([{"name": "http", "containerPort": port, "protocol": "TCP"}])
    );
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        assert_eq!(agent[probe]["httpGet"]["path"], path, "{probe}");
        assert_eq!(agent[probe]["httpGet"]["port"], "http", "{probe}");
    }
}

/// Every `--flag` (with or without `=value`) of `args`.
fn flags<'a>(args: &[&'a str]) -> Vec<&'a str> {
    args.iter()
        .filter(|a| a.starts_with("--"))
        .map(|a| a.split('=').next().unwrap())
        .collect()
}

#[test]
fn commands_use_only_the_agreed_interface() {
    let entrypoint = dockerfile_entrypoint();
    let objects = Objects::load(MANIFEST);
    let agent = agent(objects.one("DaemonSet"));
    assert_eq!(strings(&agent["command"]), [entrypoint.as_str()]);
    let args = strings(&agent["args"]);
    // flanneld's own command line, as in flannel's manifest: no subcommand (the agent
    // reads none as its daemon's), flannel's two flags first.
    assert_eq!(args[..2], ["--ip-masq", "--kube-subnet-mgr"]);
    assert!(!args.contains(&"run"), "flanneld has no `run`: {args:?}");
    for flag in flags(&args) {
        assert!(
            RUN_FLAGS.contains(&flag),
            "{flag} is not one of run's flags"
        );
    }
    let cleanup = Objects::load(CLEANUP);
    let init = containers(pod_spec(cleanup.one("DaemonSet")), "initContainers");
    let cleanup = named(&init, "cleanup");
    assert_eq!(strings(&cleanup["command"]), [entrypoint.as_str()]);
    assert_eq!(strings(&cleanup["args"]), ["cleanup"]);
    assert_eq!(cleanup["image"], agent["image"]);
}

/// Undoing needs what doing needed: the cleanup runs as the agent does.
#[test]
fn cleanup_runs_with_the_agents_privileges() {
    let objects = Objects::load(MANIFEST);
    let agent = agent(objects.one("DaemonSet"));
    let cleanup = Objects::load(CLEANUP);
    let ds = cleanup.one("DaemonSet");
    let pod = pod_spec(ds);
    let init = containers(pod, "initContainers");
    let cleanup = named(&init, "cleanup");
    assert_eq!(cleanup["securityContext"], agent["securityContext"]);
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["automountServiceAccountToken"], false);
    assert_eq!(
        cleanup["volumeMounts"],
        json!([{"name": "bpffs", "mountPath": "/sys/fs/bpf", "mountPropagation": "HostToContainer"}])
    );
    assert_eq!(
        pod["volumes"],
        json!([{"name": "bpffs", "hostPath": {"path": "/sys/fs/bpf", "type": "DirectoryOrCreate"}}])
    );
}

// ---------------------------------------------------------------------------------
// The ConfigMap

/// flannel's CNI configuration, unchanged: the flannel plugin plus portmap.
fn flannels_cni_conf() -> Value {
    json!({
        "name": "cbr0",
        "cniVersion": "0.3.1",
        "plugins": [
            {"type": "flannel", "delegate": {"hairpinMode": true, "isDefaultGateway": true}},
            {"type": "portmap", "capabilities": {"portMappings": true}}
        ]
    })
}

fn net_conf() -> NetConf {
    let objects = Objects::load(MANIFEST);
    let text = at(objects.one("ConfigMap"), "/data/net-conf.json")
        .as_str()
        .unwrap();
    NetConf::parse(text).expect("net-conf.json as the agent parses it")
}

#[test]
fn configmap_is_flannels_with_the_ipip_backend() {
    let objects = Objects::load(MANIFEST);
    let data = objects.one("ConfigMap")["data"].as_object().unwrap();
    let keys: Vec<&str> = data.keys().map(String::as_str).collect();
    assert_eq!(keys, ["cni-conf.json", "net-conf.json"]);
    let cni: Value = serde_json::from_str(data["cni-conf.json"].as_str().unwrap()).unwrap();
    assert_eq!(cni, flannels_cni_conf());
    let net: Value = serde_json::from_str(data["net-conf.json"].as_str().unwrap()).unwrap();
    assert_eq!(net["Backend"]["Type"], "ipip");
    assert_eq!(net_conf().network, "10.244.0.0/16".parse().unwrap());
}

// ---------------------------------------------------------------------------------
// kind

/// The part of kind's v1alpha4 Cluster config we use; unknown fields are errors, so
/// that a typo cannot pass for a setting.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct KindCluster {
    kind: String,
    api_version: String,
    networking: KindNetworking,
    nodes: Vec<KindNode>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct KindNetworking {
    // kind's spelling, which camelCase would not produce.
    #[serde(rename = "disableDefaultCNI")]
    disable_default_cni: bool,
    pod_subnet: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KindNode {
    role: String,
}

#[test]
fn kind_cluster_is_the_walkthroughs_without_a_cni() {
    let cluster: KindCluster = serde_norway::from_str(&read(KIND_CONFIG)).unwrap();
    assert_eq!(cluster.kind, "Cluster");
    assert_eq!(cluster.api_version, "kind.x-k8s.io/v1alpha4");
    assert!(cluster.networking.disable_default_cni);
    // The controller manager hands out node podCIDRs from this: it must be the
    // network the agent is configured with.
    assert_eq!(
        cluster
            .networking
            .pod_subnet
            .parse::<ipnet::Ipv4Net>()
            .unwrap(),
        net_conf().network
    );
    let roles: Vec<&str> = cluster.nodes.iter().map(|n| n.role.as_str()).collect();
    assert_eq!(roles, ["control-plane", "worker", "worker"]);
}

#[test]
fn install_script_uses_the_files_it_names() {
    let script = read(INSTALL);
    let syntax = Command::new("bash")
        .arg("-n")
        .arg(workspace().join(INSTALL))
        .status();
    assert!(syntax.unwrap().success(), "bash -n {INSTALL}");
    // Every "$root/..." and "$here/..." path it uses exists.
    let mut named = 0;
    for (var, base) in [("\"$root/", ""), ("\"$here/", "deploy/kind/")] {
        for part in script.split(var).skip(1) {
            let rel = part.split('"').next().unwrap();
            assert!(
                workspace().join(base).join(rel).exists(),
                "{INSTALL} uses {base}{rel}, which does not exist"
            );
            named += 1;
        }
    }
    assert!(named >= 4, "the Dockerfile, kind config, manifest: {named}");
    let objects = Objects::load(MANIFEST);
    let image = agent(objects.one("DaemonSet"))["image"].as_str().unwrap();
    assert!(
        script.contains(&format!("IMAGE=\"{image}\"")),
        "{INSTALL} must build and load the DaemonSet's image {image}"
    );
    for step in [
        "kind load docker-image \"$IMAGE\"",
        "-n kube-flannel rollout status ds/kube-flannel-ds",
        "docker build -f \"$root/deploy/Dockerfile\" -t \"$IMAGE\" \"$root\"",
    ] {
        assert!(script.contains(step), "{INSTALL} lacks `{step}`");
    }
}

// ---------------------------------------------------------------------------------
// The Dockerfile (building it needs a Docker engine, which these machines lack)

/// The Dockerfile's instructions, continuation lines joined, comments dropped.
fn dockerfile() -> Vec<String> {
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in read(DOCKERFILE).lines() {
        let line = line.trim();
        if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(head) => current.push_str(head),
            None => {
                current.push_str(line);
                instructions.push(std::mem::take(&mut current));
            }
        }
    }
    instructions
}

fn instructions(keyword: &str) -> Vec<String> {
    dockerfile()
        .into_iter()
        .filter_map(|i| Some(i.strip_prefix(keyword)?.trim().to_owned()))
        .collect()
}

fn dockerfile_entrypoint() -> String {
    let entrypoint = instructions("ENTRYPOINT ");
    let words: Vec<String> = serde_json::from_str(&entrypoint[0]).unwrap();
    words[0].clone()
}

#[test]
fn dockerfile_copies_the_workspace_it_builds() {
    let root = workspace();
    let ignore = std::fs::read_to_string(root.join("deploy/Dockerfile.dockerignore")).unwrap();
    let mut copied = BTreeSet::new();
    let mut final_copy = None;
    for copy in instructions("COPY ") {
        let words: Vec<&str> = copy.split_whitespace().collect();
        if let Some(stage) = words[0].strip_prefix("--from=") {
            final_copy = Some((stage.to_owned(), words[1].to_owned(), words[2].to_owned()));
            continue;
        }
        let (dest, sources) = words.split_last().unwrap();
        // The image's /src mirrors the workspace, as cargo and build.rs expect.
        assert!(*dest == "./" || sources == [*dest], "COPY {copy}");
        for source in sources {
            assert!(root.join(source).exists(), "COPY {source}: no such path");
            let source = source.trim_end_matches('/');
            // The context must not have filtered it out.
            assert!(
                ignore
                    .lines()
                    .any(|l| l.trim_end_matches('/') == format!("!{source}")),
                "{source} is not let through deploy/Dockerfile.dockerignore"
            );
            copied.insert(source.to_owned());
        }
    }
    // Cargo loads the whole workspace: every member must be there.
    for member in &workspace_members() {
        assert!(
            copied.contains(member),
            "workspace member {member} is not copied"
        );
    }
    for file in ["Cargo.toml", "Cargo.lock"] {
        assert!(copied.contains(file), "{file} is not copied");
    }
    // The build stage builds the agent's release binary, and the runtime stage takes
    // exactly that file to the path the DaemonSet runs.
    let workdir = instructions("WORKDIR ");
    assert!(
        instructions("RUN ")
            .iter()
            .any(|r| r == "cargo build --release --locked --package overlay-agent"),
        "no release build of overlay-agent"
    );
    let (stage, from, to) = final_copy.expect("a COPY --from the build stage");
    assert_eq!(stage, "build");
    assert_eq!(from, format!("{}/target/release/overlay-agent", workdir[0]));
    assert_eq!(to, dockerfile_entrypoint());
    let meta = cargo_metadata();
    let agent = find_by(&meta["packages"], "name", &json!("overlay-agent"));
    let binary = find_by(&agent["targets"], "name", &json!("overlay-agent"));
    assert!(strings(&binary["kind"]).contains(&"bin"), "{binary}");
}

fn cargo_metadata() -> Value {
    let out = Command::new(env!("CARGO"))
        .current_dir(workspace())
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .output()
        .expect("cargo metadata");
    assert!(out.status.success(), "cargo metadata failed");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The workspace members' directories, relative to the workspace root.
fn workspace_members() -> Vec<String> {
    let meta = cargo_metadata();
    let root = Path::new(meta["workspace_root"].as_str().unwrap());
    meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let manifest = Path::new(p["manifest_path"].as_str().unwrap());
            let dir = manifest.parent().unwrap().strip_prefix(root).unwrap();
            dir.to_str().unwrap().to_owned()
        })
        .collect()
}

#[test]
fn dockerfile_uses_the_toolchain_deps_installs() {
    let froms = instructions("FROM ");
    let rust_version = read("Cargo.toml")
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .map(|v| v.trim_matches('"').to_owned())
        .unwrap();
    assert!(
        froms[0].starts_with(&format!("docker.io/library/rust:{rust_version}-bookworm ")),
        "build stage {} is not Rust {rust_version} on Debian 12",
        froms[0]
    );
    let llvm = pins::LLVM_PREFIX.rsplit('-').next().unwrap();
    let runs = instructions("RUN ").join("\n");
    for expected in [
        format!("llvm-{llvm}-dev"),
        format!("libpolly-{llvm}-dev"),
        format!("LLVM_PREFIX={} cargo install bpf-linker", pins::LLVM_PREFIX),
        format!("--version ~{}", pins::BPF_LINKER_VERSION),
        format!("--features llvm-{llvm}"),
        "--component rust-src".to_owned(),
    ] {
        assert!(
            runs.contains(&expected),
            "the Dockerfile lacks `{expected}`"
        );
    }
    let nightly = format!("NIGHTLY={}", pins::nightly());
    assert!(
        instructions("ARG ").contains(&nightly),
        "the Dockerfile's nightly is not overlay-ebpf/rust-toolchain's `{nightly}`"
    );
}

/// The runtime stage holds the binaries the agent runs for the forward rules: both
/// iptables backends (Debian's `iptables` package, so that the agent can pick the
/// host's) and `nft`, on the build stage's Debian.
#[test]
fn dockerfile_runtime_has_iptables_and_nft() {
    let all = dockerfile();
    let last_from = all.iter().rposition(|i| i.starts_with("FROM ")).unwrap();
    assert_eq!(
        all[last_from], "FROM docker.io/library/debian:bookworm-slim",
        "the runtime stage is not Debian 12, as the build stage"
    );
    let runtime = all[last_from..].join("\n");
    for package in ["iptables", "nftables"] {
        assert!(
            runtime
                .split_whitespace()
                .skip_while(|w| *w != "--no-install-recommends")
                .any(|w| w == package),
            "the runtime stage does not install {package}"
        );
        assert!(
            pins::PACKAGES.contains(&package),
            "{package} is not in xtask/src/pins.rs: the tests would not have it"
        );
    }
}

// ---------------------------------------------------------------------------------
// The capabilities, for real: the agent run under the DaemonSet's security context,
// as near as a process gets to one without a container runtime.

/// Two network namespaces joined by a veth (the node and a peer), a bpffs mounted as
/// the init container would, and a directory for the agent's files. Removed on drop.
struct Node {
    ns: String,
    peer: String,
    dir: tempfile::TempDir,
}

fn sh(script: &str) {
    let status = Command::new("sh").args(["-ec", script]).status().unwrap();
    assert!(status.success(), "{script}");
}

impl Node {
    fn create(tag: &str) -> Self {
        let ns = format!("dchk-{}-{tag}", std::process::id());
        let node = Self {
            peer: format!("{ns}-p"),
            ns,
            dir: tempfile::tempdir().unwrap(),
        };
        let (ns, peer, dir) = (&node.ns, &node.peer, node.dir.path().display());
        sh(&format!(
            "ip netns add {ns}; ip netns add {peer}
             ip -n {ns} link add eth0 type veth peer name eth0 netns {peer}
             ip -n {ns} addr add 192.0.2.1/24 dev eth0; ip -n {peer} addr add 192.0.2.2/24 dev eth0
             ip -n {ns} link set eth0 up; ip -n {peer} link set eth0 up
             # As on a kubeadm node: forwarding is on, and the container cannot write it.
             ip netns exec {ns} sysctl -qw net.ipv4.ip_forward=1
             # A host whose firewall is legacy iptables: the agent's forward rules go
             # there, which takes NET_RAW and the host's xtables lock.
             ip netns exec {ns} iptables-legacy -w -A INPUT -i lo -j ACCEPT
             mkdir {dir}/bpffs {dir}/run; mount -t bpf bpf {dir}/bpffs"
        ));
        std::fs::write(
            node.file("net-conf.json"),
            r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "ipip"}}"#,
        )
        .unwrap();
        let item = |name: &str, cidr: &str, ip: &str| {
            json!({"metadata": {"name": name}, "spec": {"podCIDR": cidr},
                   "status": {"addresses": [{"type": "InternalIP", "address": ip}]}})
        };
        let nodes = json!({"kind": "List", "apiVersion": "v1", "items": [
            item("a", "10.244.1.0/24", "192.0.2.1"), item("b", "10.244.2.0/24", "192.0.2.2")]});
        std::fs::write(node.file("nodes.json"), nodes.to_string()).unwrap();
        node
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The agent's routes in the node's namespace.
    fn routes(&self) -> String {
        let out = Command::new("ip")
            .args(["-n", &self.ns, "route", "show", "proto", "191"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Whether the agent's forward rules are in the legacy backend, the host's.
    fn forward_rules(&self) -> bool {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns,
                "iptables-legacy",
                "-w",
                "-S",
                "FLANNEL-FWD",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).contains("-A FLANNEL-FWD -s 10.244.0.0/16")
    }

    /// Runs the agent with only `caps` (as in the manifest: `NET_ADMIN`), a read-only
    /// root and /proc/sys, the host's xtables lock mounted, and no new privileges. Ok
    /// when it converged (its route and its forward rules are in place) and then
    /// stopped cleanly on SIGTERM; Err with its log otherwise.
    fn run_agent(&self, agent: &Path, caps: &[&str]) -> Result<(), String> {
        let bounding: String = caps
            .iter()
            .map(|c| format!(",+{}", c.to_lowercase()))
            .collect();
        // The hostPath volumes (the run directory, the bpffs, the xtables lock) stay
        // writable; the rest of the file system is read-only, as is /proc/sys in a
        // container (the image's /run too: an empty one here).
        let script = format!(
            "mount --bind {run} {run}; touch {lock}
             mount -t tmpfs -o size=64k tmpfs /run; touch /run/xtables.lock
             mount --bind {lock} /run/xtables.lock; mount -o remount,ro /run
             mount -o remount,bind,ro /
             mount --bind /proc/sys /proc/sys; mount -o remount,bind,ro /proc/sys
             exec setpriv --no-new-privs --inh-caps=-all --bounding-set=-all{bounding} -- \"$@\"",
            run = self.file("run").display(),
            lock = self.file("xtables.lock").display(),
        );
        let log = std::fs::File::create(self.file("agent.log")).unwrap();
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns,
                "unshare",
                "--mount",
                "--propagation",
            ])
            .args(["private", "sh", "-ec", &script, "sh"])
            .arg(agent)
            .arg("run")
            // The file node source: no API server here.
            .args(
                [
                    ("--nodes-file", "nodes.json"),
                    ("--net-conf", "net-conf.json"),
                    ("--subnet-file", "run/subnet.env"),
                    ("--bpffs", "bpffs"),
                ]
                .into_iter()
                .flat_map(|(flag, file)| [flag.into(), self.file(file).into_os_string()]),
            )
            .args(["--iface", "eth0", "--ip-masq"])
            .env("NODE_NAME", "a")
            .env("NO_COLOR", "1")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let log = || std::fs::read_to_string(self.file("agent.log")).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let converged = loop {
            if let Some(status) = child.try_wait().unwrap() {
                return Err(format!("exited ({status}) before converging:\n{}", log()));
            }
            if self.routes().contains("10.244.2.0/24 via 192.0.2.2") && self.forward_rules() {
                break true;
            }
            if std::time::Instant::now() > deadline {
                break false;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        };
        // `ip netns exec`, unshare, sh and setpriv all exec: the child is the agent.
        let sent = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success(), "kill -TERM {} failed", child.id());
        let status = child.wait().unwrap();
        if !converged {
            return Err(format!("did not converge in 30 s:\n{}", log()));
        }
        if !status.success() {
            return Err(format!("stopped with {status}:\n{}", log()));
        }
        Ok(())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.file("bpffs")).status();
        for ns in [&self.ns, &self.peer] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

#[test]
fn the_manifests_capabilities_run_the_agent_and_none_is_spare() {
    if !is_root() {
        eprintln!("skipped: needs root (namespaces, bpffs, capabilities)");
        return;
    }
    let objects = Objects::load(MANIFEST);
    let ds = objects.one("DaemonSet");
    let caps = strings(&agent(ds)["securityContext"]["capabilities"]["add"]);
    let binary = Path::new(AGENT);
    let node = Node::create("all");
    if let Err(log) = node.run_agent(binary, &caps) {
        panic!("with {caps:?}, the agent {log}");
    }
    // The datapath outlives the agent (restart safety); `overlay-agent cleanup` is what
    // removes it.
    assert!(
        !node.routes().is_empty(),
        "the agent's routes must stay in place after it stops"
    );
    for missing in &caps {
        let fewer: Vec<&str> = caps.iter().copied().filter(|c| c != missing).collect();
        let node = Node::create(&missing.to_lowercase().replace('_', ""));
        match node.run_agent(binary, &fewer) {
            Ok(()) => panic!("the agent ran without {missing}: the manifest need not add it"),
            // Why it failed: the error, and the verifier's verdict when it has one.
            Err(log) => {
                let why: Vec<&str> = log
                    .lines()
                    .filter(|l| {
                        ["ERROR", "WARN", "prohibited"]
                            .iter()
                            .any(|w| l.contains(w))
                    })
                    .map(|l| &l[..l.len().min(200)])
                    .collect();
                eprintln!("without {missing}: {}", why.join(" / "));
            }
        }
    }
}
