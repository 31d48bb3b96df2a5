//! The deployment files in `deploy/`, checked without a cluster, a systemd or a Grafana:
//!
//! - Kubernetes manifests against the API schemas (`kubernetes-validate --strict`, which bundles
//!   them), plus what the schemas cannot say: the capabilities, probes, ports and mounts the
//!   daemon needs, both DaemonSet variants running the same enforcer, the ConfigMap equal to
//!   `segments/`, every file listed by a kustomization;
//! - the Prometheus Operator resources (CRDs, in no bundled schema) field by field, their alert
//!   expressions with `promtool check rules`, and the violation alert (and the others) firing
//!   on synthetic series with `promtool test rules`;
//! - the Grafana dashboard: valid JSON, every query valid PromQL over metrics the daemon
//!   exports;
//! - the systemd unit with `systemd-analyze verify` and `systemd-analyze security`;
//! - the Containerfile copying every workspace member.
//!
//! No root needed. The tools come from `cargo xtask setup` (python3 with kubernetes-validate
//! and PyYAML, promtool, systemd-analyze). `UPDATE_DEPLOY=1` rewrites the policy ConfigMap from
//! `segments/` instead of failing on a difference.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::{Value, json};

/// Kubernetes versions the manifests must be valid for: the newest bundled schema, and the
/// oldest release we claim to support.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.37.0", "1.29.0"];
/// API group of the Prometheus Operator's CRDs.
const MONITORING_API: &str = "monitoring.coreos.com/v1";
/// Metrics the alerts may use besides the daemon's: Prometheus's own `up`.
const RULE_METRICS_NOT_EXPORTED: [&str; 1] = ["up"];
/// The capabilities the enforcer container adds (see the comments in the DaemonSet).
const ENFORCER_CAPABILITIES: [&str; 3] = ["BPF", "NET_ADMIN", "PERFMON"];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("vm-tests lives in the workspace")
        .to_path_buf()
}

fn deploy() -> PathBuf {
    repo().join("deploy")
}

fn kubernetes_dir() -> PathBuf {
    deploy().join("kubernetes")
}

/// Runs `cmd`; its output if it exits 0, otherwise an error with everything it printed.
fn run(cmd: &mut Command) -> Result<Output> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .with_context(|| format!("running {shown} (installed by `cargo xtask setup`)"))?;
    ensure!(
        out.status.success(),
        "{shown} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out)
}

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("deploy-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir))
    }

    fn write(&self, name: &str, text: &str) -> Result<PathBuf> {
        let path = self.0.join(name);
        fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Every `*.yaml` under `dir`, sorted.
fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                files.push(path);
            }
        }
    }
    files.sort();
    Ok(files)
}

/// The manifests: every YAML file under `deploy/kubernetes` but the kustomizations.
fn manifest_files() -> Result<Vec<PathBuf>> {
    Ok(yaml_files(&kubernetes_dir())?
        .into_iter()
        .filter(|p| p.file_name().is_none_or(|n| n != "kustomization.yaml"))
        .collect())
}

/// The YAML documents of each file as JSON, parsed by PyYAML (the parser kubernetes-validate
/// uses; the workspace has no YAML crate for arbitrary documents).
fn load_yaml(files: &[PathBuf]) -> Result<Vec<Vec<Value>>> {
    const SCRIPT: &str = "import json, sys, yaml; json.dump([[d for d in \
        yaml.safe_load_all(open(name)) if d is not None] for name in sys.argv[1:]], sys.stdout)";
    let out = run(Command::new("python3").args(["-c", SCRIPT]).args(files))?;
    serde_json::from_slice(&out.stdout).context("PyYAML's JSON")
}

fn load_one(path: &Path) -> Result<Value> {
    let mut docs = load_yaml(&[path.to_path_buf()])?.remove(0);
    ensure!(docs.len() == 1, "{}: expected one document", path.display());
    Ok(docs.remove(0))
}

/// `value` at a dotted path (`spec.template.spec.containers`); array elements by index.
fn at<'a>(value: &'a Value, path: &str) -> Result<&'a Value> {
    path.split('.').try_fold(value, |v, key| {
        let next = match key.parse::<usize>() {
            Ok(i) => v.get(i),
            Err(_) => v.get(key),
        };
        next.with_context(|| format!("no `{path}` (missing `{key}`)"))
    })
}

fn str_at<'a>(value: &'a Value, path: &str) -> Result<&'a str> {
    at(value, path)?
        .as_str()
        .with_context(|| format!("`{path}` is not a string"))
}

fn array_at<'a>(value: &'a Value, path: &str) -> Result<&'a Vec<Value>> {
    at(value, path)?
        .as_array()
        .with_context(|| format!("`{path}` is not a list"))
}

fn named<'a>(list: &'a [Value], name: &str) -> Result<&'a Value> {
    list.iter()
        .find(|item| item.get("name").and_then(Value::as_str) == Some(name))
        .with_context(|| format!("nothing named {name:?}"))
}

fn relative(path: &Path) -> String {
    path.strip_prefix(repo())
        .unwrap_or(path)
        .display()
        .to_string()
}

#[test]
fn kubernetes_manifests_match_the_api_schemas() -> Result<()> {
    let files = manifest_files()?;
    let docs = load_yaml(&files)?;
    let mut core = Vec::new();
    let mut expected_passes = 0;
    for (file, docs) in files.iter().zip(&docs) {
        ensure!(!docs.is_empty(), "{}: no document", relative(file));
        let crds = docs
            .iter()
            .filter(|d| d["apiVersion"] == MONITORING_API)
            .count();
        // Operator resources are checked by `prometheus_operator_resources_are_well_formed`;
        // one file holds one kind of either, so that the schema check covers whole files.
        ensure!(
            crds == 0 || crds == docs.len(),
            "{}: mixes operator resources with core ones",
            relative(file)
        );
        if crds == 0 {
            core.push(file.clone());
            expected_passes += docs.len();
        }
    }
    ensure!(core.len() >= 5, "too few core manifests found: {core:?}");
    for version in KUBERNETES_VERSIONS {
        let out = run(Command::new("python3")
            .args(["-m", "kubernetes_validate", "--strict", "-k", version])
            .args(&core)
            .current_dir(kubernetes_dir()))?;
        let report = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        // An unknown kind is only a warning with exit status 0: every document must pass.
        let passed = report.lines().filter(|l| l.contains(" passed ")).count();
        ensure!(
            passed == expected_passes && !report.contains("WARN") && !report.contains("ERROR"),
            "kubernetes-validate {version}: {passed} of {expected_passes} documents passed:\n\
             {report}"
        );
    }
    Ok(())
}

/// The enforcer container of a DaemonSet manifest.
fn enforcer_container(daemonset: &Value) -> Result<&Value> {
    named(
        array_at(daemonset, "spec.template.spec.containers")?,
        "enforcer",
    )
}

fn flag<'a>(args: &'a [Value], name: &str) -> Result<&'a str> {
    let prefix = format!("--{name}=");
    args.iter()
        .filter_map(Value::as_str)
        .find_map(|a| a.strip_prefix(&prefix))
        .with_context(|| format!("no {prefix}... argument in {args:?}"))
}

fn daemonsets() -> Result<Vec<(PathBuf, Value)>> {
    ["enforcer", "enforcer-git-sync"]
        .iter()
        .map(|variant| {
            let path = kubernetes_dir().join(variant).join("daemonset.yaml");
            Ok((path.clone(), load_one(&path)?))
        })
        .collect()
}

/// What the schema cannot check: the enforcer gets exactly the capabilities it needs, reaches
/// the node's interfaces, is probed on the endpoints it serves, and finds its policy.
#[test]
fn daemonsets_give_the_enforcer_what_it_needs_and_no_more() -> Result<()> {
    let account = load_one(&kubernetes_dir().join("base/serviceaccount.yaml"))?;
    for (path, ds) in daemonsets()? {
        let check = || -> Result<()> {
            let pod = at(&ds, "spec.template.spec")?;
            ensure!(pod["hostNetwork"] == true, "needs the host's interfaces");
            ensure!(
                pod["serviceAccountName"] == account["metadata"]["name"],
                "service account"
            );
            ensure!(
                array_at(pod, "tolerations")?.contains(&json!({"operator": "Exists"})),
                "must tolerate every taint, to run on every node"
            );
            let labels = at(&ds, "spec.template.metadata.labels")?;
            ensure!(
                at(&ds, "spec.selector.matchLabels")?
                    .as_object()
                    .context("matchLabels")?
                    .iter()
                    .all(|(k, v)| labels.get(k) == Some(v)),
                "the selector must match the pod labels"
            );

            let enforcer = enforcer_container(&ds)?;
            let security = at(enforcer, "securityContext")?;
            ensure!(security["privileged"] == false, "must not be privileged");
            ensure!(security["readOnlyRootFilesystem"] == true, "read-only root");
            ensure!(
                security["allowPrivilegeEscalation"] == false,
                "no escalation"
            );
            ensure!(
                at(security, "capabilities.drop")? == &json!(["ALL"]),
                "must drop every capability first"
            );
            let mut added: Vec<&str> = array_at(security, "capabilities.add")?
                .iter()
                .filter_map(Value::as_str)
                .collect();
            added.sort_unstable();
            ensure!(
                added == ENFORCER_CAPABILITIES,
                "capabilities {added:?}, expected exactly {ENFORCER_CAPABILITIES:?}"
            );
            // Only the enforcer holds capabilities.
            let all_containers = array_at(pod, "containers")?.iter().chain(
                pod.get("initContainers")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten(),
            );
            for c in all_containers.filter(|c| c["name"] != "enforcer") {
                ensure!(
                    at(c, "securityContext.capabilities.drop")? == &json!(["ALL"])
                        && c["securityContext"]["capabilities"].get("add").is_none()
                        && c["securityContext"]["privileged"] != true,
                    "container {} must hold no capability",
                    c["name"]
                );
            }

            let args = array_at(enforcer, "args")?;
            ensure!(args.first() == Some(&json!("run")), "args start with `run`");
            let metrics_addr: std::net::SocketAddr = flag(args, "metrics-addr")?
                .parse()
                .context("--metrics-addr")?;
            let port = named(array_at(enforcer, "ports")?, "metrics")?;
            ensure!(
                port["containerPort"] == metrics_addr.port(),
                "the metrics port must be the one --metrics-addr serves"
            );
            for (probe, path) in [
                ("startupProbe", "/healthz"),
                ("livenessProbe", "/healthz"),
                ("readinessProbe", "/readyz"),
            ] {
                let get = at(enforcer, &format!("{probe}.httpGet"))?;
                ensure!(
                    get["path"] == path && get["port"] == "metrics",
                    "{probe} must GET {path} on the metrics port, not {get}"
                );
            }
            for key in [
                "resources.requests.cpu",
                "resources.requests.memory",
                "resources.limits.memory",
            ] {
                at(enforcer, key)?;
            }

            let mounts = array_at(enforcer, "volumeMounts")?;
            let volumes = array_at(pod, "volumes")?;
            let bpffs = named(volumes, "bpffs")?;
            ensure!(
                at(bpffs, "hostPath.path")? == "/sys/fs/bpf"
                    && named(mounts, "bpffs")?["mountPath"] == "/sys/fs/bpf"
                    && named(mounts, "bpffs")?["mountPropagation"] == "HostToContainer",
                "the host's bpffs must be mounted at /sys/fs/bpf, following the host's mounts"
            );
            // Pinned in the host's bpffs, the programs outlive the pod: restarts and upgrades
            // leave no gap. Nothing may detach them when a pod stops.
            ensure!(
                args.contains(&json!("--persist")),
                "the enforcer must run with --persist"
            );
            ensure!(
                enforcer.get("lifecycle").is_none(),
                "no lifecycle hook: a stopping pod must not detach"
            );
            let policy_mount = named(mounts, "policy")?;
            ensure!(policy_mount["readOnly"] == true, "the policy is read-only");
            let policy = flag(args, "policy")?;
            ensure!(
                Path::new(policy).starts_with(str_at(policy_mount, "mountPath")?),
                "--policy={policy} is outside the policy mount"
            );
            named(volumes, "policy")?;
            // Quarantine, grants and the audit chain must outlive the pod: on the node.
            for name in ["control-socket", "state-file", "audit-log"] {
                let path = flag(args, name)?;
                let mount = mounts
                    .iter()
                    .filter(|m| {
                        m["mountPath"]
                            .as_str()
                            .is_some_and(|dir| Path::new(path).starts_with(dir))
                    })
                    .max_by_key(|m| m["mountPath"].as_str().map_or(0, str::len))
                    .with_context(|| format!("--{name}={path} is in no volume mount"))?;
                let volume = named(volumes, str_at(mount, "name")?)?;
                ensure!(
                    volume.get("hostPath").is_some() && mount["readOnly"] != true,
                    "--{name}={path} must be on a writable hostPath volume, not {volume}"
                );
            }
            Ok(())
        };
        check().with_context(|| relative(&path))?;
    }
    Ok(())
}

/// The git-sync variant differs from the ConfigMap one only in where the policy comes from.
#[test]
fn both_daemonsets_run_the_same_enforcer() -> Result<()> {
    let normalized = |ds: &Value| -> Result<Value> {
        let mut enforcer = enforcer_container(ds)?.clone();
        let args = enforcer["args"].as_array_mut().context("args")?;
        args.retain(|a| !a.as_str().is_some_and(|a| a.starts_with("--policy=")));
        let mounts = enforcer["volumeMounts"].as_array_mut().context("mounts")?;
        mounts.retain(|m| m["name"] != "policy");
        Ok(enforcer)
    };
    let sets = daemonsets()?;
    let (a, b) = (&sets[0].1, &sets[1].1);
    ensure!(
        normalized(a)? == normalized(b)?,
        "the enforcer containers of the two DaemonSets differ beyond the policy path:\n{:#}\n{:#}",
        normalized(a)?,
        normalized(b)?
    );
    for key in ["metadata", "spec.selector", "spec.updateStrategy"] {
        ensure!(at(a, key)? == at(b, key)?, "`{key}` differs");
    }
    let pod = |ds: &Value| -> Result<Value> {
        let mut spec = at(ds, "spec.template.spec")?.clone();
        let spec = spec.as_object_mut().context("pod spec")?;
        for varying in ["containers", "initContainers", "volumes", "securityContext"] {
            spec.remove(varying);
        }
        Ok(Value::Object(spec.clone()))
    };
    ensure!(pod(a)? == pod(b)?, "the pod settings differ");
    Ok(())
}

fn segment_files() -> Result<Vec<(String, String)>> {
    let dir = repo().join("segments");
    let mut files = Vec::new();
    // Top-level YAML files only, as the daemon reads them.
    for entry in fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        let yaml = name.ends_with(".yaml") || name.ends_with(".yml");
        if yaml && !name.starts_with('.') && path.is_file() {
            let text =
                fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
            files.push((name, text));
        }
    }
    files.sort();
    ensure!(!files.is_empty(), "no policy files in {}", dir.display());
    Ok(files)
}

/// The ConfigMap text for `files`: each file as a literal block scalar, so it reads like the
/// file and survives byte for byte.
fn policy_configmap(files: &[(String, String)]) -> String {
    let mut out = String::from(
        "# Generated from segments/ by vm-tests/tests/deploy_manifests.rs; do not edit. After \
         changing\n# segments/: UPDATE_DEPLOY=1 cargo test -p vm-tests --test deploy_manifests\n\
         apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: enforcer-policy\n  namespace: \
         enforcer\n  labels:\n    app.kubernetes.io/name: enforcer\ndata:\n",
    );
    for (name, text) in files {
        let body = text.trim_end_matches('\n');
        // Chomping: clip keeps exactly one final newline, strip none, keep all of them.
        let chomp = match text.len() - body.len() {
            1 => "",
            0 => "-",
            _ => "+",
        };
        // Content that starts with a space needs its indentation stated.
        let indent = if body.starts_with(' ') { "2" } else { "" };
        out.push_str(&format!("  {name}: |{indent}{chomp}\n"));
        for line in text.strip_suffix('\n').unwrap_or(text).split('\n') {
            if line.is_empty() {
                out.push('\n');
            } else {
                out.push_str(&format!("    {line}\n"));
            }
        }
    }
    out
}

#[test]
fn policy_configmap_matches_segments() -> Result<()> {
    let files = segment_files()?;
    let path = kubernetes_dir().join("enforcer/policy-configmap.yaml");
    let expected = policy_configmap(&files);
    let actual = fs::read_to_string(&path).unwrap_or_default();
    if actual != expected {
        if std::env::var_os("UPDATE_DEPLOY").is_some() {
            fs::write(&path, &expected).with_context(|| format!("writing {}", path.display()))?;
            eprintln!("rewrote {}", relative(&path));
        } else {
            bail!(
                "{} is not the policy in segments/: run \
                 `UPDATE_DEPLOY=1 cargo test -p vm-tests --test deploy_manifests`",
                relative(&path)
            );
        }
    }
    // What Kubernetes will see, parsed: the files exactly.
    let configmap = load_one(&path)?;
    let data: BTreeMap<String, String> =
        serde_json::from_value(at(&configmap, "data")?.clone()).context("data")?;
    ensure!(
        data == files.into_iter().collect::<BTreeMap<_, _>>(),
        "the ConfigMap's data differs from segments/ once parsed"
    );
    let daemonset = load_one(&kubernetes_dir().join("enforcer/daemonset.yaml"))?;
    let volume = named(
        array_at(&daemonset, "spec.template.spec.volumes")?,
        "policy",
    )?;
    ensure!(
        at(volume, "configMap.name")? == at(&configmap, "metadata.name")?,
        "the DaemonSet mounts another ConfigMap"
    );
    Ok(())
}

/// Kustomize is not installed; check what it would trip on: every listed resource exists, and
/// every manifest is listed somewhere.
#[test]
fn kustomizations_list_every_manifest() -> Result<()> {
    let kustomizations: Vec<PathBuf> = yaml_files(&kubernetes_dir())?
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n == "kustomization.yaml"))
        .collect();
    let mut listed = BTreeSet::new();
    for (path, doc) in kustomizations.iter().zip(load_yaml(&kustomizations)?) {
        let doc = doc.first().context("empty kustomization")?;
        ensure!(doc["kind"] == "Kustomization", "{}: kind", relative(path));
        let dir = path.parent().context("parent")?;
        for resource in array_at(doc, "resources")? {
            let target = dir.join(resource.as_str().context("resource name")?);
            let target = target
                .canonicalize()
                .with_context(|| format!("{}: {} is missing", relative(path), target.display()))?;
            ensure!(
                target.is_file() || target.join("kustomization.yaml").is_file(),
                "{}: {} is neither a manifest nor a kustomization",
                relative(path),
                target.display()
            );
            listed.insert(target);
        }
    }
    for manifest in manifest_files()? {
        ensure!(
            listed.contains(&manifest.canonicalize()?),
            "{} is in no kustomization.yaml",
            relative(&manifest)
        );
    }
    Ok(())
}

/// Metric names the daemon exports: the string literals `"enforcer_…"` of its metrics module.
fn exported_metrics() -> Result<BTreeSet<String>> {
    let path = repo().join("enforcer/src/metrics.rs");
    let source =
        fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let names: BTreeSet<String> = source
        .split('"')
        .skip(1)
        .step_by(2)
        .filter(|s| {
            s.starts_with("enforcer_") && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
        .map(str::to_owned)
        .collect();
    ensure!(
        names.contains("enforcer_policy_verdicts_total") && names.len() >= 10,
        "found only {names:?} in {}",
        path.display()
    );
    Ok(names)
}

/// Identifiers in a PromQL expression that name metrics: outside string literals, not followed
/// by `(` (functions) and not keywords or label names inside `by (...)` / `{...}`.
fn metric_names(expr: &str) -> BTreeSet<String> {
    const KEYWORDS: [&str; 12] = [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "inf",
    ];
    // Aggregations may put `by (...)` between their name and their `(`.
    const AGGREGATIONS: [&str; 14] = [
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    ];
    let mut names = BTreeSet::new();
    let chars: Vec<char> = expr.chars().collect();
    let (mut i, mut depth_braces, mut in_label_list) = (0, 0, false);
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            // Skip a string literal.
            i += 1;
            while i < chars.len() && chars[i] != c {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
        } else if c == '[' {
            // A range or subquery duration.
            while i < chars.len() && chars[i] != ']' {
                i += 1;
            }
        } else if c == '{' {
            depth_braces += 1;
        } else if c == '}' {
            depth_braces -= 1;
        } else if c == ')' {
            in_label_list = false;
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i + 1 < chars.len()
                && (chars[i + 1].is_ascii_alphanumeric() || "_:".contains(chars[i + 1]))
            {
                i += 1;
            }
            let word: String = chars[start..=i].iter().collect();
            let next = chars[i + 1..].iter().find(|c| !c.is_whitespace());
            let is_number = start > 0 && chars[start - 1].is_ascii_digit();
            if KEYWORDS.contains(&word.as_str()) {
                in_label_list = next == Some(&'(');
                if in_label_list {
                    // Skip to the `(` so the names inside count as labels.
                    while chars[i] != '(' {
                        i += 1;
                    }
                }
            } else if depth_braces == 0
                && !in_label_list
                && next != Some(&'(')
                && !is_number
                && !AGGREGATIONS.contains(&word.as_str())
            {
                names.insert(word);
            }
        }
        i += 1;
    }
    names
}

#[test]
fn metric_names_are_found_in_promql() {
    let names = metric_names(
        r#"sum by (source_segment) (rate(enforcer_policy_verdicts_total{action="dropped"}[5m])) > 0.1 and on (node) up == 0 or max without (le) (enforcer_drop_total offset 5m)"#,
    );
    let expected: BTreeSet<String> = [
        "enforcer_policy_verdicts_total",
        "up",
        "enforcer_drop_total",
    ]
    .map(str::to_owned)
    .into();
    assert_eq!(names, expected);
}

/// The rule groups of the PrometheusRule, as a plain Prometheus rules file (JSON is YAML).
fn prometheus_rule_groups() -> Result<Value> {
    let rule = load_one(&kubernetes_dir().join("monitoring/prometheusrule.yaml"))?;
    Ok(json!({ "groups": at(&rule, "spec.groups")? }))
}

/// The CRDs are in no bundled schema: check the fields the operator requires, and that they
/// point at the DaemonSet's pods and port.
#[test]
fn prometheus_operator_resources_are_well_formed() -> Result<()> {
    let daemonset = load_one(&kubernetes_dir().join("enforcer/daemonset.yaml"))?;
    let monitor = load_one(&kubernetes_dir().join("monitoring/podmonitor.yaml"))?;
    ensure!(monitor["apiVersion"] == MONITORING_API && monitor["kind"] == "PodMonitor");
    ensure!(at(&monitor, "metadata.namespace")? == at(&daemonset, "metadata.namespace")?);
    let pod_labels = at(&daemonset, "spec.template.metadata.labels")?;
    for (key, value) in at(&monitor, "spec.selector.matchLabels")?
        .as_object()
        .context("matchLabels")?
    {
        ensure!(
            pod_labels.get(key) == Some(value),
            "selector {key}={value} misses the pods"
        );
    }
    let endpoints = array_at(&monitor, "spec.podMetricsEndpoints")?;
    ensure!(!endpoints.is_empty(), "no podMetricsEndpoints");
    for endpoint in endpoints {
        let port = str_at(endpoint, "port")?;
        named(array_at(enforcer_container(&daemonset)?, "ports")?, port)
            .with_context(|| format!("PodMonitor port {port:?}"))?;
        ensure!(str_at(endpoint, "path")? == "/metrics");
    }

    let rule = load_one(&kubernetes_dir().join("monitoring/prometheusrule.yaml"))?;
    ensure!(rule["apiVersion"] == MONITORING_API && rule["kind"] == "PrometheusRule");
    str_at(&rule, "metadata.name")?;
    let allowed_spec_keys = ["groups"];
    for key in at(&rule, "spec")?.as_object().context("spec")?.keys() {
        ensure!(
            allowed_spec_keys.contains(&key.as_str()),
            "unknown spec.{key}"
        );
    }
    let mut alerts = BTreeSet::new();
    for group in array_at(&rule, "spec.groups")? {
        str_at(group, "name")?;
        for rule in array_at(group, "rules")? {
            let fields = rule.as_object().context("rule")?;
            for key in fields.keys() {
                ensure!(
                    ["alert", "record", "expr", "for", "labels", "annotations"]
                        .contains(&key.as_str()),
                    "unknown rule field {key}"
                );
            }
            let name = str_at(rule, "alert")?;
            ensure!(alerts.insert(name.to_owned()), "alert {name} twice");
            str_at(rule, "expr")?;
            let severity = str_at(rule, "labels.severity")?;
            ensure!(
                ["critical", "warning", "info"].contains(&severity),
                "{name}: severity"
            );
            str_at(rule, "annotations.summary")?;
            str_at(rule, "annotations.description")?;
        }
    }
    for required in [
        "EnforcerPolicyViolations",
        "EnforcerPolicyReloadFailing",
        "EnforcerPolicyReloadFailures",
        "EnforcerLostEvents",
        "EnforcerBreakGlassActive",
        "EnforcerBpfMapPressure",
    ] {
        ensure!(alerts.contains(required), "alert {required} missing");
    }
    Ok(())
}

/// Synthetic series for `promtool test rules`: each alert fires on what it is about and stays
/// quiet on what it is not.
const RULE_TESTS: &str = r#"
rule_files: [rules.yaml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      # 0.5 denied packets/s from radiology to billing: a violation.
      - series: 'enforcer_policy_verdicts_total{source_segment="radiology",destination_segment="billing",direction="ingress",action="dropped",match="none",node="n1"}'
        values: '0+30x20'
      # One per minute from lab to billing: under the threshold.
      - series: 'enforcer_policy_verdicts_total{source_segment="lab",destination_segment="billing",direction="ingress",action="dropped",match="none",node="n1"}'
        values: '0+1x20'
      # Allowed traffic, however much, is no violation.
      - series: 'enforcer_policy_verdicts_total{source_segment="radiology",destination_segment="pacs",direction="ingress",action="forwarded",match="rule",node="n1"}'
        values: '0+6000x20'
      - series: 'enforcer_bpf_map_pressure{map_name="CONNTRACK",node="n1"}'
        values: '0.9x20'
      - series: 'enforcer_bpf_map_pressure{map_name="PAIRS_0",node="n1"}'
        values: '0.5x20'
      - series: 'enforcer_policy_reload_failing{node="n1"}'
        values: '0 0 1x18'
      - series: 'enforcer_policy_reload_total{outcome="failure",node="n1"}'
        values: '0 0 1x18'
      - series: 'enforcer_lost_events_total{node="n1"}'
        values: '0+0x5 0+10x14'
      - series: 'enforcer_breakglass_active{source_segment="icu-telemetry",destination_segment="pacs",node="n1"}'
        values: '0x5 1x14'
    alert_rule_test:
      # Pending for its 2 minutes first.
      - eval_time: 2m
        alertname: EnforcerPolicyViolations
        exp_alerts: []
      - eval_time: 10m
        alertname: EnforcerPolicyViolations
        exp_alerts:
          - exp_labels:
              severity: warning
              source_segment: radiology
              destination_segment: billing
            exp_annotations:
              summary: Denied traffic from radiology to billing
              description: >-
                500m packets/s from segment radiology to segment billing are dropped by the
                policy. The flows (addresses, ports, rule) are shown by `enforcer observe
                --verdict deny --from radiology --to billing` on the enforcing nodes.
      - eval_time: 10m
        alertname: EnforcerBpfMapPressure
        exp_alerts:
          - exp_labels:
              severity: warning
              map_name: CONNTRACK
              node: n1
            exp_annotations:
              summary: BPF map CONNTRACK on n1 is over 80% full
              description: >-
                CONNTRACK is 90% full. A full CONNTRACK drops new flows (reason
                conntrack_full); raise `conntrack.max_entries` in segments/defaults.yaml.
      - eval_time: 1m
        alertname: EnforcerPolicyReloadFailing
        exp_alerts: []
      - eval_time: 5m
        alertname: EnforcerPolicyReloadFailing
        exp_alerts:
          - exp_labels:
              severity: critical
              node: n1
            exp_annotations:
              summary: Enforcer on n1 rejects the newest policy
              description: >-
                The policy on disk does not validate, so the last good policy stays in force
                and the change (possibly a fix) is not enforced. The daemon's log has the
                compiler's errors; `policy-compiler check` reproduces them.
      - eval_time: 4m
        alertname: EnforcerLostEvents
        exp_alerts: []
      - eval_time: 15m
        alertname: EnforcerLostEvents
        exp_alerts:
          - exp_labels:
              severity: warning
              node: n1
            exp_annotations:
              summary: Enforcer on n1 loses flow events
              description: >-
                The kernel's event ring buffer overflows: some denied flows never reach the
                flow log or `enforcer observe`. The counters stay exact. Sustained, it means a
                flood or a daemon too slow to read.
      - eval_time: 4m
        alertname: EnforcerBreakGlassActive
        exp_alerts: []
      - eval_time: 6m
        alertname: EnforcerBreakGlassActive
        exp_alerts:
          - exp_labels:
              severity: critical
              source_segment: icu-telemetry
              destination_segment: pacs
              node: n1
            exp_annotations:
              summary: Break-glass access from icu-telemetry to pacs is active on n1
              description: >-
                1 emergency grant(s) override the segmentation policy from segment
                icu-telemetry to segment pacs. `enforcer breakglass list` on the node shows
                who granted them, why and until when; the audit log has every use. Make sure
                it is intended, and revoke it (`enforcer breakglass revoke ID`) when the
                emergency ends.
"#;

#[test]
fn alert_rules_pass_promtool() -> Result<()> {
    let groups = prometheus_rule_groups()?;
    let dir = TempDir::new("rules")?;
    let rules = dir.write("rules.yaml", &groups.to_string())?;
    run(Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(&rules))?;
    let tests = dir.write("rules-test.yaml", RULE_TESTS)?;
    run(Command::new("promtool")
        .args(["test", "rules"])
        .arg(&tests)
        .current_dir(&dir.0))?;

    let exported = exported_metrics()?;
    for group in array_at(&groups, "groups")? {
        for rule in array_at(group, "rules")? {
            let expr = str_at(rule, "expr")?;
            let names = metric_names(expr);
            ensure!(!names.is_empty(), "no metric in {expr}");
            for name in names {
                ensure!(
                    exported.contains(&name) || RULE_METRICS_NOT_EXPORTED.contains(&name.as_str()),
                    "{}: metric {name} is not exported by the daemon",
                    rule["alert"]
                );
            }
        }
    }
    Ok(())
}

/// Every `expr` in the dashboard (panel targets, annotations), with template variables
/// replaced by what "All" selects.
fn dashboard_exprs(dashboard: &Value) -> Vec<String> {
    fn walk(value: &Value, out: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                for (key, v) in map {
                    match (key.as_str(), v) {
                        ("expr", Value::String(expr)) => out.push(expr.clone()),
                        _ => walk(v, out),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut exprs = Vec::new();
    walk(dashboard, &mut exprs);
    exprs
        .into_iter()
        .map(|e| e.replace("$source", ".*").replace("$destination", ".*"))
        .collect()
}

#[test]
fn grafana_dashboard_queries_valid_promql_over_exported_metrics() -> Result<()> {
    let path = deploy().join("grafana/enforcer-dashboard.json");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let dashboard: Value = serde_json::from_str(&text).context("the dashboard is not JSON")?;
    str_at(&dashboard, "title")?;
    str_at(&dashboard, "uid")?;
    let panels = array_at(&dashboard, "panels")?;
    let mut ids = BTreeSet::new();
    for panel in panels {
        ensure!(ids.insert(at(panel, "id")?.to_string()), "panel id twice");
        at(panel, "gridPos.w")?;
    }
    for title in [
        "Denied packets by segment pair",
        "Top denied segment pairs (last hour)",
        "Drops by reason",
        "Policy reloads",
        "Policy revision in force",
        "Lost and rate-limited events",
        "Tracked connections",
        "BPF map pressure",
    ] {
        ensure!(
            panels.iter().any(|p| p["title"] == title),
            "no panel {title:?}"
        );
    }

    let exprs = dashboard_exprs(&dashboard);
    ensure!(exprs.len() >= 10, "only {} queries found", exprs.len());
    // promtool checks PromQL in rule files only: one recording rule per query.
    let rules: Vec<Value> = exprs
        .iter()
        .enumerate()
        .map(|(i, expr)| json!({ "record": format!("dashboard:query_{i}"), "expr": expr }))
        .collect();
    let dir = TempDir::new("dashboard")?;
    let file = dir.write(
        "dashboard-rules.yaml",
        &json!({ "groups": [{ "name": "dashboard", "rules": rules }] }).to_string(),
    )?;
    run(Command::new("promtool").args(["check", "rules"]).arg(&file))?;

    let exported = exported_metrics()?;
    for expr in &exprs {
        let names = metric_names(expr);
        ensure!(!names.is_empty(), "no metric in {expr}");
        for name in names {
            ensure!(
                exported.contains(&name),
                "the dashboard queries {name}, which the daemon does not export: {expr}"
            );
        }
    }
    Ok(())
}

/// The unit installs `/usr/local/bin/enforcer`, and `systemd-analyze verify` fails when the
/// ExecStart binary is missing: a copy of the unit points at the built daemon (`ENFORCER_BIN`),
/// or at an empty executable when there is none (verify only checks that it is executable).
#[test]
fn systemd_unit_passes_systemd_analyze() -> Result<()> {
    let unit_path = deploy().join("systemd/enforcer.service");
    let env_path = deploy().join("systemd/enforcer.env");
    let unit = fs::read_to_string(&unit_path)?;
    let env_file = fs::read_to_string(&env_path)?;

    let settings: BTreeMap<&str, &str> = env_file
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split_once('='))
        .collect();
    for var in [
        "POLICY_DIR",
        "IFACES",
        "METRICS_ADDR",
        "FLOW_LOG",
        "PIN_DIR",
        "AUDIT_LOG",
    ] {
        ensure!(settings.contains_key(var), "enforcer.env lacks {var}");
        ensure!(unit.contains(&format!("${var}")) || unit.contains(&format!("${{{var}}}")));
    }
    ensure!(unit.contains("EnvironmentFile=/etc/enforcer/enforcer.env"));
    ensure!(unit.contains("ExecStart=/usr/local/bin/enforcer run"));
    for flag in [
        "--control-socket=/run/enforcer/control.sock",
        "--state-file=/var/lib/enforcer/state.json",
        "--audit-log=${AUDIT_LOG}",
    ] {
        ensure!(unit.contains(flag), "ExecStart lacks {flag}");
    }
    ensure!(
        settings
            .get("AUDIT_LOG")
            .is_some_and(|log| log.starts_with("/var/log/enforcer/")),
        "the audit log belongs in the LogsDirectory"
    );
    ensure!(unit.contains("ExecReload=/bin/kill -HUP $MAINPID"));
    ensure!(unit.contains("Restart=on-failure"));
    // Restarts and upgrades without a gap; stopping must leave the programs in place.
    ensure!(
        unit.lines()
            .any(|l| l.starts_with("ExecStart=") && l.contains(" --persist")),
        "the unit must run the enforcer with --persist"
    );
    ensure!(
        !unit.lines().any(|l| l.starts_with("ExecStop")),
        "nothing may detach the enforcer when the unit stops"
    );
    for line in [
        "CapabilityBoundingSet=CAP_BPF CAP_NET_ADMIN CAP_PERFMON",
        "AmbientCapabilities=CAP_BPF CAP_NET_ADMIN CAP_PERFMON",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        // The control socket, the state file and the audit log (ProtectSystem=strict leaves
        // only these writable).
        "RuntimeDirectory=enforcer",
        "StateDirectory=enforcer",
        "LogsDirectory=enforcer",
    ] {
        ensure!(unit.lines().any(|l| l == line), "the unit lacks `{line}`");
    }

    let dir = TempDir::new("systemd")?;
    let bin = match std::env::var_os("ENFORCER_BIN") {
        Some(bin) => PathBuf::from(bin),
        None => {
            let stub = dir.write("enforcer", "")?;
            fs::set_permissions(&stub, fs::Permissions::from_mode(0o755))?;
            stub
        }
    };
    let copy = unit
        .replace("/usr/local/bin/enforcer", &bin.display().to_string())
        .replace(
            "/etc/enforcer/enforcer.env",
            &env_path.display().to_string(),
        );
    let copy_path = dir.write("enforcer.service", &copy)?;
    let out = run(Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&copy_path))?;
    // verify exits 0 on unknown settings and bad values, which it only warns about.
    let warnings =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    ensure!(
        warnings.trim().is_empty(),
        "systemd-analyze verify warns:\n{warnings}"
    );
    // A regression of the hardening shows in the exposure score (2.1 today, root with three
    // capabilities; 10 is "unsafe").
    run(Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--threshold=25", "--no-pager"])
        .arg(&copy_path))?;
    Ok(())
}

#[test]
fn containerfile_builds_the_workspace_in_two_stages() -> Result<()> {
    let text = fs::read_to_string(deploy().join("Containerfile"))?;
    let froms: Vec<&str> = text.lines().filter(|l| l.starts_with("FROM ")).collect();
    ensure!(froms.len() == 2, "a build and a runtime stage: {froms:?}");
    ensure!(
        froms[0].ends_with(" AS build"),
        "the first stage is `build`"
    );
    ensure!(text.contains("COPY --from=build /out/enforcer /usr/local/bin/enforcer"));
    ensure!(text.contains("cargo build --release --locked -p enforcer"));
    let copied: BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("COPY "))
        .filter(|l| !l.starts_with("--"))
        .flat_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            words[..words.len().saturating_sub(1)].to_vec()
        })
        .collect();
    let manifest = fs::read_to_string(repo().join("Cargo.toml"))?;
    let members = manifest
        .split_once("members = [")
        .and_then(|(_, rest)| rest.split_once(']'))
        .context("workspace members")?
        .0;
    for member in members
        .split(',')
        .map(|m| m.trim().trim_matches('"'))
        .filter(|m| !m.is_empty())
    {
        ensure!(
            copied.contains(member),
            "the Containerfile does not copy {member}"
        );
    }
    for file in ["Cargo.toml", "Cargo.lock", ".cargo"] {
        ensure!(
            copied.contains(file),
            "the Containerfile does not copy {file}"
        );
    }
    Ok(())
}
