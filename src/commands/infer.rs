//! `walgraph mapping infer`: a mapping to start from, read from the catalog
//! by [`crate::mapping::infer`].
//!
//! Invariant: reads only; an empty schema is an error, not an empty mapping.

use super::conninfo;
use crate::config::Config;
use crate::mapping::infer;
use crate::source::catalog::PgClient;

/// Prints the mapping inferred for `schema`.
pub async fn command(cfg: &Config, schema: &str) -> anyhow::Result<()> {
    let pg = PgClient::connect(&conninfo(cfg)?).await?;
    let tables = infer::read_schema(&pg, schema).await?;
    if tables.is_empty() {
        anyhow::bail!("schema {schema} has no tables; name another with --schema");
    }
    print!("{}", infer::render(schema, &tables));
    Ok(())
}
