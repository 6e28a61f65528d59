//! The dependency direction ARCHITECTURE.md draws, checked on the graph
//! cargo resolves: `cargo metadata` for this host, normal dependencies
//! only (a test may reach further than the code it tests). Prints every
//! rule with PASS or FAIL and what breaks it, then fails if any is broken.
//!
//! Run: `cargo test --release -p dermascope-testkit --test dependency_rules -- --nocapture`

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use serde_json::Value;

/// The binary: the only crate that may parse arguments, add context with
/// anyhow, or name the Linux drivers.
const BINARY: &str = "dermascope";
const DEVICE: &str = "dermascope-device";
const DEVICE_LINUX: &str = "dermascope-device-linux";
const PIPELINE: &str = "dermascope-pipeline";
const LIBRARY: &str = "dermascope-library";
const UI: &str = "dermascope-ui";
const SYNC: &str = "dermascope-sync";
/// Signed bundles and the installer: kept apart from what it installs.
const UPDATE: &str = "dermascope-update";
/// The wire contract both sides of the fleet link compile against.
const CLOUD_API: &str = "dermascope-cloud-api";
/// The fleet service's library, and its operator's binary.
const CLOUD: &str = "dermascope-cloud";
const CLOUD_CLI: &str = "dermascope-cloud-cli";
/// The fleet operator's update tool: signs and verifies bundles exactly as
/// a device does, so it alone on the service's side uses a device crate.
const FLEET: &str = "dermascope-fleet";

/// What the handheld runs: none of it may reach the service.
const DEVICE_SIDE: [&str; 14] = [
    BINARY,
    "dermascope-encoder",
    "dermascope-adapter",
    "dermascope-store",
    "dermascope-eval",
    "dermascope-quality",
    DEVICE,
    DEVICE_LINUX,
    UI,
    PIPELINE,
    LIBRARY,
    SYNC,
    UPDATE,
    "dermascope-durable",
];

/// Crates that tie a build to the handheld's OS and hardware.
const HARDWARE: [&str; 4] = ["v4l", "v4l2-sys-mit", "rppal", "libc"];

/// Crates that know nothing of each other: only the pipeline, the library
/// and the binary wire them.
const LEAVES: [&str; 7] = [
    "dermascope-encoder",
    "dermascope-adapter",
    "dermascope-store",
    "dermascope-eval",
    "dermascope-quality",
    DEVICE,
    UI,
];

/// The resolved graph: for each package name, its normal dependencies.
struct Graph {
    direct: BTreeMap<String, BTreeSet<String>>,
    /// Workspace members with a library target.
    libraries: BTreeSet<String>,
    members: BTreeSet<String>,
    host: String,
}

impl Graph {
    fn load() -> Graph {
        let host = host_triple();
        // --filter-platform: resolving for every platform would need crates
        // for Windows that an offline machine never downloaded.
        let output = Command::new(env!("CARGO"))
            .args(["metadata", "--format-version", "1", "--offline"])
            .args(["--filter-platform", &host])
            .current_dir(dermascope_testkit::workspace_root())
            .output()
            .expect("running cargo metadata");
        assert!(
            output.status.success(),
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let metadata: Value = serde_json::from_slice(&output.stdout).expect("metadata is JSON");
        let name_of: BTreeMap<&str, &str> = metadata["packages"]
            .as_array()
            .expect("packages")
            .iter()
            .map(|p| (p["id"].as_str().unwrap(), p["name"].as_str().unwrap()))
            .collect();
        let member_ids: BTreeSet<&str> = metadata["workspace_members"]
            .as_array()
            .expect("workspace_members")
            .iter()
            .map(|id| id.as_str().unwrap())
            .collect();
        let libraries = metadata["packages"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| member_ids.contains(p["id"].as_str().unwrap()))
            .filter(|p| {
                p["targets"].as_array().unwrap().iter().any(|t| {
                    t["kind"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|k| k == "lib" || k == "rlib")
                })
            })
            .map(|p| p["name"].as_str().unwrap().to_string())
            .collect();
        let mut direct = BTreeMap::new();
        for node in metadata["resolve"]["nodes"].as_array().expect("resolve") {
            let name = name_of[node["id"].as_str().unwrap()];
            let deps: BTreeSet<String> = node["deps"]
                .as_array()
                .unwrap()
                .iter()
                // A dependency kind of null is a normal one ("dev", "build"
                // are the others).
                .filter(|dep| {
                    dep["dep_kinds"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|kind| kind["kind"].is_null())
                })
                .map(|dep| name_of[dep["pkg"].as_str().unwrap()].to_string())
                .collect();
            direct
                .entry(name.to_string())
                .or_insert_with(BTreeSet::new)
                .extend(deps);
        }
        let members = member_ids
            .iter()
            .map(|id| name_of[id].to_string())
            .collect();
        Graph {
            direct,
            libraries,
            members,
            host,
        }
    }

    fn direct(&self, package: &str) -> BTreeSet<String> {
        self.direct.get(package).cloned().unwrap_or_default()
    }

    /// Everything `package` reaches through normal dependencies.
    fn reaches(&self, package: &str) -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut todo = vec![package.to_string()];
        while let Some(next) = todo.pop() {
            for dep in self.direct(&next) {
                if seen.insert(dep.clone()) {
                    todo.push(dep);
                }
            }
        }
        seen
    }

    /// Workspace members other than `allowed` that depend directly on any
    /// of `crates`, as "member -> crate" lines.
    fn direct_users(&self, crates: &[&str], allowed: &[&str]) -> Vec<String> {
        let mut broken = Vec::new();
        for member in &self.members {
            if allowed.contains(&member.as_str()) {
                continue;
            }
            for dep in self.direct(member) {
                if crates.contains(&dep.as_str()) {
                    broken.push(format!("{member} -> {dep}"));
                }
            }
        }
        broken
    }

    /// `package`'s normal dependencies, direct or not, among `forbidden`.
    fn reached(&self, package: &str, forbidden: &[&str]) -> Vec<String> {
        self.reaches(package)
            .into_iter()
            .filter(|dep| forbidden.contains(&dep.as_str()))
            .map(|dep| format!("{package} ->* {dep}"))
            .collect()
    }
}

/// The crates `cargo build -p package` compiles as its normal
/// dependencies, direct or not, among `forbidden`, from `cargo tree`, which
/// resolves features as the build does. cargo metadata's resolve also lists
/// optional dependencies that only a weak feature (`libc?/std`) names and
/// the build leaves out (rust-lang/cargo#10801): rustix, which calls the
/// kernel itself, lists libc so.
fn built(package: &str, host: &str, forbidden: &[&str]) -> Vec<String> {
    let output = Command::new(env!("CARGO"))
        .args(["tree", "--offline", "-e", "normal", "--prefix", "none"])
        .args(["--format", "{p}", "--target", host, "-p", package])
        .current_dir(dermascope_testkit::workspace_root())
        .output()
        .expect("running cargo tree");
    assert!(
        output.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let names: BTreeSet<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .skip(1)
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_string)
        .collect();
    assert!(
        !names.is_empty(),
        "cargo tree listed nothing for {package}: is its output read right?"
    );
    names
        .into_iter()
        .filter(|dep| forbidden.contains(&dep.as_str()))
        .map(|dep| format!("{package} ->* {dep} (as cargo builds it)"))
        .collect()
}

fn host_triple() -> String {
    let output = Command::new("rustc")
        .arg("-vV")
        .output()
        .expect("running rustc -vV");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find_map(|line| line.strip_prefix("host: "))
        .expect("rustc -vV names the host")
        .to_string()
}

/// One rule and what breaks it (empty: it holds).
struct Rule {
    name: String,
    broken: Vec<String>,
}

fn rules(graph: &Graph) -> Vec<Rule> {
    let mut rules = Vec::new();
    let mut rule = |name: &str, broken: Vec<String>| {
        rules.push(Rule {
            name: name.to_string(),
            broken,
        })
    };
    let libraries: Vec<&str> = graph.libraries.iter().map(String::as_str).collect();

    rule(
        "only dermascope-device-linux depends on v4l or rppal",
        graph.direct_users(&["v4l", "rppal"], &[DEVICE_LINUX]),
    );
    rule(
        "v4l and rppal are reached only through dermascope-device-linux",
        graph
            .members
            .iter()
            .filter(|m| m.as_str() != DEVICE_LINUX && !graph.reaches(m).contains(DEVICE_LINUX))
            .flat_map(|m| graph.reached(m, &["v4l", "rppal"]))
            .collect(),
    );
    rule(
        "dermascope-device (the traits) builds no hardware crate (v4l, v4l2-sys-mit, rppal, libc)",
        built(DEVICE, &graph.host, &HARDWARE),
    );
    rule(
        "dermascope-ui builds no hardware crate (v4l, v4l2-sys-mit, rppal, libc)",
        built(UI, &graph.host, &HARDWARE),
    );
    rule(
        "only the binary depends on dermascope-device-linux",
        graph.direct_users(&[DEVICE_LINUX], &[BINARY]),
    );
    rule(
        "dermascope-device-linux depends on no crate of ours but dermascope-device",
        graph
            .direct(DEVICE_LINUX)
            .into_iter()
            .filter(|dep| graph.members.contains(dep) && dep != DEVICE)
            .map(|dep| format!("{DEVICE_LINUX} -> {dep}"))
            .collect(),
    );
    rule(
        "dermascope-durable (the atomic-write helper every crate may use) depends on nothing",
        graph
            .direct("dermascope-durable")
            .into_iter()
            .map(|dep| format!("dermascope-durable -> {dep}"))
            .collect(),
    );
    rule(
        "dermascope-pipeline reaches neither dermascope-device-linux, v4l nor rppal",
        graph.reached(PIPELINE, &[DEVICE_LINUX, "v4l", "rppal"]),
    );
    rule(
        "only the three binaries (dermascope, dermascope-cloud, dermascope-fleet) depend on clap",
        graph.direct_users(&["clap"], &[BINARY, CLOUD_CLI, FLEET]),
    );
    rule(
        "the wire contract depends on serde, serde_json, base64 and thiserror only",
        graph
            .direct(CLOUD_API)
            .into_iter()
            .filter(|dep| !["serde", "serde_json", "base64", "thiserror"].contains(&dep.as_str()))
            .map(|dep| format!("{CLOUD_API} -> {dep}"))
            .collect(),
    );
    rule(
        "nothing the handheld runs reaches the fleet service (only its wire contract)",
        DEVICE_SIDE
            .iter()
            .flat_map(|member| graph.reached(member, &[CLOUD, CLOUD_CLI]))
            .collect(),
    );
    rule(
        "the fleet service reaches no device crate, sled nor tract",
        [CLOUD, CLOUD_CLI]
            .iter()
            .flat_map(|service| {
                let mut forbidden: Vec<&str> = DEVICE_SIDE.to_vec();
                forbidden.extend(["sled", "tract-onnx", "tract-core"]);
                graph.reached(service, &forbidden)
            })
            .collect(),
    );
    rule(
        "the operator's dermascope-fleet reaches, of the device crates, only dermascope-update and dermascope-durable",
        {
            let mut forbidden: Vec<&str> = DEVICE_SIDE
                .iter()
                .copied()
                .filter(|c| ![UPDATE, "dermascope-durable"].contains(c))
                .collect();
            forbidden.extend(["sled", "tract-onnx", "tract-core"]);
            graph.reached(FLEET, &forbidden)
        },
    );
    rule(
        "dermascope-update depends on no crate of ours but dermascope-durable",
        graph
            .direct(UPDATE)
            .into_iter()
            .filter(|dep| graph.members.contains(dep) && dep != "dermascope-durable")
            .map(|dep| format!("{UPDATE} -> {dep}"))
            .collect(),
    );
    rule(
        "dermascope-sync reaches neither pipeline, device, ui nor encoder",
        graph.reached(SYNC, &[PIPELINE, DEVICE, UI, "dermascope-encoder"]),
    );
    rule(
        "only dermascope-sync and the fleet service talk HTTP (reqwest, axum)",
        graph.direct_users(&["reqwest", "axum", "axum-server"], &[SYNC, CLOUD]),
    );
    rule(
        "no library crate depends on anyhow",
        libraries
            .iter()
            .filter(|lib| graph.direct(lib).contains("anyhow"))
            .map(|lib| format!("{lib} -> anyhow"))
            .collect(),
    );
    rule(
        "no library crate depends on the binary",
        libraries
            .iter()
            .flat_map(|lib| graph.reached(lib, &[BINARY]))
            .collect(),
    );
    rule(
        "encoder, adapter, store, eval, quality, device and ui reach none of each other",
        LEAVES
            .iter()
            .flat_map(|leaf| graph.reached(leaf, &LEAVES))
            .collect(),
    );
    rule(
        "dermascope-library reaches neither pipeline, device nor ui",
        graph.reached(LIBRARY, &[PIPELINE, DEVICE, UI]),
    );
    rules
}

#[test]
fn dependency_rules_hold() {
    let graph = Graph::load();
    // A rule about a crate that is not there would pass vacuously.
    for name in [
        BINARY,
        DEVICE,
        DEVICE_LINUX,
        PIPELINE,
        LIBRARY,
        SYNC,
        UPDATE,
        CLOUD_API,
        CLOUD,
        CLOUD_CLI,
        FLEET,
    ]
    .iter()
    .chain(LEAVES.iter())
    {
        assert!(
            graph.members.contains(*name),
            "{name} is not a workspace member: update the rules"
        );
    }
    assert!(
        graph.direct(DEVICE_LINUX).contains("v4l") && graph.direct(BINARY).contains("clap"),
        "the graph lacks the edges the rules allow: is cargo metadata's resolve read right?"
    );
    let rules = rules(&graph);
    let mut table = format!(
        "dependency rules ({} workspace crates, normal dependencies, resolved for {}):\n",
        graph.members.len(),
        graph.host
    );
    for rule in &rules {
        let verdict = if rule.broken.is_empty() {
            "PASS"
        } else {
            "FAIL"
        };
        table.push_str(&format!("  {verdict}  {}\n", rule.name));
        for line in &rule.broken {
            table.push_str(&format!("          broken by {line}\n"));
        }
    }
    let failed = rules.iter().filter(|r| !r.broken.is_empty()).count();
    table.push_str(&format!(
        "{} rules: {} passed, {failed} failed\n",
        rules.len(),
        rules.len() - failed
    ));
    println!("{table}");
    assert_eq!(failed, 0, "dependency rules broken:\n{table}");
}
