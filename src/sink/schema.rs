//! Schema: the uniqueness constraints and edge-key indexes walgraph needs
//! in Neo4j, created by `setup` and checked before streaming.
//!
//! Invariant: every statement is idempotent (`IF NOT EXISTS`), and only the
//! indexes walgraph created are waited for, never the whole database's.

use std::time::Duration;

use neo4rs::query;

use super::{checkpoint, Sink, SinkError};
use crate::mapping::{quote, Mapping};
use crate::retry::retry_transient;

impl Sink {
    /// Creates the uniqueness constraints the mapping needs (and the
    /// checkpoint's); returns the statements that created something.
    /// Transient failures are retried a few times with backoff (every step
    /// is idempotent).
    pub async fn ensure_schema(&self, mapping: &Mapping) -> Result<Vec<String>, SinkError> {
        retry_transient("creating the Neo4j schema failed, retrying", || {
            self.ensure_schema_once(mapping)
        })
        .await
    }

    async fn ensure_schema_once(&self, mapping: &Mapping) -> Result<Vec<String>, SinkError> {
        let checkpoint_name = "walgraph_checkpoint_slot".to_string();
        let mut wanted = vec![(
            checkpoint_name.clone(),
            format!(
                "CREATE CONSTRAINT {} IF NOT EXISTS FOR (c:{}) REQUIRE c.slot IS UNIQUE",
                quote(&checkpoint_name),
                quote(checkpoint::LABEL)
            ),
        )];
        for (label, props) in mapping.node_keys() {
            let name = format!("walgraph_{label}_key");
            let cols: Vec<String> = props.iter().map(|p| format!("n.{}", quote(p))).collect();
            let q = format!(
                "CREATE CONSTRAINT {} IF NOT EXISTS FOR (n:{}) REQUIRE ({}) IS UNIQUE",
                quote(&name),
                quote(&label),
                cols.join(", ")
            );
            wanted.push((name, q));
        }
        for (label, props) in mapping.history_keys() {
            let version = crate::mapping::events::version_label(&label);
            let name = format!("walgraph_{version}_key");
            let cols: Vec<String> = props.iter().map(|p| format!("v.{}", quote(p))).collect();
            let q = format!(
                "CREATE INDEX {} IF NOT EXISTS FOR (v:{}) ON ({})",
                quote(&name),
                quote(&version),
                cols.join(", ")
            );
            wanted.push((name, q));
        }
        for (rel_type, cols) in mapping.edge_keys() {
            let name = format!("walgraph_{rel_type}_key");
            let cols: Vec<String> = cols.iter().map(|p| format!("r.{}", quote(p))).collect();
            let q = format!(
                "CREATE INDEX {} IF NOT EXISTS FOR ()-[r:{}]-() ON ({})",
                quote(&name),
                quote(&rel_type),
                cols.join(", ")
            );
            wanted.push((name, q));
        }
        // Statements for what exists already are skipped: a schema statement
        // takes schema locks even when `IF NOT EXISTS` makes it a no-op.
        let before = self.schema_names().await?;
        let mut ours = Vec::new();
        for (name, q) in &wanted {
            ours.push(name.clone());
            if before.contains(name) {
                continue;
            }
            self.timed("creating constraints", async {
                self.graph.run(query(q)).await.map_err(|e| self.err(e))?;
                Ok(())
            })
            .await?;
        }
        // A constraint's index may still be populating; until it is online
        // the planner falls back to label scans, and a plan chosen then
        // stays cached.
        self.await_indexes(&ours).await?;
        let mut after = self.schema_names().await?;
        after.sort();
        after.dedup();
        Ok(after.into_iter().filter(|n| !before.contains(n)).collect())
    }

    /// Waits until the named indexes (and the indexes behind the named
    /// constraints) are online, at most four times `neo4j.timeout`. Polls
    /// `SHOW INDEXES` rather than `db.awaitIndexes`, which waits for every
    /// index in the database and, blocking longer than `neo4j.timeout`,
    /// would trip the driver's read timeout.
    pub async fn await_indexes(&self, names: &[String]) -> Result<(), SinkError> {
        let limit = self.timeout * 4;
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let mut pending = Vec::new();
            let rows = self
                .fetch(
                    "waiting for indexes to come online",
                    query(
                        "SHOW INDEXES YIELD name, owningConstraint, state, failureMessage \
                         WHERE name IN $names OR owningConstraint IN $names \
                         RETURN name, state, failureMessage",
                    )
                    .param("names", names.to_vec()),
                )
                .await?;
            for row in rows {
                let name: String = row.get("name").unwrap_or_default();
                let state: String = row.get("state").unwrap_or_default();
                match state.as_str() {
                    "ONLINE" => {}
                    "FAILED" => {
                        let why: String = row.get("failureMessage").unwrap_or_default();
                        return Err(SinkError::Rejected(format!(
                            "index {name} failed to build: {why}; drop it \
                             (DROP INDEX/CONSTRAINT) and run walgraph setup again"
                        )));
                    }
                    _ => pending.push(name),
                }
            }
            if pending.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(SinkError::Transient(format!(
                    "indexes {} were not online after {limit:?}",
                    pending.join(", ")
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Labels with their key properties that lack a uniqueness constraint,
    /// and relationship types whose edge key lacks an index (walgraph's
    /// statements name these indexes in hints, so they must exist).
    pub async fn missing_constraints(&self, mapping: &Mapping) -> Result<Vec<String>, SinkError> {
        // (kind, labels or types, properties)
        let mut have: Vec<(String, Vec<String>, Vec<String>)> = Vec::new();
        for q in [
            "SHOW CONSTRAINTS YIELD labelsOrTypes, properties, type WHERE type = 'UNIQUENESS' \
             RETURN 'node' AS kind, labelsOrTypes, properties",
            "SHOW INDEXES YIELD labelsOrTypes, properties, type, entityType \
             WHERE type = 'RANGE' AND entityType = 'RELATIONSHIP' \
             RETURN 'relationship' AS kind, labelsOrTypes, properties",
            "SHOW INDEXES YIELD labelsOrTypes, properties, type, entityType, owningConstraint \
             WHERE type = 'RANGE' AND entityType = 'NODE' AND owningConstraint IS NULL \
             RETURN 'node index' AS kind, labelsOrTypes, properties",
        ] {
            for row in self.fetch("reading constraints", query(q)).await? {
                let kind: String = row.get("kind").unwrap_or_default();
                let labels: Vec<String> = row.get("labelsOrTypes").unwrap_or_default();
                let props: Vec<String> = row.get("properties").unwrap_or_default();
                have.push((kind, labels, props));
            }
        }
        let lacks = |kind: &str, name: &str, props: &[String]| {
            !have
                .iter()
                .any(|(k, l, p)| k == kind && l.len() == 1 && l[0] == name && p == props)
        };
        let mut missing = Vec::new();
        for (label, props) in mapping.node_keys() {
            let props: Vec<String> = props.iter().map(|p| p.to_string()).collect();
            if lacks("node", &label, &props) {
                missing.push(format!(
                    "a uniqueness constraint on {label}({})",
                    props.join(", ")
                ));
            }
        }
        for (label, props) in mapping.history_keys() {
            let version = crate::mapping::events::version_label(&label);
            let props: Vec<String> = props.iter().map(|p| p.to_string()).collect();
            if lacks("node index", &version, &props) {
                missing.push(format!("an index on {version}({})", props.join(", ")));
            }
        }
        for (rel_type, props) in mapping.edge_keys() {
            if lacks("relationship", &rel_type, &props) {
                missing.push(format!("an index on [:{rel_type}]({})", props.join(", ")));
            }
        }
        Ok(missing)
    }

    async fn schema_names(&self) -> Result<Vec<String>, SinkError> {
        let mut names = Vec::new();
        for q in [
            "SHOW CONSTRAINTS YIELD name RETURN name",
            "SHOW INDEXES YIELD name RETURN name",
        ] {
            for row in self.fetch("reading the schema", query(q)).await? {
                if let Ok(n) = row.get::<String>("name") {
                    names.push(n);
                }
            }
        }
        Ok(names)
    }
}
