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
