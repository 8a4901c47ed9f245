//! One line on stderr per request, written when its response body has been sent (or the client
//! went away): client, method, path, status, time, and what the handler noted (tokens).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::Response;

/// What a handler adds to its request's log line.
#[derive(Clone, Debug, Default)]
pub struct LogNote(Arc<Mutex<String>>);

impl LogNote {
    pub fn set(&self, s: String) {
        if let Ok(mut n) = self.0.lock() {
            *n = s;
        }
    }

    fn get(&self) -> String {
        self.0.lock().map(|n| n.clone()).unwrap_or_default()
    }
}

/// The middleware: gives each request a [`LogNote`] and logs when the response is done.
pub async fn log_requests(State(enabled): State<bool>, mut req: Request, next: Next) -> Response {
    let note = LogNote::default();
    req.extensions_mut().insert(note.clone());
    let line = Line {
        client: req
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.to_string())
            .unwrap_or_else(|| "-".into()),
        method: req.method().to_string(),
        path: req.uri().path().to_string(),
        status: 0,
        start: Instant::now(),
        note,
        enabled,
    };
    let resp = next.run(req).await;
    let (parts, body) = resp.into_parts();
    let line = Line {
        status: parts.status.as_u16(),
        ..line
    };
    Response::from_parts(
        parts,
        Body::new(LoggedBody {
            inner: body,
            line: Some(line),
        }),
    )
}

struct Line {
    client: String,
    method: String,
    path: String,
    status: u16,
    start: Instant,
    note: LogNote,
    enabled: bool,
}

impl Line {
    fn write(self, complete: bool) {
        if !self.enabled {
            return;
        }
        let note = self.note.get();
        eprintln!(
            "hypura serve: {} {} {} {} {:.3} s{}{}",
            self.client,
            self.method,
            self.path,
            self.status,
            self.start.elapsed().as_secs_f64(),
            if note.is_empty() {
                String::new()
            } else {
                format!(" ({note})")
            },
            if complete { "" } else { " [client went away]" },
        );
    }
}

/// The response body, logging its request's line when it ends or is dropped.
struct LoggedBody {
    inner: Body,
    line: Option<Line>,
}

impl HttpBody for LoggedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = r {
            if let Some(line) = self.line.take() {
                line.write(true);
            }
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        if let Some(line) = self.line.take() {
            let complete = self.inner.is_end_stream();
            line.write(complete);
        }
    }
}
