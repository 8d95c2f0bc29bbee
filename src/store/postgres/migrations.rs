//! PostgreSQL schema migrations: the numbered SQL files in
//! migrations/postgres/, applied in order, each in the transaction that
//! records it in `cronpost_schema`. The whole run holds a transaction-scoped
//! advisory lock, so hosts starting at once migrate one after another and
//! the later ones find nothing left to do. Add a file here and to
//! [`FILES`]; never edit one that has shipped.

use ::postgres::Client;

/// The migration files, in order: (file name, SQL).
pub const FILES: &[(&str, &str)] = &[
    (
        "0001_schema.sql",
        include_str!("../../../migrations/postgres/0001_schema.sql"),
    ),
    (
        "0002_admin_views.sql",
        include_str!("../../../migrations/postgres/0002_admin_views.sql"),
    ),
    (
        "0003_delivery_semantics.sql",
        include_str!("../../../migrations/postgres/0003_delivery_semantics.sql"),
    ),
    (
        "0004_adaptive_rate.sql",
        include_str!("../../../migrations/postgres/0004_adaptive_rate.sql"),
    ),
];

/// The advisory lock key migrations hold (any constant no other
/// application of the database uses: "cronpost" in ASCII).
const LOCK_KEY: i64 = 0x63726f6e706f7374;

const SCHEMA_TABLE: &str = "CREATE TABLE IF NOT EXISTS cronpost_schema (
    version    BIGINT PRIMARY KEY,
    file       TEXT   NOT NULL,
    applied_at BIGINT NOT NULL
)";

/// Applies the migrations the database lacks; refuses a database migrated
/// by a newer build (its schema is not this build's). `name` is the
/// database as errors name it.
pub fn apply(client: &mut Client, name: &str) -> crate::error::Result<()> {
    let pg = |e: ::postgres::Error| super::db_error(name, &e).context("migration failed");
    // A read first: once migrated (every start but the first), no lock and
    // no DDL is needed.
    let current = current_version(client).map_err(pg)?;
    if current == latest_version() {
        return Ok(());
    }
    let newer = |version: i64| {
        crate::error::Error::software(format!(
            "database {name} is at schema version {version}, newer than this build's {}: upgrade cronpost on this host",
            latest_version()
        ))
    };
    if current > latest_version() {
        return Err(newer(current));
    }
    // READ COMMITTED whatever the server's default: the version is read
    // again after the lock, and must see what a host before committed.
    let mut tx = client
        .build_transaction()
        .isolation_level(::postgres::IsolationLevel::ReadCommitted)
        .start()
        .map_err(pg)?;
    tx.batch_execute(&format!(
        "SELECT pg_advisory_xact_lock({LOCK_KEY}); {SCHEMA_TABLE}"
    ))
    .map_err(pg)?;
    let applied: i64 = tx
        .query_typed_one("SELECT coalesce(max(version), 0) FROM cronpost_schema", &[])
        .and_then(|r| r.try_get(0))
        .map_err(pg)?;
    if applied > latest_version() {
        return Err(newer(applied));
    }
    for (i, (file, sql)) in FILES.iter().enumerate().skip(applied as usize) {
        let version = i as i64 + 1;
        tx.batch_execute(sql)
            .and_then(|()| {
                tx.execute_typed(
                    "INSERT INTO cronpost_schema (version, file, applied_at) VALUES ($1, $2, cronpost_now_ms())",
                    super::typed![version => INT8, file => TEXT],
                )
            })
            .map_err(|e| pg(e).context(file))?;
    }
    tx.commit().map_err(pg)
}

/// The version the database records (0: not migrated).
pub fn current_version(client: &mut Client) -> Result<i64, ::postgres::Error> {
    let exists: bool = client
        .query_typed_one("SELECT to_regclass('cronpost_schema') IS NOT NULL", &[])?
        .try_get(0)?;
    if !exists {
        return Ok(0);
    }
    client
        .query_typed_one("SELECT coalesce(max(version), 0) FROM cronpost_schema", &[])?
        .try_get(0)
}

/// The version a fully migrated database records.
pub fn latest_version() -> i64 {
    FILES.len() as i64
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_file_in_migrations_is_listed_in_order() {
        crate::store::assert_migrations_listed_in_order("postgres", super::FILES);
    }
}
