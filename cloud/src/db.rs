//! The connection pool, the migrations, and the small queries several
//! modules share.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

use crate::config::DatabaseSettings;
use crate::error::CloudError;

/// The schema, embedded at build time. sqlx takes an advisory lock while it
/// migrates, so instances started together against one database do not
/// race.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// A pool whose waits are bounded: a request that cannot get a connection
/// within `acquire_timeout_ms` fails (503) instead of hanging, and a stuck
/// statement is cancelled by the server after `statement_timeout_ms`.
pub async fn connect(url: &str, settings: &DatabaseSettings) -> Result<PgPool, CloudError> {
    if url.is_empty() {
        return Err(CloudError::Config {
            path: "database".into(),
            message: "no database URL: give --database-url, DERMASCOPE_CLOUD_DATABASE_URL, \
                      or database_url / database_url_env in cloud.toml"
                .into(),
        });
    }
    let statement_timeout = settings.statement_timeout_ms.to_string();
    let options = PgConnectOptions::from_str(url)
        .map_err(|e| CloudError::Config {
            path: "database URL".into(),
            // sqlx's message names the part that is wrong, not the password.
            message: e.to_string(),
        })?
        .application_name("dermascope-cloud")
        .options([
            ("statement_timeout", statement_timeout.as_str()),
            ("lock_timeout", "10000"),
            ("idle_in_transaction_session_timeout", "60000"),
        ]);
    let pool = PgPoolOptions::new()
        .max_connections(settings.max_connections.max(1))
        .min_connections(0)
        .acquire_timeout(Duration::from_millis(settings.acquire_timeout_ms.max(1)))
        .idle_timeout(Duration::from_secs(300))
        // A connection the database dropped (restart) is found and replaced
        // before a request uses it.
        .test_before_acquire(true)
        .connect_lazy_with(options);
    Ok(pool)
}

/// Applies every migration not yet applied.
pub async fn migrate(pool: &PgPool) -> Result<(), CloudError> {
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// The newest migration applied to this database.
pub async fn schema_version(pool: &PgPool) -> Result<i64, sqlx::Error> {
    let version: Option<i64> =
        sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations WHERE success")
            .fetch_one(pool)
            .await?;
    Ok(version.unwrap_or(0))
}

/// The newest migration this build carries.
pub fn latest_migration() -> i64 {
    MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0)
}

/// A clinic's key for `pg_advisory_xact_lock(int, int)`: uploads of one
/// clinic are serialised so its change sequence is drawn in commit order.
pub const CLINIC_LOCK_SPACE: i32 = 0x0d_e2_3a_01;
/// The reference library's lock (one library, so one key).
pub const REFERENCE_LOCK_SPACE: i32 = 0x0d_e2_3a_02;

/// Formats a timestamptz column as RFC 3339 (UTC) in SQL, since the crate
/// decodes no date types.
pub fn rfc3339(column: &str) -> String {
    format!("to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')")
}
