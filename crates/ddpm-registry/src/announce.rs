//! New checkpoints as they are registered: PostgreSQL's `LISTEN` on
//! [`CHECKPOINT_CHANNEL`], behind a small type so that a caller (the server's watcher)
//! needs no database code of its own.
//!
//! Announcements are a hint, not a log: they are lost while the connection is down, and
//! SQLite has none, so a caller still polls and treats each announcement (or reconnect)
//! as "look now".

use std::time::Duration;

use sqlx::postgres::PgListener;

use crate::checkpoints::CHECKPOINT_CHANNEL;
use crate::db::{redact_password, Backend, Registry};

/// How long to wait before retrying a failed `LISTEN` connection.
const RETRY: Duration = Duration::from_secs(5);

/// A stream of "a checkpoint may have been registered" (see [`Registry::announcements`]).
pub struct Announcements {
    /// The PostgreSQL URL; `None` on SQLite (no announcements, ever).
    url: Option<String>,
    listener: Option<PgListener>,
}

impl Registry {
    /// Announcements of newly registered checkpoints. On PostgreSQL this opens a dedicated
    /// connection and `LISTEN`s before it returns, so every registration committed after
    /// it is announced (a failure is logged and retried by [`Announcements::next`]); on
    /// SQLite `next` never completes.
    pub async fn announcements(&self) -> Announcements {
        let url = (self.backend == Backend::Postgres).then(|| self.url.to_string());
        let listener = match &url {
            Some(url) => listen(url)
                .await
                .inspect_err(|e| tracing::warn!(error = %e, url = %redact_password(url), "LISTEN for checkpoints failed; retrying"))
                .ok(),
            None => None,
        };
        Announcements { url, listener }
    }
}

impl Announcements {
    /// Completes when a checkpoint may have been registered since the previous call: one
    /// was announced, or the `LISTEN` connection was lost or re-established (what was
    /// announced meanwhile is gone). Connection failures are logged and retried every
    /// 5 s inside. Never completes on SQLite. Cancel-safe: dropping the future loses
    /// nothing but a reconnect in progress.
    pub async fn next(&mut self) {
        let Some(url) = &self.url else {
            return std::future::pending().await;
        };
        let listener = match &mut self.listener {
            Some(listener) => listener,
            None => loop {
                match listen(url).await {
                    // Connected after a failure: announcements may have been missed.
                    Ok(listener) => {
                        self.listener = Some(listener);
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, url = %redact_password(url), "LISTEN for checkpoints failed; retrying in 5 s");
                        tokio::time::sleep(RETRY).await;
                    }
                }
            },
        };
        // `try_recv` answers `None` when the connection was lost; the next call on the
        // same listener reconnects and listens again by itself.
        match listener.try_recv().await {
            Ok(Some(_)) => {}
            Ok(None) => tracing::warn!("LISTEN connection lost; reconnecting"),
            Err(e) => {
                tracing::warn!(error = %e, "LISTEN connection failed; reconnecting");
                self.listener = None;
            }
        }
    }
}

async fn listen(url: &str) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect(url).await?;
    listener.listen(CHECKPOINT_CHANNEL).await?;
    tracing::info!(
        channel = CHECKPOINT_CHANNEL,
        "listening for new checkpoints"
    );
    Ok(listener)
}
