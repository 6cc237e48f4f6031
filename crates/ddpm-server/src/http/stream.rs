//! `POST /v1/samples` with `Accept: text/event-stream`: an accepted request's life as
//! Server-Sent Events.
//!
//! Events, in this order:
//! - `queued` `{"id", "position", "images", "steps"}`: always first. `id` is the request's
//!   id (also in the `x-ddpm-request-id` header) for `DELETE /v1/samples/{id}`; `position`
//!   counts the requests to be served before it when it was accepted.
//! - `progress` `{"step", "total", "images_done", "images"}`: at most one per
//!   [`PROGRESS_INTERVAL`]; `step` and `total` count steps over all the request's images.
//! - `preview` `{"index", "step", "png_base64"}`: with `preview_every`, an image's current
//!   x̂₀.
//! - `image`: one per image as it finishes (in any order; `index` says which), the same
//!   object as an entry of the JSON response's `images`.
//! - `done` `{"images"}` or `error` `{"code", "message"}`: last.
//!
//! The stream is produced by a task that owns the request's ticket: when the client closes
//! the stream, the body and then the task end, the ticket's receiver is dropped, and the
//! model thread drops the request's samples at its next iteration.

use std::{
    convert::Infallible,
    time::{Duration, Instant},
};

use axum::response::{
    sse::{Event, KeepAlive, Sse},
    IntoResponse, Response,
};
use serde::Serialize;
use tokio::sync::{mpsc, watch};

use super::image::ImageContext;
use crate::{
    batcher::{Progress, StreamItem, Ticket},
    encode,
    http::ApiError,
};

/// Progress events are sent at most this often.
pub const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);
/// A comment line this often while nothing else is sent: proxies keep the stream open,
/// and a client that left is noticed (the write fails) even while the request waits.
const KEEP_ALIVE: Duration = Duration::from_secs(1);

#[derive(Serialize)]
struct Queued<'a> {
    id: &'a str,
    position: usize,
    images: usize,
    steps: usize,
}

#[derive(Serialize)]
struct Preview {
    index: usize,
    step: usize,
    png_base64: String,
}

#[derive(Serialize)]
struct Done {
    images: usize,
}

/// The streamed response of an accepted request.
pub fn respond(
    ticket: Ticket,
    progress: watch::Receiver<Progress>,
    items: mpsc::UnboundedReceiver<StreamItem>,
    context: ImageContext,
    steps: usize,
) -> Response {
    let (events, receiver) = mpsc::channel::<Event>(16);
    tokio::spawn(produce(events, ticket, progress, items, context, steps));
    let stream = futures::stream::unfold(receiver, |mut receiver| async move {
        receiver
            .recv()
            .await
            .map(|event| (Ok::<_, Infallible>(event), receiver))
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response()
}

fn event<T: Serialize>(name: &str, data: &T) -> Event {
    Event::default()
        .event(name)
        .json_data(data)
        .unwrap_or_else(|_| Event::default().event(name).data("{}"))
}

fn error_event(error: ApiError) -> Event {
    event("error", &error.body())
}

/// Sends the request's events until it is answered or the client goes away (then it
/// returns, dropping the ticket: the model thread cancels the samples).
async fn produce(
    events: mpsc::Sender<Event>,
    ticket: Ticket,
    mut progress: watch::Receiver<Progress>,
    mut items: mpsc::UnboundedReceiver<StreamItem>,
    context: ImageContext,
    steps: usize,
) {
    macro_rules! send {
        ($event:expr) => {
            if events.send($event).await.is_err() {
                return;
            }
        };
    }
    let images = context.class_names.len();
    send!(event(
        "queued",
        &Queued {
            id: &ticket.name,
            position: ticket.position,
            images,
            steps,
        }
    ));
    let Ticket {
        answer, timeout, ..
    } = ticket;
    let mut answer = answer;
    let backstop = tokio::time::sleep(timeout + Duration::from_secs(1));
    tokio::pin!(backstop);
    let mut last_progress: Option<Instant> = None;
    let mut progress_due = false;
    let mut progress_open = true;
    let mut items_open = true;
    let item_event = |item: StreamItem| -> Result<Event, ApiError> {
        Ok(match item {
            StreamItem::Image { index, image } => {
                event("image", &context.image_json(index, &image)?)
            }
            StreamItem::Preview { index, step, image } => event(
                "preview",
                &Preview {
                    index,
                    step,
                    png_base64: encode::png_base64(&image).map_err(ApiError::internal)?,
                },
            ),
        })
    };
    loop {
        let wait = last_progress
            .map(|t| PROGRESS_INTERVAL.saturating_sub(t.elapsed()))
            .unwrap_or_default();
        tokio::select! {
            biased;
            _ = events.closed() => return,
            item = items.recv(), if items_open => match item {
                Some(item) => match item_event(item) {
                    Ok(e) => send!(e),
                    Err(e) => {
                        send!(error_event(e));
                        return;
                    }
                },
                None => items_open = false,
            },
            changed = progress.changed(), if progress_open && !progress_due => {
                if changed.is_err() {
                    progress_open = false;
                } else {
                    progress_due = true;
                }
            }
            _ = tokio::time::sleep(wait), if progress_due => {
                progress_due = false;
                last_progress = Some(Instant::now());
                let now = *progress.borrow_and_update();
                send!(event("progress", &now));
            }
            reply = &mut answer => {
                // Everything the model thread sent before answering is in the channel.
                while let Ok(item) = items.try_recv() {
                    match item_event(item) {
                        Ok(e) => send!(e),
                        Err(e) => {
                            send!(error_event(e));
                            return;
                        }
                    }
                }
                match reply {
                    Ok(Ok(_)) => {
                        let last = *progress.borrow();
                        send!(event("progress", &last));
                        send!(event("done", &Done { images }));
                    }
                    Ok(Err(e)) => send!(error_event(e.into())),
                    Err(_) => send!(error_event(ApiError::Unavailable(
                        "the model thread dropped the request".into()
                    ))),
                }
                return;
            }
            _ = &mut backstop => {
                send!(error_event(ApiError::Timeout(timeout)));
                return;
            }
        }
    }
}
