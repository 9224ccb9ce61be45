//! `walgraph mapping infer`: a mapping written from the catalog.
//!
//! Every table of the schema with a primary key becomes a label (singular
//! CamelCase), every foreign key on such a table a relationship (named from
//! its column), and every *pure join table* — a table whose primary key is
//! made of exactly two foreign keys — a relationship whose rows are edges.
//! The result is commented TOML for a person to read and edit.
//!
//! Invariant: it only reads the catalog; what it prints compiles against it.

use std::fmt::Write;

use crate::mapping::is_identifier;
use crate::source::catalog::PgClient;

/// A table as the catalog describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableShape {
    /// Table name (without schema).
    pub name: String,
    /// Column names in order.
    pub columns: Vec<String>,
    /// Primary key columns.
    pub primary_key: Vec<String>,
    /// Foreign keys: (this table's columns, referenced table, referenced columns).
    pub foreign_keys: Vec<(Vec<String>, String, Vec<String>)>,
}

/// `order_items` → `OrderItem`, `categories` → `Category`.
pub fn label_for(table: &str) -> String {
    let singular = if let Some(stem) = table.strip_suffix("ies") {
        format!("{stem}y")
    } else if table.ends_with("sses")
        || table.ends_with("xes")
        || table.ends_with("ches")
        || table.ends_with("shes")
    {
        table[..table.len() - 2].to_string()
    } else if table.ends_with("ss") || table.ends_with("us") || table.ends_with("is") {
        table.to_string()
    } else if let Some(stem) = table.strip_suffix('s') {
        stem.to_string()
    } else {
        table.to_string()
    };
    let camel: String = singular
        .split(|c: char| c == '_' || !c.is_ascii_alphanumeric())
        .filter(|p| !p.is_empty())
        .map(|p| {
            let mut cs = p.chars();
            match cs.next() {
                Some(f) => f.to_ascii_uppercase().to_string() + cs.as_str(),
                None => String::new(),
            }
        })
        .collect();
    if is_identifier(&camel) {
        camel
    } else {
        format!("T{camel}")
    }
}

/// `customer_id` → `CUSTOMER`; `parent` → `PARENT`.
pub fn type_for(columns: &[String]) -> String {
    let base = columns.join("_");
    let base = base.strip_suffix("_id").unwrap_or(&base);
    let t: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    if is_identifier(&t) {
        t
    } else {
        format!("REL_{t}")
    }
}

fn toml_list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|i| format!("{i:?}")).collect();
    format!("[{}]", quoted.join(", "))
}

/// Writes the mapping for the tables of `schema`.
pub fn render(schema: &str, tables: &[TableShape]) -> String {
    let keyed: Vec<&TableShape> = tables
        .iter()
        .filter(|t| !t.primary_key.is_empty())
        .collect();
    let is_join = |t: &TableShape| {
        t.foreign_keys.len() == 2 && {
            let mut fk_cols: Vec<&String> = t.foreign_keys.iter().flat_map(|(c, _, _)| c).collect();
            fk_cols.sort();
            let mut pk: Vec<&String> = t.primary_key.iter().collect();
            pk.sort();
            fk_cols == pk
        }
    };
    let node_tables: Vec<&TableShape> = keyed.iter().copied().filter(|t| !is_join(t)).collect();
    let is_node = |name: &str| node_tables.iter().any(|t| t.name == name);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Mapping inferred by `walgraph mapping infer` from schema {schema}.\n\
         # Every table with a primary key is a node label, every foreign key a\n\
         # relationship, every table whose primary key is two foreign keys a\n\
         # relationship whose rows are edges. Edit freely: rename labels and\n\
         # types, `exclude` columns that should not reach the graph."
    );
    for t in tables.iter().filter(|t| t.primary_key.is_empty()) {
        let _ = writeln!(
            out,
            "\n# {schema}.{} has no primary key and is left out.",
            t.name
        );
    }
    for t in &node_tables {
        let _ = writeln!(
            out,
            "\n[[node]]\ntable = \"{schema}.{}\"\nlabel = \"{}\"\n# key = {}  (the primary key)\n# exclude = []",
            t.name,
            label_for(&t.name),
            toml_list(&t.primary_key)
        );
    }
    for t in &node_tables {
        for (cols, target, target_cols) in &t.foreign_keys {
            let target_pk = node_tables
                .iter()
                .find(|n| n.name == *target)
                .map(|n| &n.primary_key);
            if target_pk != Some(target_cols) {
                let _ = writeln!(
                    out,
                    "\n# {schema}.{}({}) → {target}: the target is not a node table or the key is not its primary key, left out.",
                    t.name,
                    cols.join(", ")
                );
                continue;
            }
            let _ = writeln!(
                out,
                "\n# Foreign key {schema}.{}({}) → {schema}.{target}.\n[[relationship]]\ntable = \"{schema}.{}\"\ntype = \"{}\"\nfrom = {{ label = \"{}\", columns = {} }}\nto = {{ label = \"{}\", columns = {} }}",
                t.name,
                cols.join(", "),
                t.name,
                type_for(cols),
                label_for(&t.name),
                toml_list(&t.primary_key),
                label_for(target),
                toml_list(cols)
            );
        }
    }
    for t in keyed.iter().filter(|t| is_join(t)) {
        // The edge points the way the primary key reads: its first column's
        // table is the start.
        let pos = |cols: &Vec<String>| {
            cols.first()
                .and_then(|c| t.primary_key.iter().position(|k| k == c))
        };
        let (first, second) = if pos(&t.foreign_keys[0].0) <= pos(&t.foreign_keys[1].0) {
            (0, 1)
        } else {
            (1, 0)
        };
        let (from_cols, from_t, _) = &t.foreign_keys[first];
        let (to_cols, to_t, _) = &t.foreign_keys[second];
        if !is_node(from_t) || !is_node(to_t) {
            let _ = writeln!(
                out,
                "\n# {schema}.{} joins tables that are not node tables, left out.",
                t.name
            );
            continue;
        }
        let fk: Vec<&String> = t.foreign_keys.iter().flat_map(|(c, _, _)| c).collect();
        let props: Vec<String> = t
            .columns
            .iter()
            .filter(|c| !fk.contains(c))
            .cloned()
            .collect();
        let _ = writeln!(
            out,
            "\n# Join table {schema}.{}: each row is an edge.\n[[relationship]]\ntable = \"{schema}.{}\"\ntype = \"{}\"\nfrom = {{ label = \"{}\", columns = {} }}\nto = {{ label = \"{}\", columns = {} }}\nproperties = {}",
            t.name,
            t.name,
            type_for(std::slice::from_ref(&t.name)),
            label_for(from_t),
            toml_list(from_cols),
            label_for(to_t),
            toml_list(to_cols),
            toml_list(&props)
        );
    }
    out
}

/// Reads the shapes of the tables of `schema`.
pub async fn read_schema(pg: &PgClient, schema: &str) -> anyhow::Result<Vec<TableShape>> {
    let rows = pg
        .client()
        .query(
            "SELECT c.oid, c.relname::text,
                    array(SELECT a.attname::text FROM pg_attribute a
                          WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum),
                    coalesce((SELECT array(SELECT a.attname::text FROM unnest(i.indkey) WITH ORDINALITY k(n, o)
                                           JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.n ORDER BY k.o)
                              FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary), '{}')
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = $1 AND c.relkind IN ('r', 'p') AND NOT c.relispartition
             ORDER BY c.relname",
            &[&schema],
        )
        .await?;
    let mut tables = Vec::new();
    for r in rows {
        let oid: u32 = r.try_get(0)?;
        let fks = pg
            .client()
            .query(
                "SELECT array(SELECT a.attname::text FROM unnest(f.conkey) WITH ORDINALITY k(n, o)
                              JOIN pg_attribute a ON a.attrelid = f.conrelid AND a.attnum = k.n ORDER BY k.o),
                        t.relname::text,
                        array(SELECT a.attname::text FROM unnest(f.confkey) WITH ORDINALITY k(n, o)
                              JOIN pg_attribute a ON a.attrelid = f.confrelid AND a.attnum = k.n ORDER BY k.o)
                 FROM pg_constraint f JOIN pg_class t ON t.oid = f.confrelid
                 JOIN pg_namespace tn ON tn.oid = t.relnamespace
                 WHERE f.conrelid = $1 AND f.contype = 'f' AND tn.nspname = $2
                 ORDER BY f.conname",
                &[&oid, &schema],
            )
            .await?;
        tables.push(TableShape {
            name: r.try_get(1)?,
            columns: r.try_get(2)?,
            primary_key: r.try_get(3)?,
            foreign_keys: fks
                .iter()
                .map(|f| Ok((f.try_get(0)?, f.try_get(1)?, f.try_get(2)?)))
                .collect::<Result<_, tokio_postgres::Error>>()?,
        });
    }
    Ok(tables)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_singular_camel_case() {
        for (t, l) in [
            ("users", "User"),
            ("order_items", "OrderItem"),
            ("categories", "Category"),
            ("addresses", "Address"),
            ("boxes", "Box"),
            ("status", "Status"),
            ("person", "Person"),
            ("2fa_codes", "T2faCode"),
        ] {
            assert_eq!(label_for(t), l, "{t}");
        }
        assert_eq!(type_for(&["customer_id".into()]), "CUSTOMER");
        assert_eq!(type_for(&["user_roles".into()]), "USER_ROLES");
    }
}
