//! Watches in the fake API server: `?watch=true&resourceVersion=…`, answered
//! as a chunked stream of newline-delimited `WatchEvent` JSON, as the real
//! server writes them.
//!
//! From `resourceVersion` unset or `"0"`: a synthetic `ADDED` for every matching object,
//! then changes. From a later RV: every change after it (410 `Expired` as a single `ERROR`
//! event when that history was compacted). A change that moves an object into or out of
//! the selector is `ADDED` or `DELETED`, as the server's watch cache does. The stream ends
//! after `timeoutSeconds`, on [`super::FakeKube::disconnect_watches`] or when the server goes
//! down. Bookmarks are sent on [`super::FakeKube::send_bookmarks`] to watches that allowed them.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::Shared;
use super::objects::{Change, ChangeKind, status};
use super::resources::Target;
use super::selectors::Selector;
use super::server::{Body, Query, json_response};

fn event(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

/// The event a change is for a watch of `target` with `selector`, if any.
fn translate(change: &Change, target: &Target, selector: &Selector) -> Option<Bytes> {
    if change.resource != target.resource
        || target
            .namespace
            .as_deref()
            .is_some_and(|ns| ns != change.namespace)
    {
        return None;
    }
    let was = change.old.as_ref().is_some_and(|o| selector.matches(o));
    let is = selector.matches(&change.new);
    let kind = match (change.kind, was, is) {
        (ChangeKind::Deleted, true, _) => "DELETED",
        (ChangeKind::Deleted, false, _) => return None,
        (_, false, true) => "ADDED",
        (_, true, true) => "MODIFIED",
        (_, true, false) => "DELETED",
        (_, false, false) => return None,
    };
    Some(event(kind, &change.new))
}

type Tx = mpsc::Sender<Result<Frame<Bytes>, Infallible>>;

async fn send(tx: &Tx, bytes: Bytes) -> bool {
    tx.send(Ok(Frame::data(bytes))).await.is_ok()
}

pub(super) async fn watch(
    shared: Arc<Shared>,
    target: Target,
    selector: Selector,
    query: &Query,
) -> Response {
    let rv_param = query.get("resourceVersion").unwrap_or("");
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs);
    let bookmarks = matches!(query.get("allowWatchBookmarks"), Some("true" | "1"));
    let (tx, rx) = mpsc::channel(64);
    let mut initial = Vec::new();
    let start = {
        let mut objects = shared.objects();
        if rv_param.is_empty() || rv_param == "0" {
            let (items, rv) =
                objects.list(&target.resource, target.namespace.as_deref(), &selector);
            initial.extend(items.iter().map(|o| event("ADDED", o)));
            rv
        } else {
            let Ok(rv) = rv_param.parse::<u64>() else {
                return json_response(
                    400,
                    &status(
                        400,
                        "BadRequest",
                        &format!("invalid resource version {rv_param:?}"),
                    ),
                );
            };
            if let Some(oldest) = objects.watch_expired(&target.resource, rv) {
                let gone = status(
                    410,
                    "Expired",
                    &format!("too old resource version: {rv} ({oldest})"),
                );
                initial.push(event("ERROR", &gone));
                drop(objects);
                tokio::spawn(async move {
                    for line in initial {
                        if !send(&tx, line).await {
                            return;
                        }
                    }
                });
                return streaming(rx);
            }
            rv
        }
    };
    let mut changed = shared.changes.subscribe();
    let mut bookmark_requests = shared.bookmarks.subscribe();
    let mut disconnects = shared.disconnects.subscribe();
    tokio::spawn(async move {
        for line in initial {
            if !send(&tx, line).await {
                return;
            }
        }
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let mut pos = start;
        let mut bookmark_due = false;
        loop {
            let (changes, now_rv) = {
                let objects = shared.objects();
                (objects.changes_after(pos), objects.resource_version())
            };
            for change in changes {
                if let Some(line) = translate(&change, &target, &selector)
                    && !send(&tx, line).await
                {
                    return;
                }
            }
            // Every change up to now_rv has been seen, matching or not.
            pos = pos.max(now_rv);
            if std::mem::take(&mut bookmark_due) && bookmarks {
                let mark = json!({
                    "kind": target.resource.kind,
                    "apiVersion": target.resource.api_version(),
                    "metadata": {"resourceVersion": pos.to_string()},
                });
                if !send(&tx, event("BOOKMARK", &mark)).await {
                    return;
                }
            }
            let sleep_until = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => futures::future::pending().await,
                }
            };
            tokio::select! {
                c = changed.changed() => if c.is_err() { return },
                b = bookmark_requests.changed() => {
                    if b.is_err() { return }
                    bookmark_due = true;
                }
                _ = disconnects.changed() => return,
                _ = sleep_until => return,
                _ = tx.closed() => return,
            }
        }
    });
    streaming(rx)
}

type Response = http::Response<Body>;

fn streaming(rx: mpsc::Receiver<Result<Frame<Bytes>, Infallible>>) -> Response {
    http::Response::builder()
        .status(200)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(StreamBody::new(ReceiverStream::new(rx)).boxed())
        .unwrap_or_else(|_| http::Response::new(http_body_util::Empty::new().boxed()))
}
