//! A Kubernetes API server test double: list and watch over HTTP/1.1.
//!
//! No kube-apiserver (nor etcd) can be installed here, so the agent's
//! Kubernetes source is tested against this fixture instead. It speaks the
//! part of the API the agent uses as the real server does:
//!
//! - `GET /api/v1/services`, `/apis/discovery.k8s.io/v1/endpointslices`,
//!   `/api/v1/nodes` (and the `namespaces/<ns>/` forms): a `ServiceList`
//!   etc. with `metadata.resourceVersion`; items carry no `kind` or
//!   `apiVersion`, as in real lists. `limit` is ignored, which is what the
//!   real server does for `resourceVersion=0` (served from its watch cache);
//! - `?watch=true&resourceVersion=N`: a chunked stream of newline-delimited
//!   `ADDED`/`MODIFIED`/`DELETED` events after N, then live ones;
//!   `BOOKMARK`s every second with `allowWatchBookmarks=true`; the stream
//!   ends cleanly after `timeoutSeconds`. Without `resourceVersion` (or with
//!   `0`) the current objects come first as `ADDED`;
//! - a watch from a resourceVersion older than the kept history gets
//!   `200 OK` and one `ERROR` event holding a `Status` with `code: 410`
//!   (`reason: Expired`), which forces the client to relist;
//! - `fieldSelector=metadata.name=X` / `metadata.namespace=X`;
//! - one resourceVersion counter over all kinds (etcd's revision); objects
//!   get `uid`, `resourceVersion` and `creationTimestamp`.
//!
//! Test hooks: [`ApiServer::apply`], [`ApiServer::delete`],
//! [`ApiServer::compact`] (forget history; live watches are cut, so their
//! resumption gets 410), [`ApiServer::drop_watches`] (connections cut
//! mid-stream, no terminating chunk), [`ApiServer::restart`] /
//! [`ApiServer::stop`] + [`ApiServer::start_again`] (listener and every
//! connection closed; the store survives, as etcd does), and counters of
//! what was served. Objects are `serde_json::Value`s in real API JSON; the
//! fixture does not validate them beyond `kind` and `metadata.name`, so bad
//! objects can be served on purpose.
//!
//! Plain std threads: one accept thread, one thread per connection. The
//! listener is bound on 127.0.0.1 inside the given network namespace (the
//! agent's), so nothing listens in the machine's own namespace.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use serde_json::{Value, json};

/// How often idle watch streams look for news, drops and shutdown.
const POLL: Duration = Duration::from_millis(50);
/// Interval between bookmarks on a watch that asked for them.
const BOOKMARK_EVERY: Duration = Duration::from_secs(1);

/// A resource the fixture serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Resource {
    kind: &'static str,
    api_version: &'static str,
    /// `/api/v1` or `/apis/<group>/<version>`.
    prefix: &'static str,
    plural: &'static str,
    namespaced: bool,
}

const RESOURCES: [Resource; 3] = [
    Resource {
        kind: "Service",
        api_version: "v1",
        prefix: "/api/v1",
        plural: "services",
        namespaced: true,
    },
    Resource {
        kind: "EndpointSlice",
        api_version: "discovery.k8s.io/v1",
        prefix: "/apis/discovery.k8s.io/v1",
        plural: "endpointslices",
        namespaced: true,
    },
    Resource {
        kind: "Node",
        api_version: "v1",
        prefix: "/api/v1",
        plural: "nodes",
        namespaced: false,
    },
];

fn resource_of_kind(kind: &str) -> Result<Resource> {
    RESOURCES
        .iter()
        .copied()
        .find(|resource| resource.kind == kind)
        .with_context(|| format!("the fixture does not serve kind {kind:?}"))
}

/// (kind, namespace, name); namespace "" for cluster-scoped kinds.
type StoreKey = (&'static str, String, String);

#[derive(Clone, Debug)]
struct WatchEvent {
    resource_version: u64,
    kind: &'static str,
    event_type: &'static str,
    object: Value,
}

#[derive(Debug, Default)]
struct Store {
    /// The last resourceVersion handed out (etcd's revision).
    revision: u64,
    /// Watches from a resourceVersion below this get 410 Gone.
    oldest_kept: u64,
    objects: BTreeMap<StoreKey, Value>,
    history: Vec<WatchEvent>,
    next_uid: u64,
    /// Bumped by `drop_watches`, `compact` and `stop`: watches of an older
    /// generation cut their connection.
    watch_generation: u64,
}

/// What the fixture served, for tests to check the protocol was exercised.
#[derive(Debug, Default)]
struct Counters {
    lists: AtomicU64,
    watches: AtomicU64,
    gone: AtomicU64,
}

#[derive(Debug)]
struct Shared {
    store: Mutex<Store>,
    changed: Condvar,
    counters: Counters,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Accepted connections: a handle to shut each down, and its thread.
type Connections = Arc<Mutex<Vec<(TcpStream, JoinHandle<()>)>>>;

/// A running listener: its accept thread and the connections it accepted.
#[derive(Debug)]
struct Serving {
    stop: Arc<AtomicBool>,
    accept_thread: Option<JoinHandle<()>>,
    connections: Connections,
}

/// The fixture. Dropping it closes everything.
#[derive(Debug)]
pub struct ApiServer {
    shared: Arc<Shared>,
    netns: PathBuf,
    addr: SocketAddr,
    serving: Mutex<Option<Serving>>,
}

impl ApiServer {
    /// Listens on 127.0.0.1 (a free port) inside the network namespace at
    /// `netns` (`/run/netns/<name>`, see `xtask::NetNs::path`).
    pub fn start_in(netns: &Path) -> Result<ApiServer> {
        let listener = bind_in(netns, 0)?;
        let addr = listener.local_addr()?;
        let server = ApiServer {
            shared: Arc::new(Shared {
                store: Mutex::new(Store::default()),
                changed: Condvar::new(),
                counters: Counters::default(),
            }),
            netns: netns.to_owned(),
            addr,
            serving: Mutex::new(None),
        };
        server.serve(listener)?;
        Ok(server)
    }

    /// `http://127.0.0.1:<port>` (as seen from inside the namespace).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig for this server (plain http, no credentials) to
    /// `dir/kubeconfig` and returns its path.
    pub fn write_kubeconfig(&self, dir: &Path) -> Result<PathBuf> {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fixture\n  cluster:\n    server: {}\n\
             users:\n- name: fixture\n  user: {{}}\ncontexts:\n- name: fixture\n  context:\n    \
             cluster: fixture\n    user: fixture\ncurrent-context: fixture\n",
            self.url()
        );
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// Creates or replaces an object (ADDED or MODIFIED). It needs `kind`
    /// and `metadata.name`; `apiVersion` is filled in when absent,
    /// `resourceVersion`, `uid` and `creationTimestamp` are set by the
    /// server. The rest is stored as given, valid or not. Returns the new
    /// resourceVersion.
    pub fn apply(&self, mut object: Value) -> Result<u64> {
        let kind = object
            .get("kind")
            .and_then(Value::as_str)
            .context("object without kind")?
            .to_owned();
        let resource = resource_of_kind(&kind)?;
        let name = object
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .context("object without metadata.name")?
            .to_owned();
        let namespace = if resource.namespaced {
            let namespace = object
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or("default")
                .to_owned();
            object["metadata"]["namespace"] = json!(namespace);
            namespace
        } else {
            String::new()
        };
        if object.get("apiVersion").is_none() {
            object["apiVersion"] = json!(resource.api_version);
        }
        let mut store = self.shared.lock();
        store.revision += 1;
        let revision = store.revision;
        let key: StoreKey = (resource.kind, namespace, name);
        let previous = store.objects.get(&key).cloned();
        let (uid, created) = match &previous {
            Some(old) => (
                old["metadata"]["uid"].clone(),
                old["metadata"]["creationTimestamp"].clone(),
            ),
            None => {
                store.next_uid += 1;
                (
                    json!(format!("00000000-0000-4000-8000-{:012}", store.next_uid)),
                    json!("2026-01-01T00:00:00Z"),
                )
            }
        };
        object["metadata"]["uid"] = uid;
        object["metadata"]["creationTimestamp"] = created;
        object["metadata"]["resourceVersion"] = json!(revision.to_string());
        store.objects.insert(key, object.clone());
        store.history.push(WatchEvent {
            resource_version: revision,
            kind: resource.kind,
            event_type: if previous.is_some() {
                "MODIFIED"
            } else {
                "ADDED"
            },
            object,
        });
        drop(store);
        self.shared.changed.notify_all();
        Ok(revision)
    }

    /// Deletes an object (DELETED, carrying the object at a new
    /// resourceVersion). `namespace` is ignored for cluster-scoped kinds.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> Result<u64> {
        let resource = resource_of_kind(kind)?;
        let namespace = if resource.namespaced { namespace } else { "" };
        let key: StoreKey = (resource.kind, namespace.to_owned(), name.to_owned());
        let mut store = self.shared.lock();
        let mut object = store
            .objects
            .remove(&key)
            .with_context(|| format!("no {kind} {namespace}/{name} to delete"))?;
        store.revision += 1;
        let revision = store.revision;
        object["metadata"]["resourceVersion"] = json!(revision.to_string());
        store.history.push(WatchEvent {
            resource_version: revision,
            kind: resource.kind,
            event_type: "DELETED",
            object,
        });
        drop(store);
        self.shared.changed.notify_all();
        Ok(revision)
    }

    /// Forgets the event history (etcd compaction after a watch-cache
    /// loss): every resourceVersion handed out so far becomes too old, live
    /// watches are cut, and their resumption gets `410 Gone`, forcing a
    /// relist. Lists still work and return a resourceVersion that can be
    /// watched from.
    pub fn compact(&self) {
        let mut store = self.shared.lock();
        store.revision += 1;
        store.oldest_kept = store.revision;
        store.history.clear();
        store.watch_generation += 1;
        drop(store);
        self.shared.changed.notify_all();
    }

    /// Cuts every watch connection mid-stream (no terminating chunk), as a
    /// load balancer or a crashing server would. History is kept, so the
    /// clients resume where they were.
    pub fn drop_watches(&self) {
        self.shared.lock().watch_generation += 1;
        self.shared.changed.notify_all();
    }

    /// Stops listening and closes every connection; the objects are kept.
    pub fn stop(&self) {
        self.drop_watches();
        let serving = lock(&self.serving).take();
        if let Some(mut serving) = serving {
            serving.stop.store(true, Ordering::Relaxed);
            if let Some(thread) = serving.accept_thread.take() {
                let _ = thread.join();
            }
            let connections = std::mem::take(&mut *lock(&serving.connections));
            for (stream, _) in &connections {
                let _ = stream.shutdown(Shutdown::Both);
            }
            for (_, thread) in connections {
                let _ = thread.join();
            }
        }
    }

    /// Listens again on the same address after [`ApiServer::stop`].
    pub fn start_again(&self) -> Result<()> {
        // The old listener is closed; its port may briefly linger.
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match bind_in(&self.netns, self.addr.port()) {
                Ok(listener) => break listener,
                Err(error) if Instant::now() < deadline => {
                    let _ = error;
                    thread::sleep(Duration::from_millis(50));
                }
                Err(error) => return Err(error),
            }
        };
        self.serve(listener)
    }

    /// [`ApiServer::stop`] then [`ApiServer::start_again`].
    pub fn restart(&self) -> Result<()> {
        self.stop();
        self.start_again()
    }

    /// List requests served so far.
    pub fn lists_served(&self) -> u64 {
        self.shared.counters.lists.load(Ordering::Relaxed)
    }

    /// Watch requests accepted so far (including those answered with 410).
    pub fn watches_served(&self) -> u64 {
        self.shared.counters.watches.load(Ordering::Relaxed)
    }

    /// `410 Gone` ERROR events sent so far.
    pub fn gone_sent(&self) -> u64 {
        self.shared.counters.gone.load(Ordering::Relaxed)
    }

    fn serve(&self, listener: TcpListener) -> Result<()> {
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let connections: Connections = Arc::default();
        let (shared, thread_stop, thread_connections) =
            (self.shared.clone(), stop.clone(), connections.clone());
        let accept_thread = thread::Builder::new()
            .name("apiserver".into())
            .spawn(move || accept_loop(listener, shared, thread_stop, thread_connections))?;
        *lock(&self.serving) = Some(Serving {
            stop,
            accept_thread: Some(accept_thread),
            connections,
        });
        Ok(())
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Binds 127.0.0.1:`port` from a thread that entered the namespace; the
/// socket stays in that namespace.
fn bind_in(netns: &Path, port: u16) -> Result<TcpListener> {
    let ns_file = File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
    thread::spawn(move || -> Result<TcpListener> {
        // SAFETY: plain syscall on a valid, open namespace file descriptor;
        // it changes only this (short-lived) thread's namespace.
        if unsafe { libc::setns(ns_file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error()).context("setns");
        }
        TcpListener::bind(("127.0.0.1", port)).with_context(|| format!("binding 127.0.0.1:{port}"))
    })
    .join()
    .map_err(|_| anyhow!("bind thread panicked"))?
}

fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    connections: Connections,
) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                let Ok(handle_for_stop) = stream.try_clone() else {
                    continue;
                };
                let (shared, stop) = (shared.clone(), stop.clone());
                let spawned =
                    thread::Builder::new()
                        .name("apiserver-conn".into())
                        .spawn(move || {
                            let _ = serve_connection(stream, &shared, &stop);
                        });
                if let Ok(thread) = spawned {
                    let mut connections = lock(&connections);
                    connections.retain(|(_, thread)| !thread.is_finished());
                    connections.push((handle_for_stop, thread));
                }
            }
            Err(_) => thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// One parsed request: the path and its query parameters (decoded).
struct Request {
    method: String,
    path: String,
    query: BTreeMap<String, String>,
}

/// Serves requests on one keep-alive connection until the client closes it
/// or the server stops.
fn serve_connection(stream: TcpStream, shared: &Shared, stop: &AtomicBool) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let Some(request) = read_request(&mut reader, stop)? else {
            return Ok(());
        };
        if request.method != "GET" {
            respond(
                &mut writer,
                405,
                &status_body(405, "MethodNotAllowed", "GET only"),
            )?;
            continue;
        }
        let Some((resource, namespace)) = route(&request.path) else {
            respond(
                &mut writer,
                404,
                &status_body(404, "NotFound", "no such resource"),
            )?;
            continue;
        };
        let selector = match Selector::parse(request.query.get("fieldSelector").map(String::as_str))
        {
            Ok(selector) => selector.with_namespace(namespace),
            Err(message) => {
                respond(&mut writer, 400, &status_body(400, "BadRequest", &message))?;
                continue;
            }
        };
        if request
            .query
            .get("watch")
            .is_some_and(|w| w == "true" || w == "1")
        {
            shared.counters.watches.fetch_add(1, Ordering::Relaxed);
            if !serve_watch(
                &mut writer,
                shared,
                stop,
                resource,
                &selector,
                &request.query,
            )? {
                // Cut mid-stream: the connection is gone.
                let _ = writer.shutdown(Shutdown::Both);
                return Ok(());
            }
        } else {
            shared.counters.lists.fetch_add(1, Ordering::Relaxed);
            let body = list_body(shared, resource, &selector);
            respond(&mut writer, 200, &body)?;
        }
    }
}

/// Reads the request line and headers (a GET has no body). `None` when the
/// client closed the connection or the server is stopping.
fn read_request(
    reader: &mut BufReader<TcpStream>,
    stop: &AtomicBool,
) -> std::io::Result<Option<Request>> {
    let mut head = Vec::<String>::new();
    let mut line = String::new();
    loop {
        if stop.load(Ordering::Relaxed) {
            return Ok(None);
        }
        match reader.read_line(&mut line) {
            Ok(0) => return Ok(None),
            Ok(_) => {
                if !line.ends_with('\n') {
                    continue; // A partial line; read_line appends the rest.
                }
                let trimmed = line.trim_end().to_owned();
                line.clear();
                if trimmed.is_empty() {
                    if head.is_empty() {
                        continue;
                    }
                    break;
                }
                head.push(trimmed);
            }
            Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(error) => return Err(error),
        }
    }
    let mut words = head[0].split_whitespace();
    let method = words.next().unwrap_or_default().to_owned();
    let target = words.next().unwrap_or_default();
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let query = query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(key), percent_decode(value))
        })
        .collect();
    Ok(Some(Request {
        method,
        path: percent_decode(path),
        query,
    }))
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let hex = |byte: u8| char::from(byte).to_digit(16);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&high), Some(&low)) => hex(high).zip(hex(low)),
            _ => None,
        };
        match escaped {
            Some((high, low)) => {
                // Two hex digits make at most 255.
                out.push((high * 16 + low) as u8);
                i += 3;
            }
            None => {
                out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `/api/v1/services` or `/api/v1/namespaces/ns/services` -> the resource
/// and the namespace (if any).
fn route(path: &str) -> Option<(Resource, Option<String>)> {
    RESOURCES.iter().find_map(|resource| {
        let rest = path.strip_prefix(resource.prefix)?.strip_prefix('/')?;
        if rest == resource.plural {
            return Some((*resource, None));
        }
        let (namespace, plural) = rest.strip_prefix("namespaces/")?.split_once('/')?;
        (resource.namespaced && plural == resource.plural)
            .then(|| (*resource, Some(namespace.to_owned())))
    })
}

/// The field selectors the agent uses: `metadata.name` and
/// `metadata.namespace` equality.
#[derive(Debug, Default)]
struct Selector {
    name: Option<String>,
    namespace: Option<String>,
}

impl Selector {
    fn parse(text: Option<&str>) -> Result<Selector, String> {
        let mut selector = Selector::default();
        for term in text.unwrap_or("").split(',').filter(|t| !t.is_empty()) {
            let (field, value) = term
                .split_once("==")
                .or_else(|| term.split_once('='))
                .ok_or_else(|| format!("invalid field selector term {term:?}"))?;
            match field {
                "metadata.name" => selector.name = Some(value.to_owned()),
                "metadata.namespace" => selector.namespace = Some(value.to_owned()),
                other => return Err(format!("field label not supported: {other}")),
            }
        }
        Ok(selector)
    }

    fn with_namespace(mut self, namespace: Option<String>) -> Selector {
        if namespace.is_some() {
            self.namespace = namespace;
        }
        self
    }

    fn matches(&self, object: &Value) -> bool {
        let field = |name: &str| {
            object
                .pointer(&format!("/metadata/{name}"))
                .and_then(Value::as_str)
        };
        self.name
            .as_deref()
            .is_none_or(|name| field("name") == Some(name))
            && self
                .namespace
                .as_deref()
                .is_none_or(|namespace| field("namespace") == Some(namespace))
    }
}

fn list_body(shared: &Shared, resource: Resource, selector: &Selector) -> Value {
    let store = shared.lock();
    let items: Vec<Value> = store
        .objects
        .iter()
        .filter(|((kind, _, _), object)| *kind == resource.kind && selector.matches(object))
        .map(|(_, object)| {
            let mut item = object.clone();
            if let Some(fields) = item.as_object_mut() {
                // List items carry no type meta in real API lists.
                fields.remove("kind");
                fields.remove("apiVersion");
            }
            item
        })
        .collect();
    json!({
        "kind": format!("{}List", resource.kind),
        "apiVersion": resource.api_version,
        "metadata": {"resourceVersion": store.revision.to_string()},
        "items": items,
    })
}

fn status_body(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    })
}

fn respond(writer: &mut TcpStream, code: u16, body: &Value) -> std::io::Result<()> {
    let text = body.to_string();
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Error",
    };
    write!(
        writer,
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{text}",
        text.len()
    )?;
    writer.flush()
}

fn write_chunk(writer: &mut TcpStream, event: &Value) -> std::io::Result<()> {
    let line = format!("{event}\n");
    write!(writer, "{:x}\r\n{line}\r\n", line.len())?;
    writer.flush()
}

/// Streams a watch. Returns false when the stream was cut (drop, stop),
/// true when it ended cleanly (timeout, 410) and the connection may serve
/// another request.
fn serve_watch(
    writer: &mut TcpStream,
    shared: &Shared,
    stop: &AtomicBool,
    resource: Resource,
    selector: &Selector,
    query: &BTreeMap<String, String>,
) -> std::io::Result<bool> {
    let bookmarks = query
        .get("allowWatchBookmarks")
        .is_some_and(|b| b == "true");
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map_or(Duration::from_secs(1800), Duration::from_secs);
    let deadline = Instant::now() + timeout;
    let requested: Option<u64> = query
        .get("resourceVersion")
        .filter(|rv| !rv.is_empty() && rv.as_str() != "0")
        .and_then(|rv| rv.parse().ok());

    let (generation, mut position, initial) = {
        let store = shared.lock();
        let initial: Vec<Value> = match requested {
            // Without a resourceVersion: the current state as ADDED first.
            None => store
                .objects
                .iter()
                .filter(|((kind, _, _), object)| *kind == resource.kind && selector.matches(object))
                .map(|(_, object)| json!({"type": "ADDED", "object": object}))
                .collect(),
            Some(_) => Vec::new(),
        };
        (
            store.watch_generation,
            requested.unwrap_or(store.revision),
            initial,
        )
    };
    writer.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
    )?;
    writer.flush()?;
    let too_old = {
        let store = shared.lock();
        requested
            .is_some_and(|rv| rv < store.oldest_kept)
            .then_some(store.oldest_kept)
    };
    if let Some(oldest) = too_old {
        shared.counters.gone.fetch_add(1, Ordering::Relaxed);
        let status = status_body(
            410,
            "Expired",
            &format!("too old resource version: {position} ({oldest})"),
        );
        write_chunk(writer, &json!({"type": "ERROR", "object": status}))?;
        writer.write_all(b"0\r\n\r\n")?;
        writer.flush()?;
        return Ok(true);
    }
    for event in &initial {
        write_chunk(writer, event)?;
    }
    let mut last_bookmark = Instant::now();
    loop {
        let (events, scanned_to) = {
            let store = shared.lock();
            if store.watch_generation != generation || stop.load(Ordering::Relaxed) {
                return Ok(false);
            }
            let events: Vec<Value> = store
                .history
                .iter()
                .filter(|event| {
                    event.resource_version > position
                        && event.kind == resource.kind
                        && selector.matches(&event.object)
                })
                .map(|event| json!({"type": event.event_type, "object": event.object}))
                .collect();
            // Everything up to here has been looked at.
            let scanned_to = store.revision.max(position);
            if events.is_empty() {
                // Wait for news; any change wakes this up early.
                drop(
                    shared
                        .changed
                        .wait_timeout(store, POLL)
                        .unwrap_or_else(PoisonError::into_inner),
                );
            }
            (events, scanned_to)
        };
        for event in &events {
            write_chunk(writer, event)?;
        }
        position = scanned_to;
        if bookmarks && last_bookmark.elapsed() >= BOOKMARK_EVERY {
            last_bookmark = Instant::now();
            // Only up to what this stream has seen: a bookmark promises that
            // everything before it was delivered.
            write_chunk(
                writer,
                &json!({"type": "BOOKMARK", "object": {
                    "kind": resource.kind, "apiVersion": resource.api_version,
                    "metadata": {"resourceVersion": position.to_string()}}}),
            )?;
        }
        if Instant::now() >= deadline {
            writer.write_all(b"0\r\n\r\n")?;
            writer.flush()?;
            return Ok(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_and_selectors() {
        assert_eq!(route("/api/v1/services").map(|r| r.0.kind), Some("Service"));
        assert_eq!(
            route("/api/v1/namespaces/kube-system/services").map(|r| r.1),
            Some(Some("kube-system".to_owned()))
        );
        assert_eq!(
            route("/apis/discovery.k8s.io/v1/endpointslices").map(|r| r.0.kind),
            Some("EndpointSlice")
        );
        assert!(route("/api/v1/namespaces/x/nodes").is_none());
        assert!(route("/api/v1/pods").is_none());
        let selector = Selector::parse(Some("metadata.name=node-1")).expect("parse");
        assert!(selector.matches(&json!({"metadata": {"name": "node-1"}})));
        assert!(!selector.matches(&json!({"metadata": {"name": "node-2"}})));
        assert!(Selector::parse(Some("spec.nodeName=x")).is_err());
        assert_eq!(
            percent_decode("metadata.name%3Dnode-1"),
            "metadata.name=node-1"
        );
        assert_eq!(percent_decode("100%"), "100%");
    }
}
