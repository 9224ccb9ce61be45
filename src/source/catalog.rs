//! Catalog: what the source database says about itself — tables, keys,
//! replica identity, `wal_level`, the publication and the slot — read over a
//! regular (non-replication) connection.
//!
//! Invariant: it only reads, except the few calls named for what they
//! create or drop (publication, slot), each idempotent.

use std::collections::HashMap;

use tokio_postgres::Client;

use super::sql::{quote_ident, quote_qualified};
use super::{ConnInfo, SourceError};
use crate::lsn::Lsn;

/// What the catalog says about one table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableInfo {
    /// Column names in order, without the generated columns the stream
    /// does not carry: logical replication sends none before PostgreSQL
    /// 18, and from 18 on stored ones when the publication has
    /// `publish_generated_columns = stored` — walgraph maps what the stream
    /// carries, and copies the same.
    pub columns: Vec<String>,
    /// The columns' types, aligned with `columns`: built-in type OIDs, a
    /// domain given as its base type (see [`base_types`]).
    pub types: Vec<u32>,
    /// Generated columns the stream does not carry, left out of `columns`.
    pub generated: Vec<String>,
    /// Primary key columns (empty without one).
    pub primary_key: Vec<String>,
    /// Column sets of unique constraints and unique indexes (including the primary key).
    pub unique: Vec<Vec<String>>,
    /// `relreplident` as a character.
    pub replica_identity: char,
    /// The columns of the replica identity index (`REPLICA IDENTITY USING
    /// INDEX`), in index order; empty otherwise.
    pub identity_index: Vec<String>,
    /// Columns that allow NULL.
    pub nullable: Vec<String>,
    /// The table's OID (0 where unknown).
    pub oid: u32,
}

impl TableInfo {
    /// The columns Postgres sends of a deleted or re-keyed row: `None` with
    /// `REPLICA IDENTITY FULL` (all of them), else the identity index's or
    /// the primary key's.
    pub fn identity_columns(&self) -> Option<&[String]> {
        match self.replica_identity {
            'f' => None,
            'i' => Some(&self.identity_index),
            _ => Some(&self.primary_key),
        }
    }
}

/// Tables by schema-qualified name.
pub type Catalog = HashMap<String, TableInfo>;

/// A regular SQL connection to the source database.
pub struct PgClient {
    client: Client,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for PgClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Why talking to the catalog failed.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// Could not connect.
    #[error("cannot connect to Postgres at {target}: {message}")]
    Connect {
        /// The target, without the password.
        target: String,
        /// What went wrong.
        message: String,
        /// Retrying may help: the server was unreachable or said so by
        /// SQLSTATE (not a wrong password or a missing database).
        transient: bool,
    },
    /// A query failed.
    #[error("Postgres said: {message}")]
    Query {
        /// What the server (or the connection) said.
        message: String,
        /// Retrying may help (the connection broke, or the SQLSTATE says so).
        transient: bool,
    },
    /// The database is not set up the way walgraph needs.
    #[error("{0}")]
    NotReady(String),
}

impl CatalogError {
    /// Whether retrying later may succeed (the server was unreachable).
    pub fn is_transient(&self) -> bool {
        match self {
            CatalogError::Connect { transient, .. } | CatalogError::Query { transient, .. } => {
                *transient
            }
            CatalogError::NotReady(_) => false,
        }
    }
}

pub(crate) fn db_error(e: tokio_postgres::Error) -> CatalogError {
    match e.as_db_error() {
        Some(d) => CatalogError::Query {
            message: match d.hint() {
                Some(h) => format!("{} (hint: {h})", d.message()),
                None => d.message().to_string(),
            },
            transient: super::sqlstate_is_transient(d.code().code()),
        },
        // No answer from the server: the connection broke.
        None => CatalogError::Query {
            message: e.to_string(),
            transient: e.is_closed()
                || std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>()),
        },
    }
}

impl From<CatalogError> for SourceError {
    fn from(e: CatalogError) -> Self {
        SourceError::Definite(e.to_string())
    }
}

/// The first OID of a type a user created; those below are built in.
pub const FIRST_USER_OID: u32 = 16384;

/// For each of `oids` that is a domain or an array of domains, the built-in
/// type whose text form its values have (a domain over a domain followed to
/// the end; an array of a domain over `int4` is `int4[]`). Other OIDs map
/// to themselves, so a caller can remember that it asked.
pub async fn base_types(
    client: &Client,
    oids: &[u32],
) -> Result<HashMap<u32, u32>, tokio_postgres::Error> {
    // oid -> (typtype, typbasetype, typelem, typarray)
    let mut known: HashMap<u32, (String, u32, u32, u32)> = HashMap::new();
    let mut want: Vec<u32> = oids.to_vec();
    // Each round follows one more step of a domain chain; chains are short.
    for _ in 0..32 {
        want.retain(|o| *o != 0 && !known.contains_key(o));
        want.sort_unstable();
        want.dedup();
        if want.is_empty() {
            break;
        }
        let rows = client
            .query(
                "SELECT oid, typtype::text, typbasetype, typelem, typarray FROM pg_type WHERE oid = ANY($1)",
                &[&want],
            )
            .await?;
        want.clear();
        for r in rows {
            let oid: u32 = r.try_get(0)?;
            let kind: String = r.try_get(1)?;
            let base: u32 = r.try_get(2)?;
            let elem: u32 = r.try_get(3)?;
            let array: u32 = r.try_get(4)?;
            if kind == "d" {
                want.push(base);
            }
            want.push(elem);
            known.insert(oid, (kind, base, elem, array));
        }
    }
    fn resolve(known: &HashMap<u32, (String, u32, u32, u32)>, oid: u32, depth: u32) -> u32 {
        if depth > 32 {
            return oid;
        }
        match known.get(&oid) {
            Some((kind, base, _, _)) if kind == "d" => resolve(known, *base, depth + 1),
            Some((_, _, elem, _)) if known.get(elem).is_some_and(|e| e.0 == "d") => {
                let b = resolve(known, *elem, depth + 1);
                known
                    .get(&b)
                    .map(|t| t.3)
                    .filter(|a| *a != 0)
                    .unwrap_or(oid)
            }
            _ => oid,
        }
    }
    Ok(oids.iter().map(|&o| (o, resolve(&known, o, 0))).collect())
}

/// The state of a replication slot.
#[derive(Debug, Clone)]
pub struct SlotInfo {
    /// The output plugin.
    pub plugin: String,
    /// A walsender is using it.
    pub active: bool,
    /// `confirmed_flush_lsn`.
    pub confirmed_flush_lsn: Option<Lsn>,
    /// `restart_lsn`.
    pub restart_lsn: Option<Lsn>,
    /// A failover slot (PostgreSQL 17+; `None` before).
    pub failover: Option<bool>,
    /// On a standby: synchronized from the primary (17+).
    pub synced: Option<bool>,
    /// Invalidated by a recovery conflict (16+).
    pub conflicting: Option<bool>,
    /// Why it was invalidated (17+): `wal_removed`, `rows_removed`,
    /// `wal_level_insufficient`, `idle_timeout` (18).
    pub invalidation_reason: Option<String>,
}

impl PgClient {
    /// Connects.
    pub async fn connect(info: &ConnInfo) -> Result<PgClient, CatalogError> {
        let tls = info.tls_config().map_err(|e| CatalogError::Connect {
            target: info.to_string(),
            message: e.0,
            transient: false,
        })?;
        let (client, conn) = info
            .to_tokio_config()
            .connect(tokio_postgres_rustls::MakeRustlsConnect::new(tls))
            .await
            .map_err(|e| CatalogError::Connect {
                target: info.to_string(),
                // Without an answer from the server (refused, reset, timed
                // out) it may be back later; an answer says by its SQLSTATE.
                transient: e
                    .as_db_error()
                    .is_none_or(|d| super::sqlstate_is_transient(d.code().code())),
                message: match e.as_db_error() {
                    Some(d) => d.message().to_string(),
                    None => {
                        let mut m = e.to_string();
                        let mut src = std::error::Error::source(&e);
                        while let Some(s) = src {
                            m = format!("{m}: {s}");
                            src = s.source();
                        }
                        m
                    }
                },
            })?;
        let task = tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "catalog connection ended");
            }
        });
        Ok(PgClient { client, task })
    }

    /// The underlying client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Fails unless `wal_level` is `logical`.
    pub async fn check_wal_level(&self) -> Result<(), CatalogError> {
        let row = self
            .client
            .query_one("SHOW wal_level", &[])
            .await
            .map_err(db_error)?;
        let level: String = row.try_get(0).map_err(db_error)?;
        if level != "logical" {
            return Err(CatalogError::NotReady(format!(
                "Postgres has wal_level = {level}, but logical replication needs logical: set wal_level = logical in postgresql.conf and restart Postgres"
            )));
        }
        Ok(())
    }

    /// Whether `publication` publishes stored generated columns
    /// (`publish_generated_columns = stored`, PostgreSQL 18+); false when it
    /// does not exist.
    pub async fn publishes_generated_columns(
        &self,
        publication: &str,
    ) -> Result<bool, CatalogError> {
        // Through to_jsonb: the column exists from 18 on (a bool in its
        // betas, a "char" since).
        let row = self
            .client
            .query_opt(
                "SELECT to_jsonb(p) ->> 'pubgencols' FROM pg_publication p WHERE pubname = $1",
                &[&publication],
            )
            .await
            .map_err(db_error)?;
        Ok(row
            .and_then(|r| r.get::<_, Option<String>>(0))
            .is_some_and(|v| v == "s" || v == "true"))
    }

    /// Reads columns, keys and replica identity of the given tables
    /// (schema-qualified) as `publication` streams them (stored generated
    /// columns only if it publishes them); tables that do not exist are
    /// left out.
    pub async fn catalog(
        &self,
        tables: &[String],
        publication: &str,
    ) -> Result<Catalog, CatalogError> {
        let gencols = self.publishes_generated_columns(publication).await?;
        self.catalog_as(tables, gencols).await
    }

    /// As [`PgClient::catalog`], for a publication that does (`gencols`) or
    /// does not publish stored generated columns.
    pub async fn catalog_as(
        &self,
        tables: &[String],
        gencols: bool,
    ) -> Result<Catalog, CatalogError> {
        let rows = self
            .client
            .query(
                "SELECT n.nspname || '.' || c.relname AS t, c.oid, c.relreplident::text,
                        array(SELECT a.attname::text FROM pg_attribute a
                              WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                                AND (a.attgenerated = '' OR (a.attgenerated = 's' AND $2))
                              ORDER BY a.attnum) AS cols,
                        array(SELECT a.attname::text FROM pg_attribute a
                              WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                                AND NOT (a.attgenerated = '' OR (a.attgenerated = 's' AND $2))
                              ORDER BY a.attnum) AS generated,
                        array(SELECT a.atttypid FROM pg_attribute a
                              WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                                AND (a.attgenerated = '' OR (a.attgenerated = 's' AND $2))
                              ORDER BY a.attnum) AS types,
                        array(SELECT a.attname::text FROM pg_attribute a
                              WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                                AND NOT a.attnotnull
                              ORDER BY a.attnum) AS nullable
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE c.relkind IN ('r', 'p') AND n.nspname || '.' || c.relname = ANY($1)",
                &[&tables, &gencols],
            )
            .await
            .map_err(db_error)?;
        let mut catalog = HashMap::new();
        for row in rows {
            let name: String = row.try_get(0).map_err(db_error)?;
            let oid: u32 = row.try_get(1).map_err(db_error)?;
            let ident: String = row.try_get(2).map_err(db_error)?;
            let columns: Vec<String> = row.try_get(3).map_err(db_error)?;
            let generated: Vec<String> = row.try_get(4).map_err(db_error)?;
            let types: Vec<u32> = row.try_get(5).map_err(db_error)?;
            let nullable: Vec<String> = row.try_get(6).map_err(db_error)?;
            let idx = self
                .client
                .query(
                    "SELECT i.indisprimary, i.indisreplident,
                            array(SELECT a.attname::text FROM unnest(i.indkey) WITH ORDINALITY k(attnum, ord)
                                  JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                                  ORDER BY k.ord) AS cols
                     FROM pg_index i
                     WHERE i.indrelid = $1 AND i.indisunique AND i.indpred IS NULL AND i.indexprs IS NULL",
                    &[&oid],
                )
                .await
                .map_err(db_error)?;
            let mut info = TableInfo {
                columns,
                types,
                generated,
                nullable,
                oid,
                replica_identity: ident.chars().next().unwrap_or('d'),
                ..TableInfo::default()
            };
            for r in idx {
                let primary: bool = r.try_get(0).map_err(db_error)?;
                let identity: bool = r.try_get(1).map_err(db_error)?;
                let cols: Vec<String> = r.try_get(2).map_err(db_error)?;
                if identity {
                    info.identity_index = cols.clone();
                }
                if primary {
                    info.primary_key = cols.clone();
                }
                info.unique.push(cols);
            }
            catalog.insert(name, info);
        }
        let user: Vec<u32> = catalog
            .values()
            .flat_map(|t| t.types.iter().copied())
            .filter(|&o| o >= FIRST_USER_OID)
            .collect();
        if !user.is_empty() {
            let bases = base_types(&self.client, &user).await.map_err(db_error)?;
            for t in catalog.values_mut() {
                for o in &mut t.types {
                    *o = bases.get(o).copied().unwrap_or(*o);
                }
            }
        }
        Ok(catalog)
    }

    /// What user types are read as ([`base_types`]).
    pub async fn base_types(&self, oids: &[u32]) -> Result<HashMap<u32, u32>, CatalogError> {
        base_types(&self.client, oids).await.map_err(db_error)
    }

    /// The schema-qualified names the tables with these OIDs have now;
    /// dropped ones are missing.
    pub async fn table_names(&self, oids: &[u32]) -> Result<HashMap<u32, String>, CatalogError> {
        let rows = self
            .client
            .query(
                "SELECT c.oid, n.nspname || '.' || c.relname FROM pg_class c
                 JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = ANY($1)",
                &[&oids],
            )
            .await
            .map_err(db_error)?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect::<Result<_, tokio_postgres::Error>>()
            .map_err(db_error)
    }

    /// The tables in a publication, or `None` if it does not exist.
    pub async fn publication_tables(
        &self,
        publication: &str,
    ) -> Result<Option<Vec<String>>, CatalogError> {
        let exists = self
            .client
            .query_opt(
                "SELECT 1 FROM pg_publication WHERE pubname = $1",
                &[&publication],
            )
            .await
            .map_err(db_error)?;
        if exists.is_none() {
            return Ok(None);
        }
        let rows = self
            .client
            .query(
                "SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = $1 ORDER BY 1",
                &[&publication],
            )
            .await
            .map_err(db_error)?;
        Ok(Some(
            rows.iter()
                .map(|r| r.try_get(0))
                .collect::<Result<_, _>>()
                .map_err(db_error)?,
        ))
    }

    /// What the publication leaves out of the tables it has, each as a
    /// phrase: a row filter or a column list on a table (PostgreSQL 15+),
    /// or an action it does not publish. Empty when it streams every change
    /// of every row of its tables.
    pub async fn publication_subsets(
        &self,
        publication: &str,
    ) -> Result<Vec<String>, CatalogError> {
        let mut out = Vec::new();
        let actions = self
            .client
            .query_opt(
                "SELECT pubinsert, pubupdate, pubdelete, pubtruncate FROM pg_publication WHERE pubname = $1",
                &[&publication],
            )
            .await
            .map_err(db_error)?;
        if let Some(r) = actions {
            let left_out: Vec<&str> = ["insert", "update", "delete", "truncate"]
                .into_iter()
                .enumerate()
                .filter(|(i, _)| !r.try_get::<_, bool>(*i).unwrap_or(true))
                .map(|(_, a)| a)
                .collect();
            if !left_out.is_empty() {
                out.push(format!("it does not publish {}", left_out.join(", ")));
            }
        }
        if self.server_version_num().await? < 150_000 {
            return Ok(out);
        }
        let rows = self
            .client
            .query(
                "SELECT n.nspname || '.' || c.relname, pg_get_expr(pr.prqual, pr.prrelid), \
                        pr.prattrs IS NOT NULL \
                 FROM pg_publication_rel pr \
                 JOIN pg_publication p ON p.oid = pr.prpubid \
                 JOIN pg_class c ON c.oid = pr.prrelid \
                 JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE p.pubname = $1 AND (pr.prqual IS NOT NULL OR pr.prattrs IS NOT NULL) \
                 ORDER BY 1",
                &[&publication],
            )
            .await
            .map_err(db_error)?;
        for r in rows {
            let table: String = r.get(0);
            if let Some(filter) = r.get::<_, Option<String>>(1) {
                out.push(format!("a row filter on {table} (WHERE {filter})"));
            }
            if r.get::<_, bool>(2) {
                out.push(format!("a column list on {table}"));
            }
        }
        Ok(out)
    }

    /// The state of a slot, or `None` if it does not exist in this database.
    /// Columns newer than the server read as `None` (through `to_jsonb`).
    pub async fn slot(&self, slot: &str) -> Result<Option<SlotInfo>, CatalogError> {
        let row = self
            .client
            .query_opt(
                "SELECT plugin, active, confirmed_flush_lsn::text, restart_lsn::text,
                        to_jsonb(s) ->> 'failover', to_jsonb(s) ->> 'synced',
                        to_jsonb(s) ->> 'conflicting', to_jsonb(s) ->> 'invalidation_reason'
                 FROM pg_replication_slots s WHERE slot_name = $1 AND database = current_database()",
                &[&slot],
            )
            .await
            .map_err(db_error)?;
        let Some(r) = row else { return Ok(None) };
        let lsn = |i: usize| -> Result<Option<Lsn>, CatalogError> {
            let text: Option<String> = r.try_get(i).map_err(db_error)?;
            Ok(text.and_then(|s| s.parse().ok()))
        };
        let text = |i: usize| -> Result<Option<String>, CatalogError> {
            r.try_get::<_, Option<String>>(i).map_err(db_error)
        };
        let flag =
            |i: usize| -> Result<Option<bool>, CatalogError> { Ok(text(i)?.map(|t| t == "true")) };
        Ok(Some(SlotInfo {
            plugin: text(0)?.unwrap_or_default(),
            active: r.try_get(1).map_err(db_error)?,
            confirmed_flush_lsn: lsn(2)?,
            restart_lsn: lsn(3)?,
            failover: flag(4)?,
            synced: flag(5)?,
            conflicting: flag(6)?,
            invalidation_reason: text(7)?,
        }))
    }

    /// Whether the server has failover slots (PostgreSQL 17+); an error
    /// saying so if not.
    pub async fn check_generated_columns(&self) -> Result<(), CatalogError> {
        let version = self.server_version_num().await?;
        if version < 180_000 {
            return Err(CatalogError::NotReady(format!(
                "postgres.generated_columns needs PostgreSQL 18 or later (publish_generated_columns), and this server is {}; set it to false, or upgrade",
                version / 10_000
            )));
        }
        Ok(())
    }

    /// The server's `idle_replication_slot_timeout` in seconds
    /// (PostgreSQL 18+), `None` where it is 0 or unknown: a slot no
    /// connection uses for longer is invalidated at the next checkpoint.
    pub async fn idle_slot_timeout(&self) -> Result<Option<u64>, CatalogError> {
        let row = self
            .client
            .query_opt(
                "SELECT setting FROM pg_settings WHERE name = 'idle_replication_slot_timeout'",
                &[],
            )
            .await
            .map_err(db_error)?;
        Ok(row
            .and_then(|r| r.get::<_, Option<String>>(0))
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|&s| s > 0))
    }

    /// Refuses `postgres.failover` on a server without failover slots.
    pub async fn check_failover(&self) -> Result<(), CatalogError> {
        let version = self.server_version_num().await?;
        if version < 170_000 {
            return Err(CatalogError::NotReady(format!(
                "postgres.failover needs PostgreSQL 17 or later (failover slots), and this server is {}; set it to false, or upgrade",
                version / 10_000
            )));
        }
        Ok(())
    }

    /// The server's `server_version_num`.
    pub async fn server_version_num(&self) -> Result<i32, CatalogError> {
        Ok(self
            .client
            .query_one("SELECT current_setting('server_version_num')::int", &[])
            .await
            .map_err(db_error)?
            .get(0))
    }

    /// Creates the publication for `tables`, or adds missing tables to it.
    /// Returns what was done.
    pub async fn ensure_publication(
        &self,
        publication: &str,
        tables: &[String],
        gencols: bool,
    ) -> Result<String, CatalogError> {
        let quoted: Vec<String> = tables.iter().map(|t| quote_qualified(t)).collect();
        let gencols_option = if gencols {
            ", publish_generated_columns = stored"
        } else {
            ""
        };
        match self.publication_tables(publication).await? {
            None => {
                self.client
                    .batch_execute(&format!(
                        "CREATE PUBLICATION {} FOR TABLE {} WITH (publish_via_partition_root = true{gencols_option})",
                        quote_ident(publication),
                        quoted.join(", ")
                    ))
                    .await
                    .map_err(db_error)?;
                Ok(format!(
                    "created publication {publication} for {}",
                    tables.join(", ")
                ))
            }
            Some(have) => {
                // From 18 on the publication publishes stored generated
                // columns as postgres.generated_columns says.
                let publishes = self.publishes_generated_columns(publication).await?;
                let mut done = Vec::new();
                if publishes != gencols && self.server_version_num().await? >= 180_000 {
                    let value = if gencols { "stored" } else { "none" };
                    self.client
                        .batch_execute(&format!(
                            "ALTER PUBLICATION {} SET (publish_generated_columns = {value})",
                            quote_ident(publication)
                        ))
                        .await
                        .map_err(db_error)?;
                    done.push(format!(
                        "publication {publication} publishes generated columns: {value}"
                    ));
                }
                let missing: Vec<&String> = tables.iter().filter(|t| !have.contains(t)).collect();
                if missing.is_empty() && !done.is_empty() {
                    return Ok(done.join("; "));
                }
                if missing.is_empty() {
                    return Ok(format!(
                        "publication {publication} already covers every mapped table"
                    ));
                }
                let q: Vec<String> = missing.iter().map(|t| quote_qualified(t)).collect();
                self.client
                    .batch_execute(&format!(
                        "ALTER PUBLICATION {} ADD TABLE {}",
                        quote_ident(publication),
                        q.join(", ")
                    ))
                    .await
                    .map_err(db_error)?;
                done.push(format!(
                    "added {} to publication {publication}",
                    missing
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
                Ok(done.join("; "))
            }
        }
    }

    /// Creates the logical slot with `pgoutput`, unless it exists — a
    /// failover slot with `failover` (PostgreSQL 17+). Returns what was done,
    /// the new slot's consistent point if it was created, and whether an
    /// existing slot still has to be made a failover slot.
    pub async fn ensure_slot(
        &self,
        slot: &str,
        failover: bool,
    ) -> Result<(String, Option<Lsn>, bool), CatalogError> {
        if failover {
            self.check_failover().await?;
        }
        if let Some(s) = self.slot(slot).await? {
            if s.plugin != "pgoutput" {
                return Err(CatalogError::NotReady(format!(
                    "replication slot {slot} exists but uses the {} plugin; drop it or choose another postgres.slot",
                    s.plugin
                )));
            }
            let alter = failover && s.failover != Some(true);
            return Ok((
                format!("replication slot {slot} already exists"),
                None,
                alter,
            ));
        }
        let row = if failover {
            self.client
                .query_one(
                    "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput', false, false, true)",
                    &[&slot],
                )
                .await
        } else {
            self.client
                .query_one(
                    "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
                    &[&slot],
                )
                .await
        }
        .map_err(db_error)?;
        let lsn: String = row.try_get(0).map_err(db_error)?;
        let at = lsn.parse().map_err(|e| CatalogError::Query {
            message: format!("the new slot's position: {e}"),
            transient: false,
        })?;
        let kind = if failover { "failover " } else { "" };
        Ok((
            format!("created {kind}replication slot {slot} at {lsn}"),
            Some(at),
            false,
        ))
    }

    /// Drops the slot if it exists.
    pub async fn drop_slot(&self, slot: &str) -> Result<bool, CatalogError> {
        if self.slot(slot).await?.is_none() {
            return Ok(false);
        }
        self.client
            .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await
            .map_err(db_error)?;
        Ok(true)
    }

    /// Drops the publication if it exists.
    pub async fn drop_publication(&self, publication: &str) -> Result<bool, CatalogError> {
        if self.publication_tables(publication).await?.is_none() {
            return Ok(false);
        }
        self.client
            .batch_execute(&format!("DROP PUBLICATION {}", quote_ident(publication)))
            .await
            .map_err(db_error)?;
        Ok(true)
    }
}
