-- The least-privilege role walgraph runs as: it may open replication
-- connections and read the mapped tables, nothing more. Not a superuser.
--
-- Run as a superuser (or a role with CREATEROLE and ownership of the tables):
--
--   psql -v role=walgraph -v password='…' -v schema=public -f sql/walgraph_role.sql
--
-- Then, as the owner of the tables (publications need ownership), once:
--
--   walgraph setup        (with a URL for a role that owns the tables)
--
-- and run the sidecar with this role in WALGRAPH_PG_URL:
--
--   walgraph run          (postgres://walgraph:…@host/db)
--
-- The slot and publication are database objects; the replication slot is
-- used (not created) by `run`, so the REPLICATION attribute is enough.

SELECT format('CREATE ROLE %I LOGIN', :'role')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'role') \gexec
ALTER ROLE :"role" WITH LOGIN REPLICATION NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'password';
GRANT USAGE ON SCHEMA :"schema" TO :"role";
GRANT SELECT ON ALL TABLES IN SCHEMA :"schema" TO :"role";
-- Tables created later in the schema (by the role running this script).
ALTER DEFAULT PRIVILEGES IN SCHEMA :"schema" GRANT SELECT ON TABLES TO :"role";
-- Heartbeats: when nothing streams, `run` emits a logical message and times
-- its trip to the graph (lag in seconds on a quiet database). PUBLIC may
-- call the function unless an administrator revoked it; this says so
-- explicitly. Without it walgraph goes on without heartbeats.
GRANT EXECUTE ON FUNCTION pg_catalog.pg_logical_emit_message(boolean, text, text) TO :"role";
