//! The fake API server's HTTP side: routing, list/get/create/replace/delete,
//! and `Status` answers for errors.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::{Value, json};

use super::objects::{ApiError, status};
use super::resources::{Target, parse_path};
use super::selectors::Selector;
use super::watch::watch;
use super::{Availability, Shared};

/// Largest request body the fake reads.
const MAX_BODY: usize = 4 << 20;

pub(super) type Body = BoxBody<Bytes, Infallible>;

pub(super) fn json_response(code: u16, body: &Value) -> Response<Body> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(bytes)).boxed())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}

fn error(e: &ApiError) -> Response<Body> {
    json_response(e.code, &e.status())
}

fn bad_request(message: &str) -> Response<Body> {
    json_response(400, &status(400, "BadRequest", message))
}

/// Decodes `application/x-www-form-urlencoded` (`%XX` and `+`).
fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            other => out.push(other),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Query parameters of a request.
#[derive(Debug, Default)]
pub(super) struct Query(Vec<(String, String)>);

impl Query {
    fn parse(q: Option<&str>) -> Self {
        Query(
            q.unwrap_or("")
                .split('&')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once('=').unwrap_or((p, ""));
                    (decode(k), decode(v))
                })
                .collect(),
        )
    }

    pub(super) fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn flag(&self, key: &str) -> bool {
        matches!(self.get(key), Some("true" | "1"))
    }
}

async fn read_json(req: Request<Incoming>) -> Result<Value, Response<Body>> {
    let limited = http_body_util::Limited::new(req.into_body(), MAX_BODY);
    let bytes = limited
        .collect()
        .await
        .map_err(|_| bad_request("cannot read the request body"))?
        .to_bytes();
    serde_json::from_slice(&bytes)
        .map_err(|e| bad_request(&format!("the request body is not JSON: {e}")))
}

/// Handles one request.
pub(super) async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let query = Query::parse(req.uri().query());
    shared.log_request(req.method(), req.uri());
    if shared.availability() == Availability::Unavailable {
        return json_response(
            503,
            &status(
                503,
                "ServiceUnavailable",
                "the fake API server is down (test control)",
            ),
        );
    }
    let Some(target) = parse_path(&path) else {
        return json_response(
            404,
            &status(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ),
        );
    };
    let ns = target.namespace.clone().unwrap_or_default();
    match (req.method().clone(), target.name.clone()) {
        (Method::POST, None) => create(shared, &target, &ns, req).await,
        (_, _) if target.resource.create_only => json_response(
            405,
            &status(
                405,
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource",
            ),
        ),
        (Method::GET, None) => {
            let selector = match Selector::parse(
                query.get("labelSelector"),
                query.get("fieldSelector"),
                target.resource.kind,
            ) {
                Ok(s) => s,
                Err(e) => return bad_request(&e),
            };
            if query.flag("watch") {
                return watch(shared, target, selector, &query).await;
            }
            list(&shared, &target, &selector)
        }
        (Method::GET, Some(name)) => {
            let found = shared.objects().get(&target.resource, &ns, &name);
            found.map_or_else(|e| error(&e), |o| json_response(200, &o))
        }
        (Method::PUT, Some(name)) => {
            let obj = match read_json(req).await {
                Ok(o) => o,
                Err(r) => return r,
            };
            let out = shared.objects().replace(&target.resource, &ns, &name, obj);
            shared.notify();
            out.map_or_else(|e| error(&e), |o| json_response(200, &o))
        }
        (Method::DELETE, Some(name)) => {
            let out = shared.objects().delete(&target.resource, &ns, &name);
            shared.notify();
            out.map_or_else(|e| error(&e), |o| json_response(200, &o))
        }
        (Method::PATCH, _) => json_response(
            405,
            &status(
                405,
                "MethodNotAllowed",
                "PATCH is not implemented by the fake API server",
            ),
        ),
        _ => json_response(
            405,
            &status(
                405,
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource",
            ),
        ),
    }
}

fn list(shared: &Shared, target: &Target, selector: &Selector) -> Response<Body> {
    let (mut items, rv) =
        shared
            .objects()
            .list(&target.resource, target.namespace.as_deref(), selector);
    if !target.resource.custom {
        // Built-in kinds' list items carry no kind/apiVersion; custom resources keep them.
        for item in &mut items {
            if let Some(m) = item.as_object_mut() {
                m.remove("kind");
                m.remove("apiVersion");
            }
        }
    }
    json_response(
        200,
        &json!({
            "kind": format!("{}List", target.resource.kind),
            "apiVersion": target.resource.api_version(),
            "metadata": {"resourceVersion": rv.to_string()},
            "items": items,
        }),
    )
}

async fn create(
    shared: Arc<Shared>,
    target: &Target,
    ns: &str,
    req: Request<Incoming>,
) -> Response<Body> {
    let obj = match read_json(req).await {
        Ok(o) => o,
        Err(r) => return r,
    };
    if target.resource.create_only {
        let delay = shared.review_delay();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let answer = shared.reviews().review(&obj);
        return json_response(201, &answer);
    }
    if target.resource.namespaced && target.namespace.is_none() {
        return json_response(
            404,
            &status(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ),
        );
    }
    if let Some(body_ns) = obj.pointer("/metadata/namespace").and_then(Value::as_str)
        && !body_ns.is_empty()
        && body_ns != ns
    {
        return bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        );
    }
    let out = shared.objects().create(&target.resource, ns, obj, false);
    shared.notify();
    out.map_or_else(|e| error(&e), |o| json_response(201, &o))
}
