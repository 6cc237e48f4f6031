//! Test support shared by the integration tests of `ddpm-registry`, `ddpm-trainer` and
//! `ddpm-server`: every test gets a database of its own, on SQLite (a file in the test's
//! temp dir) or PostgreSQL (a database with a random name on the server that
//! `DDPM_TEST_POSTGRES_URL` names, dropped afterwards).
//!
//! [`both_backends!`] makes one test per backend of each test function.
//!
//! PostgreSQL tests never skip: without the variable they fail and say how to get one
//! (`scripts/test.sh` finds or starts a server and sets it).
//!
//! The checkpoint store's S3 tests get a bucket of their own ([`s3_bucket`]) on the
//! S3-compatible server `DDPM_TEST_S3_URL` names (moto's, which `scripts/test-s3.sh`
//! starts); like the PostgreSQL tests they fail, never skip, without it. The tests of
//! refused credentials use a second one that checks them, `DDPM_TEST_S3_AUTH_URL`
//! ([`s3_auth_server_url`]).

use std::path::Path;

use sqlx::Connection;

/// The variable naming the PostgreSQL server the tests use.
pub const POSTGRES_URL_VAR: &str = "DDPM_TEST_POSTGRES_URL";

/// Which backend a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Db {
    Sqlite,
    Postgres,
}

/// Generates, for each named `async fn(Context)` of the invoking module, a
/// `sqlite::<name>` and a `postgres::<name>` test. Each awaits `$runner(db, test)`: the
/// invoking test crate's function that builds its `Context` on a fresh database of `db`
/// and runs `test` in it.
///
/// ```ignore
/// both_backends!(crate::helpers::run; claims_are_exclusive, leases_expire);
/// ```
#[macro_export]
macro_rules! both_backends {
    ($runner:path; $($test:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $test() {
                    $runner($crate::Db::Sqlite, super::$test).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $test() {
                    $runner($crate::Db::Postgres, super::$test).await;
                }
            )*
        }
    };
}

/// A database that exists for one test.
#[derive(Debug)]
pub struct FreshDatabase {
    pub url: String,
    /// PostgreSQL: the server's URL and the database's name, to drop it.
    postgres: Option<(String, String)>,
}

impl FreshDatabase {
    /// A new, empty (unmigrated) database of `db`; a SQLite file goes in `dir`.
    pub async fn create(db: Db, dir: &Path) -> FreshDatabase {
        match db {
            Db::Sqlite => FreshDatabase {
                url: format!("sqlite:{}", dir.join("registry.db").display()),
                postgres: None,
            },
            Db::Postgres => {
                let server = postgres_server_url();
                let name = format!("ddpm_test_{}", uuid::Uuid::new_v4().simple());
                let mut admin = sqlx::PgConnection::connect(&server)
                    .await
                    .unwrap_or_else(|e| panic!("connect to {server}: {e}"));
                sqlx::query(&format!("CREATE DATABASE \"{name}\""))
                    .execute(&mut admin)
                    .await
                    .expect("create the test database");
                let _ = admin.close().await;
                FreshDatabase {
                    url: with_database(&server, &name),
                    postgres: Some((server, name)),
                }
            }
        }
    }

    /// A placeholder owning nothing (to move a database out of a struct).
    pub fn none() -> FreshDatabase {
        FreshDatabase {
            url: String::new(),
            postgres: None,
        }
    }

    /// Drops a PostgreSQL database, ending its connections; a SQLite file goes with the
    /// temp dir.
    pub async fn drop_database(self) {
        if let Some((server, name)) = self.postgres {
            let mut admin = sqlx::PgConnection::connect(&server)
                .await
                .unwrap_or_else(|e| panic!("connect to {server}: {e}"));
            sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                .execute(&mut admin)
                .await
                .expect("drop the test database");
            let _ = admin.close().await;
        }
    }
}

/// The variable naming the S3-compatible server the tests use.
pub const S3_URL_VAR: &str = "DDPM_TEST_S3_URL";

/// The variable naming the S3-compatible server that checks credentials.
pub const S3_AUTH_URL_VAR: &str = "DDPM_TEST_S3_AUTH_URL";

/// The S3 test server's endpoint URL; the S3 tests fail without it.
pub fn s3_server_url() -> String {
    test_server_url(S3_URL_VAR, "scripts/test-s3.sh")
}

/// The endpoint of the S3 test server that checks credentials (`scripts/test-s3.sh
/// --auth`). It knows no key, so it refuses every request the tests sign: the tests of
/// refused credentials fail without it.
pub fn s3_auth_server_url() -> String {
    test_server_url(S3_AUTH_URL_VAR, "scripts/test-s3.sh --auth")
}

fn test_server_url(var: &str, script: &str) -> String {
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => url,
        _ => panic!(
            "{var} is not set, so the S3 store tests cannot run. Run the project's test \
             script (scripts/test.sh), which starts moto's S3 servers and sets it, or start \
             one with `{script}` and set {var} to the URL it prints"
        ),
    }
}

/// A new, empty bucket with a random name on the S3 test server, and the settings to
/// reach it under `prefix` (moto accepts any credentials; the bucket is created with an
/// unsigned request, which moto allows). Panics when the server cannot be reached.
pub fn s3_bucket(prefix: &str) -> ddpm_service::S3Spec {
    let endpoint = s3_server_url();
    let bucket = format!("ddpm-test-{}", uuid::Uuid::new_v4().simple());
    let status = http_put(&endpoint, &format!("/{bucket}"));
    assert!(
        status.starts_with("HTTP/1.1 200"),
        "creating bucket {bucket} at {endpoint}: {status}"
    );
    ddpm_service::S3Spec::at_endpoint(&endpoint, &bucket, prefix)
}

/// The options that point a `ddpm-*` binary at `spec`'s bucket through `endpoint` (the
/// S3 server itself, or a proxy in front of it).
pub fn s3_cli_args(spec: &ddpm_service::S3Spec, endpoint: &str) -> Vec<String> {
    [
        "--store",
        &format!("s3://{}/{}", spec.bucket, spec.prefix),
        "--s3-endpoint",
        endpoint,
        "--s3-allow-http",
        "--aws-access-key-id",
        "test",
        "--aws-secret-access-key",
        "test",
    ]
    .map(String::from)
    .to_vec()
}

/// A free port on loopback: bound, then released (for a server to take, or, unused, as
/// a port nobody listens on).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind a loopback port")
        .local_addr()
        .expect("its address")
        .port()
}

/// Sends an empty `PUT path` to `endpoint` (`http://host:port`); returns the status line.
fn http_put(endpoint: &str, path: &str) -> String {
    use std::io::{BufRead, BufReader, Write};
    let host = endpoint
        .strip_prefix("http://")
        .unwrap_or_else(|| panic!("{S3_URL_VAR}={endpoint:?}: expected http://host:port"))
        .trim_end_matches('/');
    let mut stream = std::net::TcpStream::connect(host).unwrap_or_else(|e| {
        panic!("the S3 test server at {endpoint} ({S3_URL_VAR}) cannot be reached: {e}")
    });
    write!(
        stream,
        "PUT {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .expect("send to the S3 test server");
    let mut status = String::new();
    BufReader::new(stream)
        .read_line(&mut status)
        .expect("read the S3 test server's answer");
    status.trim_end().to_owned()
}

/// The PostgreSQL server's URL; the PostgreSQL tests fail without it.
pub fn postgres_server_url() -> String {
    match std::env::var(POSTGRES_URL_VAR) {
        Ok(url) if !url.is_empty() => url,
        _ => panic!(
            "{POSTGRES_URL_VAR} is not set, so the PostgreSQL tests cannot run. Run the \
             project's test script (scripts/test.sh), which starts PostgreSQL and sets it, or \
             set it to a server's URL, e.g. \
             {POSTGRES_URL_VAR}=postgres://postgres@127.0.0.1:5432/postgres"
        ),
    }
}

/// `url` with its database name replaced by `name` (query parameters kept).
pub fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority = base.find("://").map(|i| i + 3).unwrap_or(0);
    let path = base[authority..]
        .find('/')
        .map(|i| authority + i)
        .unwrap_or(base.len());
    let mut out = format!("{}/{name}", &base[..path]);
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn database_names_are_replaced() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/postgres", "t1"),
            "postgres://postgres@127.0.0.1:5432/t1"
        );
        assert_eq!(
            with_database("postgres://u:p@h:1/db?sslmode=disable", "t2"),
            "postgres://u:p@h:1/t2?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h", "t3"), "postgres://h/t3");
    }
}
