//! PostgreSQL 18 + pgvector for tests of the fleet service.
//!
//! [`postgres`] hands each caller a fresh, empty database (the `vector`
//! extension already created in it) on one shared server: the one
//! `$DERMASCOPE_TEST_PG` names (an admin URL; `scripts/test` sets it), else
//! the cached server `scripts/pg start` runs (started on first use, and left
//! running for the next test binary). [`postgres_private`] starts a server of
//! the test's own, for the tests that stop and start it.
//!
//! Without a server (no wheel, no network to fetch it) both count a skip
//! ([`Need::Postgres`]) and return `None`; under
//! `DERMASCOPE_REQUIRE=...,postgres` they panic instead.
//!
//! SQL goes through `scripts/pg psql` (the wheel's own psql), so this crate
//! needs no database driver.

use crate::{skip, workspace_root, Need};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

/// A fresh database of its own on the shared server.
#[derive(Debug)]
pub struct Postgres {
    /// `postgres://.../<name>`: the test's database.
    pub url: String,
    /// The server's admin URL (database `postgres`), to make more databases.
    pub admin_url: String,
    /// The database's name, unique per call.
    pub name: String,
}

impl Drop for Postgres {
    /// Drops the database, unless the test failed: then it is kept, and
    /// named on stderr, to be looked at.
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept database {} for the failed test", self.url);
            return;
        }
        // FORCE: a pool the test leaked must not keep the database alive. A
        // failed drop only leaves an empty database behind.
        let _ = psql(
            &self.admin_url,
            &format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name),
        );
    }
}

/// A fresh database on the shared PostgreSQL server, or `None` after a
/// counted skip when no server can be had.
///
/// # Panics
/// When a server answers but the database cannot be made (a real defect),
/// or when no server can be had and `$DERMASCOPE_REQUIRE` names `postgres`.
pub fn postgres(test: &str) -> Option<Postgres> {
    let admin_url = match shared_admin_url() {
        Ok(url) => url.clone(),
        Err(reason) => {
            skip(test, Need::Postgres, reason);
            return None;
        }
    };
    let name = database_name(test);
    let url = with_database(&admin_url, &name);
    if let Err(error) = psql(&admin_url, &format!("CREATE DATABASE \"{name}\"")) {
        panic!("{test}: could not create database {name}: {error}");
    }
    // scripts/pg's servers have it in template1 already; a server named by
    // $DERMASCOPE_TEST_PG may not.
    if let Err(error) = psql(&url, "CREATE EXTENSION IF NOT EXISTS vector") {
        panic!("{test}: pgvector does not load in {name}: {error}");
    }
    Some(Postgres {
        url,
        admin_url,
        name,
    })
}

/// A PostgreSQL server of the test's own (its own port and data folder under
/// the temporary folder), for tests that stop and start the database. Slower
/// than [`postgres`] (an initdb, about a second). Stopped and deleted on drop.
pub struct PrivateServer {
    dir: PathBuf,
    port: u16,
    admin_url: String,
    url: String,
}

/// One test database in every private server.
const PRIVATE_DATABASE: &str = "dermascope_test";

impl PrivateServer {
    /// The test database (`vector` created in it), the same across
    /// [`stop`](Self::stop) and [`start`](Self::start).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The server's admin URL (database `postgres`).
    pub fn admin_url(&self) -> &str {
        &self.admin_url
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Fast shutdown (open connections are cut; committed data stays).
    ///
    /// # Panics
    /// When the server does not stop.
    pub fn stop(&self) {
        if let Err(error) = scripts_pg(&["stop", "--dir", &self.dir_arg()]) {
            panic!(
                "could not stop the server in {}: {error}",
                self.dir.display()
            );
        }
    }

    /// Starts the server again on the same port with the same data; returns
    /// once it accepts connections.
    ///
    /// # Panics
    /// When it does not start (e.g. another process took the port meanwhile).
    pub fn start(&self) {
        let port = self.port.to_string();
        let started = scripts_pg(&[
            "start",
            "--dir",
            &self.dir_arg(),
            "--port",
            &port,
            "-c",
            PRIVATE_SHARED_BUFFERS,
        ]);
        if let Err(error) = started {
            panic!(
                "could not start the server in {} again: {error}",
                self.dir.display()
            );
        }
    }

    fn dir_arg(&self) -> String {
        self.dir.display().to_string()
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Stopped (nothing may keep running), but its data is kept.
            let _ = scripts_pg(&["stop", "--dir", &self.dir_arg()]);
            eprintln!("kept the private server's data in {}", self.dir.display());
        } else {
            let _ = scripts_pg(&["drop", "--dir", &self.dir_arg()]);
        }
    }
}

// Several private servers may run at once beside the shared one.
const PRIVATE_SHARED_BUFFERS: &str = "shared_buffers=32MB";

/// A server of the test's own, or `None` after a counted skip when
/// `scripts/pg` cannot run one here.
///
/// # Panics
/// When the server starts but the test database cannot be made, or when no
/// server can be had and `$DERMASCOPE_REQUIRE` names `postgres`.
pub fn postgres_private(test: &str) -> Option<PrivateServer> {
    // Not tempfile's 0700 folders: as root the server runs as nobody, who
    // must reach its data folder.
    let dir = std::env::temp_dir().join(format!("dermascope-pg-{}", unique_suffix()));
    let dir_arg = dir.display().to_string();
    let admin_url = match scripts_pg(&["start", "--dir", &dir_arg, "-c", PRIVATE_SHARED_BUFFERS]) {
        Ok(out) => last_line(&out).to_string(),
        Err(reason) => {
            let _ = std::fs::remove_dir_all(&dir);
            skip(
                test,
                Need::Postgres,
                &format!("scripts/pg could not start a private server: {reason}"),
            );
            return None;
        }
    };
    let port = port_of(&admin_url).unwrap_or_else(|| panic!("{test}: no port in {admin_url}"));
    let server = PrivateServer {
        url: with_database(&admin_url, PRIVATE_DATABASE),
        dir,
        port,
        admin_url,
    };
    if let Err(error) = psql(
        &server.admin_url,
        &format!("CREATE DATABASE \"{PRIVATE_DATABASE}\""),
    )
    .and_then(|_| psql(&server.url, "CREATE EXTENSION IF NOT EXISTS vector"))
    {
        panic!("{test}: could not make the private server's database: {error}");
    }
    Some(server)
}

/// Runs `sql` on `url` with `scripts/pg psql` (stops at the first error);
/// returns psql's unaligned, tuples-only output.
pub fn psql(url: &str, sql: &str) -> Result<String, String> {
    let pg = workspace_root().join("scripts/pg");
    let output = Command::new("bash")
        .arg(&pg)
        .args([
            "psql",
            "-q",
            "-tA",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            url,
            "-c",
            sql,
        ])
        .env("PGOPTIONS", "-c client_min_messages=warning")
        .output()
        .map_err(|error| format!("could not run {}: {error}", pg.display()))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "psql exited with {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// `$DERMASCOPE_TEST_PG`, else the cached server `scripts/pg start` runs
/// (once per test binary: tests ask at the same time).
fn shared_admin_url() -> &'static Result<String, String> {
    static URL: OnceLock<Result<String, String>> = OnceLock::new();
    URL.get_or_init(|| match std::env::var("DERMASCOPE_TEST_PG") {
        Ok(url) if !url.trim().is_empty() => Ok(url.trim().to_string()),
        _ => scripts_pg(&["start"])
            .map(|out| last_line(&out).to_string())
            .map_err(|error| {
                format!("no DERMASCOPE_TEST_PG, and scripts/pg start failed: {error}")
            }),
    })
}

/// Runs `scripts/pg ARGS`; its stdout, or why it failed (with its stderr).
fn scripts_pg(args: &[&str]) -> Result<String, String> {
    let pg = workspace_root().join("scripts/pg");
    run(&pg, args)
}

fn run(script: &Path, args: &[&str]) -> Result<String, String> {
    let output = Command::new("bash")
        .arg(script)
        .args(args)
        .output()
        .map_err(|error| format!("could not run {}: {error}", script.display()))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(6).collect();
        Err(format!(
            "{} {} exited with {}: {}",
            script.display(),
            args.join(" "),
            output.status,
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        ))
    }
}

fn last_line(text: &str) -> &str {
    text.lines()
        .rev()
        .find(|line| !line.trim().is_empty())
        .unwrap_or("")
        .trim()
}

/// `url` with its database (the path) replaced by `name`; the query, if
/// any, kept.
fn with_database(url: &str, name: &str) -> String {
    let authority_start = url.find("://").map_or(0, |at| at + 3);
    let (head, query) = match url[authority_start..].find('?') {
        Some(at) => url.split_at(authority_start + at),
        None => (url, ""),
    };
    let base = match head[authority_start..].find('/') {
        Some(at) => &head[..authority_start + at],
        None => head,
    };
    format!("{base}/{name}{query}")
}

/// The port of a `postgres://user:pass@host:PORT/db` URL.
fn port_of(url: &str) -> Option<u16> {
    let authority_start = url.find("://")? + 3;
    let rest = &url[authority_start..];
    let authority = &rest[..rest.find(['/', '?']).unwrap_or(rest.len())];
    let host_port = authority.rsplit('@').next()?;
    host_port.rsplit_once(':')?.1.parse().ok()
}

/// Unique in this process (a counter) and across runs and processes (the
/// pid and the clock), so leftovers of a failed run never collide.
fn unique_suffix() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos() as u64);
    format!("{}_{n}_{:x}", std::process::id(), nanos & 0xffff_ffff)
}

/// `t_<test, lower-case alphanumerics>_<unique>`, within PostgreSQL's 63
/// bytes and needing no quoting.
fn database_name(test: &str) -> String {
    let suffix = unique_suffix();
    let room = 63 - "t__".len() - suffix.len();
    let stem: String = test
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(room)
        .collect();
    format!("t_{stem}_{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_get_another_database_and_keep_their_query() {
        let admin = "postgres://postgres:postgres@127.0.0.1:5432/postgres";
        assert_eq!(
            with_database(admin, "t_a"),
            "postgres://postgres:postgres@127.0.0.1:5432/t_a"
        );
        assert_eq!(
            with_database("postgres://u:p@h:1/db?sslmode=disable", "x"),
            "postgres://u:p@h:1/x?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h:1", "x"), "postgres://h:1/x");
        assert_eq!(
            with_database("postgresql://h:1?application_name=a", "x"),
            "postgresql://h:1/x?application_name=a"
        );
        assert_eq!(port_of(admin), Some(5432));
        assert_eq!(port_of("postgres://u:p@h:61234?x=1"), Some(61234));
        assert_eq!(port_of("postgres://h/db"), None);
    }

    #[test]
    fn database_names_are_unique_short_and_plain() {
        let long = "cloud::sync::a_very_long_test_name_that_goes_on_and_on_and_on_forever";
        let a = database_name(long);
        let b = database_name(long);
        assert_ne!(a, b);
        for name in [&a, &b, &database_name("Upload-Retry")] {
            assert!(
                name.len() <= 63,
                "{name} is longer than PostgreSQL's 63 bytes"
            );
            assert!(name.starts_with("t_"));
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{name} would need quoting"
            );
        }
        assert!(database_name("Upload-Retry").starts_with("t_upload_retry_"));
    }

    #[test]
    fn a_database_of_its_own_with_pgvector_that_goes_when_dropped() {
        let _environment = crate::tests::environment();
        let Some(db) = postgres("testkit::a_database_of_its_own") else {
            return;
        };
        let row = psql(
            &db.url,
            "SELECT current_database(), extversion FROM pg_extension WHERE extname = 'vector'",
        )
        .unwrap();
        let (name, version) = row.trim().split_once('|').unwrap();
        assert_eq!(name, db.name);
        assert!(version.starts_with("0.8"), "pgvector {version}, not 0.8");
        // halfvec (pgvector >= 0.7), which the fleet schema stores.
        let distance = psql(
            &db.url,
            "SELECT '[1,2]'::halfvec(2) <#> '[3,4]'::halfvec(2)",
        )
        .unwrap();
        assert_eq!(distance.trim(), "-11");

        let other = postgres("testkit::a_database_of_its_own").unwrap();
        assert_ne!(other.name, db.name);
        let (admin, name) = (db.admin_url.clone(), db.name.clone());
        drop(db);
        let left = psql(
            &admin,
            &format!("SELECT count(*) FROM pg_database WHERE datname = '{name}'"),
        )
        .unwrap();
        assert_eq!(left.trim(), "0", "the dropped Postgres left its database");
    }

    #[test]
    fn a_private_server_stops_and_starts_with_its_data_and_port() {
        let _environment = crate::tests::environment();
        let Some(server) = postgres_private("testkit::a_private_server") else {
            return;
        };
        psql(
            server.url(),
            "CREATE TABLE kept (n int); INSERT INTO kept VALUES (7)",
        )
        .unwrap();
        let url = server.url().to_string();
        server.stop();
        let refused = psql(&url, "SELECT 1");
        assert!(refused.is_err(), "a stopped server answered: {refused:?}");
        server.start();
        assert_eq!(server.url(), url);
        assert_eq!(psql(&url, "SELECT n FROM kept").unwrap().trim(), "7");
        let dir = server.dir.clone();
        drop(server);
        assert!(!dir.exists(), "the private server's folder outlived it");
    }
}
