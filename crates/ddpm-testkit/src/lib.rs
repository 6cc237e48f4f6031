//! Test support shared by the integration tests of `ddpm-registry`, `ddpm-trainer` and
//! `ddpm-server`: every test gets a database of its own, on SQLite (a file in the test's
//! temp dir) or PostgreSQL (a database with a random name on the server that
//! `DDPM_TEST_POSTGRES_URL` names, dropped afterwards).
//!
//! [`both_backends!`] makes one test per backend of each test function.
//!
//! PostgreSQL tests never skip: without the variable they fail and say how to get one
//! (`scripts/test.sh` finds or starts a server and sets it).

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
