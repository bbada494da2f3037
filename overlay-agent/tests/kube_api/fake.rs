//! A fake of the Kubernetes API server's HTTP API for Nodes, enough for a kube-rs
//! watcher and a status patch: paged lists (`limit`, `continue`), watches from a
//! resourceVersion with a bounded event history (too old: a 410 `Expired` ERROR event,
//! as the real server sends it), JSON merge and strategic merge patches of
//! `nodes/NAME/status`, reads of single Pods (`namespaces/NS/pods/NAME`, where
//! flanneld finds its node), injected failures (HTTP errors, closed watches, refused
//! connections), and a log of every request. Objects are real `kubectl get -o json` documents, stored serialized.
//!
//! HTTP/1.1, one request per connection (`Connection: close`); watch bodies are
//! chunked and stay open until the watch ends.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinSet,
};

/// Which requests a fault applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Which {
    /// The first page of a list.
    ListStart,
    /// A later page (a `continue` token).
    ListContinue,
    Watch,
    Patch,
}

/// One request as the fake received it.
#[derive(Debug, Clone)]
pub(super) struct Request {
    pub method: String,
    pub path: String,
    pub query: BTreeMap<String, String>,
    pub content_type: Option<String>,
    pub body: String,
    /// What the fake answered (200, or the injected failure).
    pub status: u16,
}

impl Request {
    pub(super) fn which(&self) -> Option<Which> {
        match (self.method.as_str(), self.path.as_str()) {
            ("GET", "/api/v1/nodes")
                if self
                    .query
                    .get("watch")
                    .is_some_and(|w| w == "true" || w == "1") =>
            {
                Some(Which::Watch)
            }
            ("GET", "/api/v1/nodes") if self.query.contains_key("continue") => {
                Some(Which::ListContinue)
            }
            ("GET", "/api/v1/nodes") => Some(Which::ListStart),
            ("PATCH", _) => Some(Which::Patch),
            _ => None,
        }
    }
}

struct Fault {
    which: Which,
    status: u16,
    remaining: usize,
}

/// A list's resourceVersion and serialized items.
type Snapshot = (u64, Arc<Vec<Arc<str>>>);

#[derive(Default)]
struct State {
    rv: u64,
    /// Node name -> (object, its serialized form).
    nodes: BTreeMap<String, (Value, Arc<str>)>,
    /// Watch events since `oldest`: (resourceVersion, serialized event line).
    history: VecDeque<(u64, Arc<str>)>,
    /// Watches from before this resourceVersion are answered 410.
    oldest: u64,
    /// Consistent snapshots behind `continue` tokens.
    snapshots: HashMap<u64, Snapshot>,
    next_snapshot: u64,
    faults: Vec<Fault>,
    requests: Vec<Request>,
    /// "namespace/name" -> Pod.
    pods: BTreeMap<String, Value>,
}

/// What open watches are told, besides new events.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
struct Generation {
    /// Bumped for every new event.
    events: u64,
    /// Bumped to end every open watch with a 410 `Expired` event.
    expired: u64,
    /// Bumped to drop every open watch connection without a word.
    dropped: u64,
}

struct Shared {
    state: Mutex<State>,
    generation: watch::Sender<Generation>,
    /// Watches streaming now.
    open_watches: AtomicUsize,
}

pub(super) struct FakeApi {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    server: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl FakeApi {
    /// Starts serving on a free loopback port.
    pub(super) async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api = Self {
            addr: listener.local_addr().unwrap(),
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    rv: 1000,
                    oldest: 1000,
                    ..State::default()
                }),
                generation: watch::Sender::new(Generation::default()),
                open_watches: Default::default(),
            }),
            server: Mutex::new(None),
        };
        api.serve(listener);
        api
    }

    pub(super) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn serve(&self, listener: TcpListener) {
        let shared = Arc::clone(&self.shared);
        let task = tokio::spawn(async move {
            // Connections live in the set: ending the server ends them all.
            let mut connections = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        if let Ok((socket, _)) = accepted {
                            connections.spawn(handle(socket, Arc::clone(&shared)));
                        }
                    }
                    Some(_) = connections.join_next() => {}
                }
            }
        });
        *self.server.lock().unwrap() = Some(task);
    }

    /// Stops listening and closes every connection: clients get "connection refused".
    pub(super) async fn stop(&self) {
        let task = self.server.lock().unwrap().take();
        if let Some(task) = task {
            task.abort();
            let _ = task.await;
        }
    }

    /// Listens again on the same address.
    pub(super) async fn resume(&self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.serve(listener);
    }

    fn with_state<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.shared.state.lock().unwrap())
    }

    /// Adds or replaces a node (a full Node document), as a watch event.
    pub(super) fn apply(&self, node: Value) {
        self.with_state(|s| s.apply(node));
        self.shared.generation.send_modify(|g| g.events += 1);
    }

    /// Deletes a node, as a watch event.
    pub(super) fn delete(&self, name: &str) {
        let removed = self.with_state(|s| {
            let (mut node, _) = s.nodes.remove(name)?;
            s.rv += 1;
            node["metadata"]["resourceVersion"] = s.rv.to_string().into();
            let line = event_line("DELETED", &node.to_string());
            s.history.push_back((s.rv, line));
            Some(())
        });
        assert!(removed.is_some(), "no node {name} to delete");
        self.shared.generation.send_modify(|g| g.events += 1);
    }

    /// Deletes a node, and compacts its event away before any watch sees it: what a
    /// watcher that was away when it happened finds.
    pub(super) fn delete_unseen(&self, name: &str) {
        self.with_state(|s| {
            assert!(s.nodes.remove(name).is_some(), "no node {name}");
            s.rv += 1;
            s.compact();
        });
    }

    /// Adds or replaces a node, and compacts its event away before any watch sees it.
    pub(super) fn apply_unseen(&self, node: Value) {
        self.with_state(|s| {
            s.apply(node);
            s.compact();
        });
    }

    /// Forgets the event history (etcd compaction): watches resuming from before now
    /// get 410 and must relist.
    pub(super) fn compact(&self) {
        self.with_state(State::compact);
    }

    /// How many watches are streaming.
    pub(super) fn open_watches(&self) -> usize {
        self.shared.open_watches.load(Ordering::SeqCst)
    }

    /// Ends every open watch with a 410 `Expired` ERROR event.
    pub(super) fn expire_watches(&self) {
        self.shared.generation.send_modify(|g| g.expired += 1);
    }

    /// Drops every open watch connection, as a restarting API server or a load
    /// balancer would.
    pub(super) fn drop_watches(&self) {
        self.shared.generation.send_modify(|g| g.dropped += 1);
    }

    /// Answers the next `times` requests of kind `which` with HTTP `status`.
    pub(super) fn fail(&self, which: Which, status: u16, times: usize) {
        self.with_state(|s| {
            s.faults.push(Fault {
                which,
                status,
                remaining: times,
            })
        });
    }

    pub(super) fn requests(&self) -> Vec<Request> {
        self.with_state(|s| s.requests.clone())
    }

    pub(super) fn count(&self, which: Which) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.which() == Some(which))
            .count()
    }

    pub(super) fn patches(&self) -> Vec<Request> {
        self.requests()
            .into_iter()
            .filter(|r| r.which() == Some(Which::Patch))
            .collect()
    }

    /// The node as the server has it now.
    pub(super) fn node(&self, name: &str) -> Option<Value> {
        self.with_state(|s| s.nodes.get(name).map(|(v, _)| v.clone()))
    }

    /// Adds (or replaces) a Pod.
    pub(super) fn add_pod(&self, pod: Value) {
        let key = format!(
            "{}/{}",
            pod["metadata"]["namespace"].as_str().unwrap(),
            pod["metadata"]["name"].as_str().unwrap()
        );
        self.with_state(|s| s.pods.insert(key, pod));
    }
}

impl State {
    fn apply(&mut self, mut node: Value) {
        let name = node["metadata"]["name"].as_str().unwrap().to_owned();
        self.rv += 1;
        node["metadata"]["resourceVersion"] = self.rv.to_string().into();
        let kind = if self.nodes.contains_key(&name) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        let text: Arc<str> = node.to_string().into();
        self.history.push_back((self.rv, event_line(kind, &text)));
        self.nodes.insert(name, (node, text));
    }

    fn compact(&mut self) {
        self.history.clear();
        self.oldest = self.rv;
    }

    /// The injected failure for `which`, if one is left.
    fn fault(&mut self, which: Option<Which>) -> Option<u16> {
        let fault = self
            .faults
            .iter_mut()
            .find(|f| Some(f.which) == which && f.remaining > 0)?;
        fault.remaining -= 1;
        Some(fault.status)
    }
}

fn event_line(kind: &str, object: &str) -> Arc<str> {
    format!("{{\"type\":\"{kind}\",\"object\":{object}}}\n").into()
}

fn status_body(code: u16, reason: &str, message: &str) -> String {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    })
    .to_string()
}

async fn handle(socket: TcpStream, shared: Arc<Shared>) {
    let mut stream = BufReader::new(socket);
    let Some(mut request) = read_request(&mut stream).await else {
        return;
    };
    let which = request.which();
    let fault = shared.state.lock().unwrap().fault(which);
    // A patch is applied before it is recorded: a test that sees the patch can read
    // the node it made (and a write of its own cannot land in between and be lost).
    let patched =
        (fault.is_none() && which == Some(Which::Patch)).then(|| patch(&shared, &request));
    request.status = fault
        .or(patched.as_ref().map(|(code, _)| *code))
        .unwrap_or(200);
    shared.state.lock().unwrap().requests.push(request.clone());
    let socket = stream.get_mut();
    if let Some(code) = fault {
        let body = status_body(code, "InternalError", "injected failure");
        respond(socket, code, &body).await;
        return;
    }
    match which {
        Some(Which::ListStart | Which::ListContinue) => {
            let body = list(&shared, &request);
            match body {
                Ok(body) => respond(socket, 200, &body).await,
                Err(body) => respond(socket, 410, &body).await,
            }
        }
        Some(Which::Watch) => {
            shared.open_watches.fetch_add(1, Ordering::SeqCst);
            watch_nodes(socket, &shared, &request).await;
            shared.open_watches.fetch_sub(1, Ordering::SeqCst);
        }
        Some(Which::Patch) => {
            if let Some((code, body)) = patched {
                respond(socket, code, &body).await;
            }
        }
        None => {
            // A GET of one Pod or one Node.
            let object = {
                let state = shared.state.lock().unwrap();
                match (pod_key(&request), node_key(&request)) {
                    (Some(key), _) => Some(("pods", state.pods.get(&key).cloned())),
                    (_, Some(name)) => {
                        Some(("nodes", state.nodes.get(name).map(|(v, _)| v.clone())))
                    }
                    _ => None,
                }
            };
            match object {
                Some((_, Some(object))) => respond(socket, 200, &object.to_string()).await,
                Some((kind, None)) => {
                    let body = status_body(404, "NotFound", &format!("{kind} not found"));
                    respond(socket, 404, &body).await;
                }
                None => {
                    let body = status_body(404, "NotFound", "not served by the fake");
                    respond(socket, 404, &body).await;
                }
            }
        }
    }
}

/// "namespace/name" of a GET of one Pod.
fn pod_key(request: &Request) -> Option<String> {
    let rest = request.path.strip_prefix("/api/v1/namespaces/")?;
    let (namespace, name) = rest.split_once("/pods/")?;
    (request.method == "GET" && !name.contains('/')).then(|| format!("{namespace}/{name}"))
}

/// The name in a GET of one Node.
fn node_key(request: &Request) -> Option<&str> {
    let name = request.path.strip_prefix("/api/v1/nodes/")?;
    (request.method == "GET" && !name.contains('/')).then_some(name)
}

async fn read_request(stream: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut line = String::new();
    stream.read_line(&mut line).await.ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_owned();
    let target = parts.next()?.to_owned();
    let mut length = 0;
    let mut content_type = None;
    loop {
        let mut header = String::new();
        stream.read_line(&mut header).await.ok()?;
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        let (name, value) = header.split_once(':')?;
        match name.to_ascii_lowercase().as_str() {
            "content-length" => length = value.trim().parse().ok()?,
            "content-type" => content_type = Some(value.trim().to_owned()),
            _ => {}
        }
    }
    let mut body = vec![0; length];
    stream.read_exact(&mut body).await.ok()?;
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let query = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (k.to_owned(), percent_decode(v))
        })
        .collect();
    Some(Request {
        method,
        path: path.to_owned(),
        query,
        content_type,
        body: String::from_utf8(body).ok()?,
        status: 0,
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(v) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn respond(socket: &mut TcpStream, code: u16, body: &str) {
    let head = format!(
        "HTTP/1.1 {code} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        reason(code),
        body.len()
    );
    let _ = socket.write_all(head.as_bytes()).await;
    let _ = socket.write_all(body.as_bytes()).await;
    let _ = socket.shutdown().await;
}

fn reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        404 => "Not Found",
        410 => "Gone",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// One page of a consistent list: the first page takes a snapshot, `continue` tokens
/// walk it.
fn list(shared: &Shared, request: &Request) -> Result<String, String> {
    let mut s = shared.state.lock().unwrap();
    let limit: usize = request
        .query
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    let (id, offset): (u64, usize) = match request.query.get("continue") {
        Some(token) => {
            let (id, offset) = token
                .split_once(':')
                .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
                .ok_or_else(|| status_body(410, "Expired", "bad continue token"))?;
            (id, offset)
        }
        None => {
            let id = s.next_snapshot;
            s.next_snapshot += 1;
            let items = s.nodes.values().map(|(_, t)| Arc::clone(t)).collect();
            let rv = s.rv;
            s.snapshots.insert(id, (rv, Arc::new(items)));
            (id, 0)
        }
    };
    let (rv, items) = s
        .snapshots
        .get(&id)
        .cloned()
        .ok_or_else(|| status_body(410, "Expired", "continue token expired"))?;
    drop(s);
    let end = offset.saturating_add(limit).min(items.len());
    let page = &items[offset.min(end)..end];
    let cont = if end < items.len() {
        format!(",\"continue\":\"{id}:{end}\"")
    } else {
        shared.state.lock().unwrap().snapshots.remove(&id);
        String::new()
    };
    let mut body = format!(
        "{{\"kind\":\"NodeList\",\"apiVersion\":\"v1\",\"metadata\":{{\"resourceVersion\":\"{rv}\"{cont}}},\"items\":["
    );
    for (i, item) in page.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(item);
    }
    body.push_str("]}");
    Ok(body)
}

/// Streams events after the requested resourceVersion until the watch times out, is
/// expired or dropped, or the client goes away.
async fn watch_nodes(socket: &mut TcpStream, shared: &Shared, request: &Request) {
    let from: u64 = request
        .query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let timeout = request
        .query
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .map_or(Duration::from_secs(290), Duration::from_secs);
    let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    if socket.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    let mut generation = shared.generation.subscribe();
    let start = *generation.borrow_and_update();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut position = from;
    loop {
        let (lines, too_old) = {
            let s = shared.state.lock().unwrap();
            if position < s.oldest {
                (Vec::new(), true)
            } else {
                let lines: Vec<(u64, Arc<str>)> = s
                    .history
                    .iter()
                    .filter(|(rv, _)| *rv > position)
                    .cloned()
                    .collect();
                (lines, false)
            }
        };
        let now = *generation.borrow_and_update();
        if now.dropped != start.dropped {
            // No final chunk: the connection just goes away.
            return;
        }
        if too_old || now.expired != start.expired {
            let gone = status_body(410, "Expired", "too old resource version");
            let line = format!("{{\"type\":\"ERROR\",\"object\":{gone}}}\n");
            let _ = write_chunk(socket, &line).await;
            break;
        }
        for (rv, line) in lines {
            if write_chunk(socket, &line).await.is_err() {
                return;
            }
            position = rv;
        }
        tokio::select! {
            changed = generation.changed() => if changed.is_err() { return },
            () = tokio::time::sleep_until(deadline) => break,
        }
    }
    let _ = socket.write_all(b"0\r\n\r\n").await;
    let _ = socket.shutdown().await;
}

async fn write_chunk(socket: &mut TcpStream, data: &str) -> std::io::Result<()> {
    socket
        .write_all(format!("{:x}\r\n{data}\r\n", data.len()).as_bytes())
        .await
}

/// A patch of `/api/v1/nodes/NAME/status`: a JSON merge patch (RFC 7386), or a
/// strategic merge patch as the API server applies it to a Node: the same, except
/// that the lists of `NodeStatus` with a patch merge key (`conditions` and
/// `addresses`, on `type`) are merged entry by entry on it (kubernetes/api
/// `core/v1/types.go`, `patchStrategy:"merge" patchMergeKey:"type"`); patch
/// directives (`$patch`, `$retainKeys`...) are refused.
fn patch(shared: &Shared, request: &Request) -> (u16, String) {
    let Some(name) = request
        .path
        .strip_prefix("/api/v1/nodes/")
        .and_then(|p| p.strip_suffix("/status"))
    else {
        return (404, status_body(404, "NotFound", "only nodes/NAME/status"));
    };
    let strategic = match request.content_type.as_deref() {
        Some("application/merge-patch+json") => false,
        Some("application/strategic-merge-patch+json") => true,
        _ => {
            return (
                415,
                status_body(415, "UnsupportedMediaType", "merge patches only"),
            );
        }
    };
    let Ok(patch) = serde_json::from_str::<Value>(&request.body) else {
        return (400, status_body(400, "BadRequest", "patch is not JSON"));
    };
    if strategic && request.body.contains("\"$") {
        return (
            422,
            status_body(422, "Invalid", "the fake takes no patch directives"),
        );
    }
    let node = {
        let mut s = shared.state.lock().unwrap();
        let Some((node, _)) = s.nodes.get(name) else {
            return (404, status_body(404, "NotFound", "no such node"));
        };
        let mut node = node.clone();
        merge(&mut node, &patch, strategic);
        s.apply(node);
        s.nodes[name].1.to_string()
    };
    shared.generation.send_modify(|g| g.events += 1);
    (200, node)
}

fn merge(target: &mut Value, patch: &Value, strategic: bool) {
    let Value::Object(fields) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let object = target.as_object_mut().unwrap();
    for (key, value) in fields {
        let keyed_list = strategic && ["conditions", "addresses"].contains(&key.as_str());
        match (value, object.get_mut(key)) {
            (Value::Null, _) => {
                object.remove(key);
            }
            (Value::Array(entries), Some(Value::Array(list))) if keyed_list => {
                for entry in entries {
                    match list.iter_mut().find(|e| e["type"] == entry["type"]) {
                        Some(existing) => merge(existing, entry, strategic),
                        None => list.push(entry.clone()),
                    }
                }
            }
            _ => merge(
                object.entry(key.clone()).or_insert(Value::Null),
                value,
                strategic,
            ),
        }
    }
}
