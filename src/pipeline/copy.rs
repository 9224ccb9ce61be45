//! Copy: reading mapped tables in key-ordered chunks, each as insert
//! changes, under a snapshot exported by a temporary replication slot (so
//! the chunk's LSN is known exactly). Used by `snapshot` and `reconcile`.
//!
//! Invariant: a chunk holds exactly the transactions committed before its
//! snapshot's consistent point, and its rows come back in key order after
//! the last key read, so chunks neither overlap nor skip rows.
//!
//! Exported snapshots: <https://www.postgresql.org/docs/current/protocol-replication.html#PROTOCOL-REPLICATION-CREATE-REPLICATION-SLOT>
//! and `SET TRANSACTION SNAPSHOT`.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use tokio_postgres::SimpleQueryMessage;

use crate::decode::message::{RelationBody, RelationColumn, TupleValue};
use crate::decode::{decode_row, RelationCache};
use crate::lsn::Lsn;
use crate::mapping::Mapping;
use crate::source::catalog::{base_types, FIRST_USER_OID};
use crate::source::sql::{quote_ident, quote_literal, quote_qualified};
use crate::source::{ConnInfo, ReplicationStream};
use crate::transactions::{Change, Op};

/// One mapped table as the copy reads it.
pub struct Table {
    /// Schema-qualified name.
    pub name: String,
    /// `SELECT` list, quoted, in column order.
    pub columns: Vec<String>,
    /// Key columns to order and resume by: (quoted name, position, SQL type).
    pub key: Vec<(String, usize, String)>,
    /// The table's shape, as a Relation message would give it.
    pub relation: Arc<crate::decode::Relation>,
}

/// The mapped tables in copy order: node tables first (relationships from
/// join tables then find their end nodes), each by name.
pub fn table_order(mapping: &Mapping) -> Vec<String> {
    let mut nodes: Vec<String> = Vec::new();
    let mut joins: Vec<String> = Vec::new();
    for (name, t) in &mapping.tables {
        if t.node.is_some() {
            nodes.push(name.clone());
        } else {
            joins.push(name.clone());
        }
    }
    nodes.sort();
    joins.sort();
    nodes.extend(joins);
    nodes
}

/// Reads up to `limit` rows of `t` after the key `after` (text values), in
/// key order, as insert changes with their keys as text.
pub async fn read_chunk(
    c: &tokio_postgres::Client,
    t: &Table,
    after: Option<&[String]>,
    limit: usize,
) -> anyhow::Result<Vec<(Change, Vec<String>)>> {
    let order: Vec<&str> = t.key.iter().map(|k| k.0.as_str()).collect();
    let filter = match after {
        Some(key) => {
            let values: Vec<String> = key
                .iter()
                .zip(&t.key)
                .map(|(v, k)| format!("{}::{}", quote_literal(v), k.2))
                .collect();
            format!("WHERE ({}) > ({})", order.join(", "), values.join(", "))
        }
        None => String::new(),
    };
    let sql = format!(
        "SELECT {} FROM {} {filter} ORDER BY {} LIMIT {limit}",
        t.columns.join(", "),
        quote_qualified(&t.name),
        order.join(", "),
    );
    let messages = c
        .simple_query(&sql)
        .await
        .with_context(|| format!("cannot read {}", t.name))?;
    let mut out = Vec::new();
    for m in messages {
        let SimpleQueryMessage::Row(row) = m else {
            continue;
        };
        let tuple: Vec<TupleValue> = (0..t.columns.len())
            .map(|i| match row.get(i) {
                Some(s) => TupleValue::Text(Bytes::copy_from_slice(s.as_bytes())),
                None => TupleValue::Null,
            })
            .collect();
        let new = decode_row(&t.relation, &tuple)?;
        let key = t
            .key
            .iter()
            .map(|k| row.get(k.1).unwrap_or_default().to_string())
            .collect();
        out.push((
            Change {
                relation: Arc::clone(&t.relation),
                op: Op::Insert,
                new: Some(new),
                old: None,
                old_is_full_row: false,
            },
            key,
        ));
    }
    Ok(out)
}

/// Describes table `name` for copying, ordered and resumed by `primary_key`,
/// with the columns the stream carries as the catalog reads them
/// ([`crate::source::catalog::TableInfo::generated`] left out).
pub async fn describe_table(
    pg: &tokio_postgres::Client,
    name: &str,
    primary_key: &[String],
    leave_out: &[String],
) -> anyhow::Result<Table> {
    let rows = pg
        .query(
            "SELECT a.attname::text, a.atttypid::int8, a.atttypmod, format_type(a.atttypid, a.atttypmod),
                    c.oid::int8, n.nspname::text, c.relname::text
             FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
             JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped
               AND a.attgenerated IN ('', 's') AND NOT a.attname = ANY($2)
             ORDER BY a.attnum",
            &[&quote_qualified(name), &leave_out],
        )
        .await
        .with_context(|| format!("cannot read the columns of {name}"))?;
    let Some(first) = rows.first() else {
        bail!("{name} has no columns");
    };
    // Domains are read as their base types, as the stream reads them.
    let user: Vec<u32> = rows
        .iter()
        .map(|r| {
            r.try_get::<_, i64>(1)
                .map(|o| u32::try_from(o).unwrap_or(0))
        })
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .filter(|&o| o >= FIRST_USER_OID)
        .collect();
    let bases = if user.is_empty() {
        HashMap::new()
    } else {
        base_types(pg, &user)
            .await
            .with_context(|| format!("cannot read the column types of {name}"))?
    };
    let oid = u32::try_from(first.try_get::<_, i64>(4)?).unwrap_or(0);
    let body = RelationBody {
        oid,
        namespace: first.try_get(5)?,
        name: first.try_get(6)?,
        replica_identity: b'd',
        columns: rows
            .iter()
            .map(|r| {
                let col: String = r.try_get(0)?;
                Ok(RelationColumn {
                    is_key: primary_key.contains(&col),
                    name: col,
                    type_oid: {
                        let oid = u32::try_from(r.try_get::<_, i64>(1)?).unwrap_or(0);
                        bases.get(&oid).copied().unwrap_or(oid)
                    },
                    type_modifier: r.try_get(2)?,
                })
            })
            .collect::<Result<_, tokio_postgres::Error>>()?,
    };
    let mut cache = RelationCache::default();
    let relation = cache.update(&body);
    let names: Vec<String> = rows
        .iter()
        .map(|r| r.try_get::<_, String>(0))
        .collect::<Result<_, _>>()?;
    if primary_key.is_empty() {
        bail!(
            "{name} has no primary key, which the snapshot needs to copy it in order and resume; add one"
        );
    }
    let key = primary_key
        .iter()
        .map(|k| {
            let pos = names
                .iter()
                .position(|n| n == k)
                .ok_or_else(|| anyhow!("the key column {k} of {name} does not exist"))?;
            Ok((quote_ident(k), pos, rows[pos].try_get::<_, String>(3)?))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Table {
        name: name.to_string(),
        columns: names.iter().map(|n| quote_ident(n)).collect(),
        key,
        relation,
    })
}

/// Opens a repeatable-read transaction on `c` under a snapshot exported by a
/// new temporary replication slot, and returns that slot's consistent point:
/// the transaction sees exactly what committed before it. The slot goes
/// when its connection closes, here; the transaction keeps the snapshot.
pub async fn begin_exported_snapshot(
    info: &ConnInfo,
    c: &tokio_postgres::Client,
    temp_slot: &str,
) -> anyhow::Result<Lsn> {
    let mut repl = ReplicationStream::connect(info).await?;
    // On a standby the slot waits for the primary's next standby snapshot.
    let created = crate::source::standby::nudged(
        info,
        repl.command(&format!(
            "CREATE_REPLICATION_SLOT {temp_slot} TEMPORARY LOGICAL pgoutput EXPORT_SNAPSHOT"
        )),
    )
    .await?;
    let row = created
        .first()
        .ok_or_else(|| anyhow!("CREATE_REPLICATION_SLOT returned nothing"))?;
    let consistent: Lsn = row
        .get(1)
        .cloned()
        .flatten()
        .ok_or_else(|| anyhow!("CREATE_REPLICATION_SLOT returned no consistent point"))?
        .parse()
        .map_err(|e| anyhow!("CREATE_REPLICATION_SLOT returned a bad consistent point: {e}"))?;
    let snapshot_name = row
        .get(2)
        .cloned()
        .flatten()
        .ok_or_else(|| anyhow!("CREATE_REPLICATION_SLOT exported no snapshot"))?;
    tracing::debug!(consistent_lsn = %consistent, snapshot = %snapshot_name, "reading a chunk under an exported snapshot");
    c.batch_execute(&format!(
        "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
        quote_literal(&snapshot_name)
    ))
    .await
    .context("cannot read under the exported snapshot")?;
    drop(repl);
    Ok(consistent)
}
