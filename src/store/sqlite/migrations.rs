//! SQLite schema migrations: the numbered SQL files in migrations/sqlite/, applied in order
//! by rusqlite_migration, which records the applied version in the file's
//! `PRAGMA user_version`. Add a file here and to [`FILES`]; never edit one
//! that has shipped.

use rusqlite::Connection;
use rusqlite_migration::{M, Migrations};

/// The migration files, in order: (file name, SQL).
pub const FILES: &[(&str, &str)] = &[
    (
        "0001_core.sql",
        include_str!("../../../migrations/sqlite/0001_core.sql"),
    ),
    (
        "0002_saturation.sql",
        include_str!("../../../migrations/sqlite/0002_saturation.sql"),
    ),
    (
        "0003_admin_views.sql",
        include_str!("../../../migrations/sqlite/0003_admin_views.sql"),
    ),
    (
        "0004_unroutable.sql",
        include_str!("../../../migrations/sqlite/0004_unroutable.sql"),
    ),
    (
        "0005_hardening.sql",
        include_str!("../../../migrations/sqlite/0005_hardening.sql"),
    ),
    (
        "0006_wakeups.sql",
        include_str!("../../../migrations/sqlite/0006_wakeups.sql"),
    ),
    (
        "0007_hosts.sql",
        include_str!("../../../migrations/sqlite/0007_hosts.sql"),
    ),
    (
        "0008_dead_retention.sql",
        include_str!("../../../migrations/sqlite/0008_dead_retention.sql"),
    ),
    (
        "0009_delivery_semantics.sql",
        include_str!("../../../migrations/sqlite/0009_delivery_semantics.sql"),
    ),
    (
        "0010_adaptive_rate.sql",
        include_str!("../../../migrations/sqlite/0010_adaptive_rate.sql"),
    ),
];

/// Applies the migrations the database lacks.
///
/// rusqlite_migration reads the version before it opens its transaction, so
/// two processes opening a new file at once can both try the same migration;
/// the loser fails on "already exists". It then finds the version current
/// and has nothing left to do, so a failure is only an error if the database
/// is still behind afterwards.
pub fn apply(conn: &mut Connection) -> Result<(), String> {
    let migrations = Migrations::new(FILES.iter().map(|(_, sql)| M::up(sql)).collect());
    let first = match migrations.to_latest(conn) {
        Ok(()) => return Ok(()),
        Err(e) => e,
    };
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .map_err(|e| e.to_string())?;
    if version == FILES.len() as i64 {
        return Ok(());
    }
    migrations.to_latest(conn).map_err(|_| first.to_string())
}

/// The version a fully migrated database records.
pub fn latest_version() -> i64 {
    FILES.len() as i64
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_file_in_migrations_is_listed_in_order() {
        crate::store::assert_migrations_listed_in_order("sqlite", super::FILES);
    }
}
