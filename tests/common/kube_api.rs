//! A small Kubernetes API server for tests: the REST endpoints the driver's kube-rs client
//! uses, with the real API's shapes — list with `resourceVersion`, streaming watch events,
//! GET, server-side apply (PATCH), DELETE, `Status` errors. Runs on the test's tokio runtime.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::Path;
use std::sync::{Arc, Mutex};

use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};
use tokio::sync::mpsc;

pub const GROUP: &str = "secrets-store.csi.x-k8s.io";
const CLASSES: &str = "secretproviderclasses";
const STATUSES: &str = "secretproviderclasspodstatuses";

type Body = BoxBody<Bytes, Infallible>;

#[derive(Default)]
struct State {
    resource_version: u64,
    /// (resource, namespace, name) → object.
    objects: BTreeMap<(String, String, String), Value>,
    /// Versions of the group this server serves.
    served: Vec<String>,
    /// Open watch streams of classes (one JSON event per line).
    watchers: Vec<mpsc::UnboundedSender<String>>,
    /// While false, changes are not sent to watchers (a cache that has not caught up).
    deliver: bool,
    /// "METHOD path?query" of every request.
    log: Vec<String>,
}

pub struct FakeApi {
    pub url: String,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeApi {
    /// Listens on 127.0.0.1 serving the given versions of the group (e.g. `["v1", "v1alpha1"]`).
    pub async fn start(served: &[&str]) -> FakeApi {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake API");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let state = Arc::new(Mutex::new(State {
            served: served.iter().map(|v| v.to_string()).collect(),
            deliver: true,
            resource_version: 100,
            ..State::default()
        }));
        let shared = Arc::clone(&state);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let state = Arc::clone(&shared);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let state = Arc::clone(&state);
                        async move { Ok::<_, Infallible>(handle(&state, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        FakeApi { url, state, task }
    }

    /// A kubeconfig file that points kube-rs at this server.
    pub fn write_kubeconfig(&self, path: &Path) {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\nusers:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\ncurrent-context: fake\n",
            self.url
        );
        std::fs::write(path, text).expect("write kubeconfig");
    }

    /// Creates or replaces a SecretProviderClass (told to watchers as ADDED or MODIFIED).
    pub fn put_class(&self, namespace: &str, name: &str, provider: &str, params: &[(&str, &str)]) {
        let parameters: serde_json::Map<String, Value> = params
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        let obj = json!({
            "apiVersion": format!("{GROUP}/v1"),
            "kind": "SecretProviderClass",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"provider": provider, "parameters": parameters},
        });
        let mut s = lock(&self.state);
        let key = (CLASSES.to_string(), namespace.to_string(), name.to_string());
        let kind = if s.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        let obj = stamp(&mut s, obj);
        s.objects.insert(key, obj.clone());
        if s.deliver {
            let event = json!({"type": kind, "object": obj}).to_string();
            s.watchers.retain(|w| w.send(event.clone()).is_ok());
        }
    }

    /// Whether changes reach watchers (false: the driver's cache will not see new classes).
    pub fn deliver_watch_events(&self, on: bool) {
        lock(&self.state).deliver = on;
    }

    /// Every SecretProviderClassPodStatus, by namespace/name.
    pub fn pod_statuses(&self) -> BTreeMap<String, Value> {
        lock(&self.state)
            .objects
            .iter()
            .filter(|((r, _, _), _)| r == STATUSES)
            .map(|((_, ns, name), v)| (format!("{ns}/{name}"), v.clone()))
            .collect()
    }

    /// "METHOD path?query" of every request so far.
    pub fn requests(&self) -> Vec<String> {
        lock(&self.state).log.clone()
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// Gives an object a fresh resourceVersion (and a uid on creation), as the API server does.
fn stamp(s: &mut State, mut obj: Value) -> Value {
    s.resource_version += 1;
    let rv = s.resource_version.to_string();
    let meta = &mut obj["metadata"];
    meta["resourceVersion"] = json!(rv);
    if meta.get("uid").is_none() {
        meta["uid"] = json!(format!("uid-{rv}"));
    }
    obj
}

fn json_response(code: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}

/// A `Status` failure as the API server sends it.
fn failure(code: StatusCode, reason: &str, message: String) -> Response<Body> {
    json_response(
        code,
        &json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": message, "reason": reason, "code": code.as_u16(),
        }),
    )
}

async fn handle(state: &Mutex<State>, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    lock(state).log.push(format!("{method} {path}?{query}"));
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    // /apis/<group>/<version>/[namespaces/<ns>/]<resource>[/<name>]
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let not_found = || {
        failure(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource".into(),
        )
    };
    if parts.len() < 4 || parts[0] != "apis" || parts[1] != GROUP {
        return not_found();
    }
    let version = parts[2];
    if !lock(state).served.iter().any(|v| v == version) {
        return not_found();
    }
    let (namespace, rest) = match parts[3] {
        "namespaces" if parts.len() >= 6 => (Some(parts[4]), &parts[5..]),
        _ => (None, &parts[3..]),
    };
    let resource = rest[0];
    if resource != CLASSES && resource != STATUSES {
        return not_found();
    }
    let watch = query
        .split('&')
        .any(|q| q == "watch=true" || q == "watch=1");
    match (method, namespace, rest.get(1)) {
        (Method::GET, _, None) if watch => watch_classes(state, version),
        (Method::GET, ns, None) => list(state, version, resource, ns),
        (Method::GET, Some(ns), Some(name)) => {
            let key = (resource.to_string(), ns.to_string(), name.to_string());
            match lock(state).objects.get(&key) {
                Some(obj) => json_response(StatusCode::OK, &with_version(obj, version)),
                None => failure(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    format!("{resource}.{GROUP} \"{name}\" not found"),
                ),
            }
        }
        (Method::PATCH, Some(ns), Some(name)) => {
            let Ok(mut obj) = serde_json::from_slice::<Value>(&body) else {
                return failure(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "body is not JSON".into(),
                );
            };
            let key = (resource.to_string(), ns.to_string(), name.to_string());
            let mut s = lock(state);
            if obj["metadata"]["name"] != json!(name) {
                return failure(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "metadata.name does not match the URL".into(),
                );
            }
            obj["metadata"]["namespace"] = json!(ns);
            if let Some(uid) = s.objects.get(&key).and_then(|o| o["metadata"].get("uid")) {
                obj["metadata"]["uid"] = uid.clone();
            }
            let created = !s.objects.contains_key(&key);
            let obj = stamp(&mut s, obj);
            s.objects.insert(key, obj.clone());
            let code = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            json_response(code, &obj)
        }
        (Method::DELETE, Some(ns), Some(name)) => {
            let key = (resource.to_string(), ns.to_string(), name.to_string());
            match lock(state).objects.remove(&key) {
                Some(_) => json_response(
                    StatusCode::OK,
                    &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                            "details": {"name": name, "group": GROUP, "kind": resource}}),
                ),
                None => failure(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    format!("{resource}.{GROUP} \"{name}\" not found"),
                ),
            }
        }
        _ => failure(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "not supported by the fake API server".into(),
        ),
    }
}

/// An object as served under `version` (the same object under each served version).
fn with_version(obj: &Value, version: &str) -> Value {
    let mut obj = obj.clone();
    obj["apiVersion"] = json!(format!("{GROUP}/{version}"));
    obj
}

fn list(state: &Mutex<State>, version: &str, resource: &str, ns: Option<&str>) -> Response<Body> {
    let s = lock(state);
    let items: Vec<Value> = s
        .objects
        .iter()
        .filter(|((r, n, _), _)| r == resource && ns.is_none_or(|ns| ns == n))
        .map(|(_, o)| with_version(o, version))
        .collect();
    let kind = if resource == CLASSES {
        "SecretProviderClassList"
    } else {
        "SecretProviderClassPodStatusList"
    };
    json_response(
        StatusCode::OK,
        &json!({
            "apiVersion": format!("{GROUP}/{version}"), "kind": kind,
            "metadata": {"resourceVersion": s.resource_version.to_string()},
            "items": items,
        }),
    )
}

/// A watch: one JSON event per line, for as long as the client keeps the connection.
fn watch_classes(state: &Mutex<State>, version: &str) -> Response<Body> {
    let (tx, rx) = mpsc::unbounded_channel::<String>();
    lock(state).watchers.push(tx);
    let version = version.to_string();
    let events = futures::stream::unfold(rx, move |mut rx| {
        let version = version.clone();
        async move {
            let line = rx.recv().await?;
            // Serve the object under the watched version.
            let mut event: Value = serde_json::from_str(&line).ok()?;
            event["object"] = with_version(&event["object"], &version);
            Some((
                Ok::<_, Infallible>(Frame::data(Bytes::from(format!("{event}\n")))),
                rx,
            ))
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(StreamBody::new(events).boxed())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}
