//! What `deploy/` ships, checked rather than only written: the Grafana
//! dashboard and the Prometheus alert rules name only metrics `/metrics`
//! serves.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::support::{eventually, free_address, http_get, Fixture, SERVICES};

const DDL: &str = "CREATE TABLE {s}.items (id int PRIMARY KEY, qty int NOT NULL);";
const MAPPING: &str = "[[node]]\ntable = \"{s}.items\"\nlabel = \"{p}Item\"\n";

/// Every `walgraph_…` name in a file.
fn metric_names(path: &str) -> BTreeSet<String> {
    let text = std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR")))
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut out = BTreeSet::new();
    let mut rest = text.as_str();
    while let Some(at) = rest.find("walgraph_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        out.insert(name);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_the_alert_rules_name_only_metrics_walgraph_serves() {
    let _shared = SERVICES.read().await;
    let mut fx = Fixture::new(DDL, MAPPING).await;
    fx.setup().await;
    let addr = free_address();
    fx.config.http.listen = Some(addr);
    let run = fx.start_serving().await;
    fx.sql("INSERT INTO {s}.items SELECT g, g FROM generate_series(1, 10) g")
        .await;
    let body = eventually(
        Duration::from_secs(60),
        "the changes and the slot in /metrics",
        || async {
            http_get(&addr.to_string(), "/metrics")
                .await
                .map(|r| r.1)
                .filter(|b| {
                    b.contains("walgraph_changes_applied_total 10")
                        && b.contains("walgraph_slot_active 1")
                })
        },
    )
    .await;
    let served: BTreeSet<&str> = body
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let dashboard = metric_names("deploy/grafana/walgraph.json");
    let rules = metric_names("deploy/prometheus/alerts.yml");
    assert!(
        dashboard.len() >= 10 && rules.len() >= 6,
        "{dashboard:?} {rules:?}"
    );
    for name in dashboard.iter().chain(&rules) {
        assert!(
            served.contains(name.as_str()),
            "{name} is not served by /metrics:\n{body}"
        );
    }
    // The dashboard is JSON Grafana can import; every rule has an
    // expression and a severity.
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/grafana/walgraph.json"
    ))
    .expect("dashboard");
    let dash: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    assert_eq!(dash["uid"], "walgraph");
    assert!(dash["panels"].as_array().is_some_and(|p| p.len() >= 10));
    let rules_text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/prometheus/alerts.yml"
    ))
    .expect("rules");
    let alerts = rules_text.matches("- alert:").count();
    assert_eq!(
        alerts,
        rules_text.matches("expr:").count(),
        "each rule has an expr"
    );
    assert_eq!(
        alerts,
        rules_text.matches("severity:").count(),
        "each rule has a severity"
    );
    run.stop().await;
    fx.cleanup().await;
}

fn repo_file(path: &str) -> String {
    std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR")))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn scratch_dir(what: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("walgraph-{what}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

#[test]
fn the_systemd_unit_verifies_and_is_hardened() {
    let unit = repo_file("deploy/systemd/walgraph.service");
    for want in [
        "DynamicUser=yes",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "CacheDirectory=walgraph",
        "LoadCredential=neo4j-password:",
        "Environment=WALGRAPH_NEO4J_PASSWORD_FILE=%d/neo4j-password",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
    ] {
        assert!(unit.contains(want), "the unit lacks {want}");
    }
    // Verified as installed: the binary where ExecStart says (here, the
    // one just built) and the manual page its Documentation= names.
    let dir = scratch_dir("systemd");
    let man = dir.join("man/man1");
    std::fs::create_dir_all(&man).expect("man dir");
    let page = std::process::Command::new(env!("CARGO_BIN_EXE_walgraph"))
        .arg("man")
        .output()
        .expect("walgraph man");
    std::fs::write(man.join("walgraph.1"), page.stdout).expect("man page");
    let file = dir.join("walgraph.service");
    std::fs::write(
        &file,
        unit.replace(
            "/usr/local/bin/walgraph ",
            &format!("{} ", env!("CARGO_BIN_EXE_walgraph")),
        ),
    )
    .expect("unit");
    let verify = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&file)
        .env("MANPATH", dir.join("man"))
        .output()
        .expect("systemd-analyze (deploy/local/services tools installs it)");
    assert!(
        verify.status.success() && verify.stderr.is_empty(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&verify.stderr)
    );
    let security = std::process::Command::new("systemd-analyze")
        .args(["security", "--offline=yes"])
        .arg(&file)
        .output()
        .expect("systemd-analyze security");
    let text = String::from_utf8_lossy(&security.stdout);
    let exposure: f64 = text
        .lines()
        .find_map(|l| l.split("walgraph.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level: {text}"));
    assert!(exposure <= 2.0, "exposure {exposure} (of 10): {text}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_kubernetes_manifests_validate_against_the_api_schemas() {
    let validate = std::env::var("WALGRAPH_KUBERNETES_VALIDATE").expect(
        "WALGRAPH_KUBERNETES_VALIDATE (deploy/local/services tools installs it, env names it)",
    );
    let dir = format!("{}/deploy/kubernetes", env!("CARGO_MANIFEST_DIR"));
    let files = ["config.yaml", "deployment.yaml", "sidecar.yaml"];
    let out = std::process::Command::new(&validate)
        .arg("--strict")
        .args(files.iter().map(|f| format!("{dir}/{f}")))
        .output()
        .expect("kubernetes-validate");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{said}");
    assert_eq!(said.matches(" passed ").count(), 5, "{said}");
    // And a broken one is caught.
    let bad = scratch_dir("kubernetes").join("bad.yaml");
    std::fs::write(
        &bad,
        repo_file("deploy/kubernetes/deployment.yaml").replace("replicas: 1", "replicas: one"),
    )
    .expect("bad manifest");
    let out = std::process::Command::new(&validate)
        .arg("--strict")
        .arg(&bad)
        .output()
        .expect("kubernetes-validate");
    assert!(!out.status.success(), "a broken manifest must fail");

    let deployment = repo_file("deploy/kubernetes/deployment.yaml");
    for want in [
        "type: Recreate",
        "replicas: 1",
        "path: /health",
        "path: /ready",
        "secretName: walgraph-credentials",
        "name: walgraph-config",
        "prometheus.io/scrape: \"true\"",
        "runAsNonRoot: true",
    ] {
        assert!(deployment.contains(want), "deployment.yaml lacks {want}");
    }
    let sidecar = repo_file("deploy/kubernetes/sidecar.yaml");
    assert!(sidecar.contains("- name: postgres") && sidecar.contains("- name: walgraph"));
    // The ConfigMap's configuration is one walgraph reads.
    let config = repo_file("deploy/kubernetes/config.yaml");
    let toml: String = config
        .lines()
        .skip_while(|l| !l.contains("walgraph.toml: |"))
        .skip(1)
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| format!("{}\n", l.get(4..).unwrap_or("")))
        .collect();
    let cfg = walgraph::config::Config::parse(&toml)
        .unwrap_or_else(|e| panic!("the ConfigMap's walgraph.toml: {e}\n{toml}"));
    assert_eq!(cfg.nodes.len(), 1);
    assert!(cfg.http.listen.is_some(), "the probes need [http] listen");
}

#[test]
fn the_containerfile_builds_in_two_stages_and_runs_as_a_user() {
    let file = repo_file("Containerfile");
    let froms: Vec<&str> = file.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(froms.len(), 2, "{froms:?}");
    assert!(froms[0].contains(" AS build"), "{froms:?}");
    assert!(
        !froms[1].contains("rust"),
        "the final image holds no toolchain"
    );
    assert!(file.contains("COPY --from=build"));
    assert!(file.contains("USER 10001"), "runs as a non-root user");
    assert!(file.contains("cargo build --release --locked"));
}
