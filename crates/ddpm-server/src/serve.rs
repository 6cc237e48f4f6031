//! The accept loop: HTTP/1.1 connections served by hyper with the limits axum's `serve`
//! does not set, so that slow or idle clients cannot hold connections.
//!
//! - A client must send a request's complete header within `header_read_timeout`, counted
//!   from the moment the connection can take a request: on a new connection, and on a
//!   kept-alive one after the previous response. The same limit is therefore the idle
//!   timeout between requests.
//! - A request body must arrive within `body_read_timeout` (a layer on the router).
//!
//! Responses are not limited: a sampling request may take its whole request timeout, and
//! a stream lasts as long as its request.
//!
//! On shutdown the listener closes at once; connections finish the requests they carry
//! (hyper's graceful shutdown), then the loop returns.

use std::{future::Future, time::Duration};

use axum::Router;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
    service::TowerToHyperService,
};
use tokio::net::TcpListener;

/// Connection limits.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub header_read_timeout: Duration,
}

/// Serves `router` on `listener` until `shutdown` resolves, then waits for the requests in
/// flight.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        // No upgrades: the API has no WebSocket or other upgraded route.
        let connection = http.serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                // Timeouts, resets, malformed requests: the client's business.
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}
