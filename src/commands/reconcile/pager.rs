//! Paging through a label's nodes or a type's relationships, for the
//! reverse pass of reconcile (what the graph has that Postgres does not).
//!
//! Invariant: every page moves the position forward, or the pass stops
//! with a sentence instead of reading the same page forever.

use neo4rs::{query, BoltType};

/// Reads a label's nodes or a type's relationships back in pages: by a
/// one-property key through its index when there is one (a range seek per
/// page, in the index's order), else by internal id (a scan per page).
pub(super) struct Pager {
    /// `MATCH` pattern binding `var`.
    pub(super) pattern: String,
    pub(super) var: &'static str,
    /// Quoted label or type.
    pub(super) name: String,
    /// Quoted key property, when the key is one property with an index.
    pub(super) key: Option<String>,
    /// What each row returns besides the position.
    pub(super) returned: String,
    pub(super) cursor: Option<BoltType>,
    pub(super) last_id: i64,
}

impl Pager {
    pub(super) fn query(&self, limit: usize) -> neo4rs::Query {
        let (pattern, var, name, returned) = (&self.pattern, self.var, &self.name, &self.returned);
        let text = match (&self.key, &self.cursor) {
            (Some(p), None) => format!(
                "MATCH {pattern} WHERE {var}.{p} IS NOT NULL \
                 RETURN {var}.{p} AS cursor, {returned} ORDER BY {var}.{p} LIMIT $limit"
            ),
            (Some(p), Some(_)) => format!(
                "MATCH {pattern} USING INDEX SEEK {var}:{name}({p}) WHERE {var}.{p} > $after \
                 RETURN {var}.{p} AS cursor, {returned} ORDER BY {var}.{p} LIMIT $limit"
            ),
            (None, _) => format!(
                "MATCH {pattern} WHERE id({var}) > $last_id \
                 RETURN id({var}) AS id, {returned} ORDER BY id LIMIT $limit"
            ),
        };
        query(&text)
            .param(
                "after",
                self.cursor
                    .clone()
                    .unwrap_or(BoltType::Null(neo4rs::BoltNull)),
            )
            .param("last_id", self.last_id)
            .param("limit", i64::try_from(limit).unwrap_or(10_000))
    }

    pub(super) fn position(&self) -> (Option<BoltType>, i64) {
        (self.cursor.clone(), self.last_id)
    }

    pub(super) fn advance(&mut self, row: &neo4rs::Row) {
        if self.key.is_some() {
            if let Ok(c) = row.get::<BoltType>("cursor") {
                self.cursor = Some(c);
            }
        } else {
            self.last_id = row.get::<i64>("id").unwrap_or(self.last_id);
        }
    }

    /// Fails when a page did not move the position (it would repeat forever).
    pub(super) fn check_moved(&self, from: &(Option<BoltType>, i64)) -> anyhow::Result<()> {
        if self.position() == *from {
            anyhow::bail!(
                "reading {} back did not advance past {:?}; a key property of an unexpected type?",
                self.name,
                self.cursor
            );
        }
        Ok(())
    }
}
