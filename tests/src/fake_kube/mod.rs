//! A **fake** Kubernetes API server for tests: plain HTTP on 127.0.0.1,
//! speaking the real API's JSON and status codes for the objects Citadel
//! uses, driven through the real `kube` client ([`FakeKube::client`]).
//!
//! Served: core/v1 Pod, Namespace, ConfigMap, Secret; coordination.k8s.io/v1 Lease;
//! authentication.k8s.io/v1 TokenReview (POST only); security.istio.io/v1
//! AuthorizationPolicy, PeerAuthentication, RequestAuthentication. Verbs: list (label and
//! field selectors), watch, get, create (201, 409 AlreadyExists), replace (409 Conflict on
//! a stale resourceVersion), delete. One cluster-wide resourceVersion. Errors are `Status`
//! objects.
//!
//! Deliberately not served: PATCH (405), paging (`limit`/`continue` are ignored: a list
//! is one page), `resourceVersionMatch` (lists are always the latest state), streaming
//! lists, finalizers and graceful deletion (a delete removes at once; set
//! `metadata.deletionTimestamp` through [`FakeKube::update`] to model a terminating pod),
//! authentication of the fake's own callers, admission and validation of object bodies.
//!
//! Test controls: insert/update/remove objects directly ([`FakeKube::insert`] …), make the
//! next watch of a kind answer `410 Gone` ([`FakeKube::expire_next_watch`]), register and
//! revoke TokenReview tokens and count reviews, slow reviews down, go down and up
//! ([`FakeKube::set_availability`]), record requests.

mod builders;
mod objects;
pub mod resources;
mod selectors;
mod server;
mod token_review;
mod watch;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::watch as tokio_watch;

pub use builders::{ServiceAccountToken, namespace, pod, service_account_token};
pub use objects::ApiError;
pub use resources::Resource;
pub use token_review::{API_AUDIENCES, TokenInfo};

use objects::Objects;
use token_review::TokenReviews;

/// Whether the fake answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Availability {
    /// Serving.
    Up,
    /// Every request gets `503 ServiceUnavailable` (an API server behind a load balancer
    /// with no healthy backend); open watches end.
    Unavailable,
    /// Connections are closed without an answer (new ones at once, open ones on their next
    /// request); open watches end.
    Refusing,
}

pub(crate) struct Shared {
    objects: Mutex<Objects>,
    reviews: Mutex<TokenReviews>,
    availability: Mutex<Availability>,
    review_delay: Mutex<Duration>,
    requests: Mutex<Vec<String>>,
    changes: tokio_watch::Sender<u64>,
    bookmarks: tokio_watch::Sender<u64>,
    disconnects: tokio_watch::Sender<u64>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn objects(&self) -> MutexGuard<'_, Objects> {
        lock(&self.objects)
    }

    fn reviews(&self) -> MutexGuard<'_, TokenReviews> {
        lock(&self.reviews)
    }

    fn availability(&self) -> Availability {
        *lock(&self.availability)
    }

    fn review_delay(&self) -> Duration {
        *lock(&self.review_delay)
    }

    /// Wakes the open watches after a change.
    fn notify(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    fn log_request(&self, method: &http::Method, uri: &http::Uri) {
        lock(&self.requests).push(format!("{method} {uri}"));
    }
}

/// A running fake API server; stops when dropped.
pub struct FakeKube {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        self.task.abort();
        self.shared.disconnects.send_modify(|n| *n += 1);
    }
}

impl FakeKube {
    /// Starts the fake on `127.0.0.1:0`.
    pub async fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            objects: Mutex::new(Objects::default()),
            reviews: Mutex::new(TokenReviews::default()),
            availability: Mutex::new(Availability::Up),
            review_delay: Mutex::new(Duration::ZERO),
            requests: Mutex::new(Vec::new()),
            changes: tokio_watch::channel(0).0,
            bookmarks: tokio_watch::channel(0).0,
            disconnects: tokio_watch::channel(0).0,
        });
        let accept_shared = shared.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                if accept_shared.availability() == Availability::Refusing {
                    drop(stream);
                    continue;
                }
                let shared = accept_shared.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let shared = shared.clone();
                        async move {
                            // Refusing: requests on connections opened before also fail, with
                            // the connection closed and no answer.
                            if shared.availability() == Availability::Refusing {
                                return Err("the fake API server is refusing (test control)");
                            }
                            Ok(server::handle(shared, req).await)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(Self { addr, shared, task })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A `kube` configuration pointing at the fake (plain HTTP, default namespace
    /// `default`, kube's default retries).
    pub fn config(&self) -> kube::Config {
        let uri = self
            .url()
            .parse::<http::Uri>()
            .unwrap_or_else(|_| http::Uri::from_static("http://127.0.0.1"));
        kube::Config::new(uri)
    }

    /// A real `kube::Client` talking to the fake.
    pub fn client(&self) -> anyhow::Result<kube::Client> {
        Ok(kube::Client::try_from(self.config())?)
    }

    // ---- objects ----

    /// Stores `obj` of kind `res` directly, bypassing the API (creates it, or replaces it
    /// unconditionally); keeps a `metadata.uid` the object carries. Returns the stored object.
    pub fn insert(&self, res: Resource, obj: Value) -> Result<Value, ApiError> {
        let ns = obj
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let name = obj
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let out = {
            let mut objects = self.shared.objects();
            match objects.get(&res, &ns, &name) {
                Ok(_) => objects.replace_direct(&res, &ns, &name, obj),
                Err(_) => objects.create(&res, &ns, obj, true),
            }
        };
        self.shared.notify();
        out
    }

    /// Changes a stored object in place (a new resourceVersion, a `MODIFIED` event).
    pub fn update(
        &self,
        res: Resource,
        ns: &str,
        name: &str,
        change: impl FnOnce(&mut Value),
    ) -> Result<Value, ApiError> {
        let out = {
            let mut objects = self.shared.objects();
            let mut obj = objects.get(&res, ns, name)?;
            change(&mut obj);
            objects.replace_direct(&res, ns, name, obj)
        };
        self.shared.notify();
        out
    }

    /// Deletes a stored object (a `DELETED` event).
    pub fn remove(&self, res: Resource, ns: &str, name: &str) -> Result<Value, ApiError> {
        let out = self.shared.objects().delete(&res, ns, name);
        self.shared.notify();
        out
    }

    /// One stored object.
    pub fn get(&self, res: Resource, ns: &str, name: &str) -> Option<Value> {
        self.shared.objects().get(&res, ns, name).ok()
    }

    /// Stored objects of a kind (in `ns`, or everywhere).
    pub fn list(&self, res: Resource, ns: Option<&str>) -> Vec<Value> {
        let all = selectors::Selector::default();
        self.shared.objects().list(&res, ns, &all).0
    }

    /// The current cluster-wide resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.objects().resource_version()
    }

    // ---- watches ----

    /// The next watch of `res` gets `410 Gone` (an `ERROR` event with code 410, reason
    /// `Expired`, then the end of the stream), as after an etcd compaction.
    pub fn expire_next_watch(&self, res: Resource) {
        self.shared.objects().expire_next_watch(&res);
    }

    /// Forgets all history: watches from any older resourceVersion get `410 Gone`.
    pub fn compact(&self) {
        self.shared.objects().compact();
    }

    /// Sends a `BOOKMARK` with the current resourceVersion on every open watch that allowed
    /// bookmarks.
    pub fn send_bookmarks(&self) {
        self.shared.bookmarks.send_modify(|n| *n += 1);
    }

    /// Ends every open watch stream (as a server restart or a load balancer would).
    pub fn disconnect_watches(&self) {
        self.shared.disconnects.send_modify(|n| *n += 1);
    }

    // ---- TokenReview ----

    /// Makes `token` valid for `info`.
    pub fn register_token(&self, token: &str, info: TokenInfo) {
        self.shared.reviews().insert(token, info);
    }

    /// Makes `token` invalid.
    pub fn revoke_token(&self, token: &str) {
        self.shared.reviews().revoke(token);
    }

    /// TokenReviews answered so far.
    pub fn token_review_calls(&self) -> usize {
        self.shared.reviews().calls
    }

    /// Delays every TokenReview answer (to hold reviews in flight).
    pub fn set_token_review_delay(&self, delay: Duration) {
        *lock(&self.shared.review_delay) = delay;
    }

    /// Mimics an API server that ignores `spec.audiences` and reports its own audiences.
    pub fn ignore_requested_audiences(&self, ignore: bool) {
        self.shared.reviews().ignore_requested_audiences = ignore;
    }

    // ---- availability and introspection ----

    /// Takes the fake down or brings it back; going down ends open watches.
    pub fn set_availability(&self, availability: Availability) {
        *lock(&self.shared.availability) = availability;
        if availability != Availability::Up {
            self.disconnect_watches();
        }
    }

    /// Every request so far, as `METHOD /path?query`.
    pub fn requests(&self) -> Vec<String> {
        lock(&self.shared.requests).clone()
    }
}
