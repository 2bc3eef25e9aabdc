//! Health endpoints: a healthCheckNodePort server per externalTrafficPolicy
//! Local LoadBalancer service (what cloud load balancers probe to find the
//! nodes with local endpoints), and the agent's own `/healthz` and `/livez`
//! with kube-proxy's meaning (`pkg/proxy/healthcheck`): `/healthz` also
//! fails while the node should get no new traffic (being deleted, or marked
//! for deletion by the cluster autoscaler), `/livez` only when the agent
//! itself is stuck, so a liveness probe on it never restarts an agent that
//! is merely on a node going away.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant, SystemTime},
};

use k8s_openapi::api::core::v1::Node;
use serde_json::json;
use tokio::{net::TcpListener, task::JoinHandle};

use crate::{
    http::{self, Handler, Response},
    model::HealthCheck,
};

/// How long an update may wait to be programmed before `/healthz` fails
/// (kube-proxy: twice its 30 s sync period).
pub const HEALTHZ_TIMEOUT: Duration = Duration::from_secs(60);

/// The taint the cluster autoscaler puts on a node it is about to delete.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// kube-proxy's `nodeEligible`: a Node being deleted, or tainted for
/// deletion by the cluster autoscaler, should get no new external traffic.
pub fn node_eligible(node: &Node) -> bool {
    node.metadata.deletion_timestamp.is_none()
        && !node
            .spec
            .as_ref()
            .and_then(|spec| spec.taints.as_deref())
            .unwrap_or_default()
            .iter()
            .any(|taint| taint.key == TO_BE_DELETED_TAINT)
}

#[derive(Default)]
struct Progress {
    last_updated: Option<SystemTime>,
    pending_since: Option<Instant>,
    node_eligible: bool,
}

/// Whether the agent keeps the datapath up to date.
#[derive(Clone)]
pub struct Healthz(Arc<Mutex<Progress>>);

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicked holder leaves plain data behind; keep serving it.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Default for Healthz {
    fn default() -> Self {
        Healthz(Arc::new(Mutex::new(Progress {
            node_eligible: true,
            ..Progress::default()
        })))
    }
}

impl Healthz {
    /// A change of cluster state arrived and waits to be programmed.
    pub fn queued(&self) {
        let mut p = lock(&self.0);
        p.pending_since.get_or_insert_with(Instant::now);
    }

    /// Everything that arrived has been programmed.
    pub fn updated(&self) {
        let mut p = lock(&self.0);
        p.pending_since = None;
        p.last_updated = Some(SystemTime::now());
    }

    /// Whether this node should receive external traffic ([`node_eligible`]).
    pub fn set_node_eligible(&self, eligible: bool) {
        lock(&self.0).node_eligible = eligible;
    }

    /// Healthy once programmed, and while no update waits too long; the
    /// node's eligibility does not count (`/livez`).
    pub fn healthy(&self) -> bool {
        let p = lock(&self.0);
        p.last_updated.is_some()
            && p.pending_since
                .is_none_or(|since| since.elapsed() < HEALTHZ_TIMEOUT)
    }

    /// `/healthz`: healthy and the node eligible; `/livez`: healthy.
    fn response(&self, with_node: bool) -> Response {
        let healthy = self.healthy();
        let p = lock(&self.0);
        let mut body = json!({
            "lastUpdated": p.last_updated.map(http::rfc3339).unwrap_or_default(),
            "currentTime": http::rfc3339(SystemTime::now()),
        });
        let ok = if with_node {
            body["nodeEligible"] = p.node_eligible.into();
            healthy && p.node_eligible
        } else {
            healthy
        };
        Response::json(if ok { 200 } else { 503 }, body.to_string())
    }

    /// Serves `/healthz` and `/livez` on `listener`.
    pub async fn serve(self, listener: TcpListener) {
        let handler: Handler = Arc::new(move |method, path| match (method, path) {
            ("GET", "/healthz") => self.response(true),
            ("GET", "/livez") => self.response(false),
            ("GET", _) => Response::json(404, r#"{"error":"try /healthz"}"#.into()),
            _ => Response::json(405, r#"{"error":"GET only"}"#.into()),
        });
        http::serve(listener, handler).await;
    }
}

/// The healthCheckNodePort servers, started and stopped as services come
/// and go; each answers from the latest programmed state.
pub struct HealthCheckServers {
    checks: Arc<Mutex<BTreeMap<u16, HealthCheck>>>,
    /// One server per listening socket: a dual-stack one, or one per
    /// family where the host keeps IPv6 sockets IPv6-only.
    servers: BTreeMap<u16, Vec<JoinHandle<()>>>,
    healthz: Healthz,
}

impl HealthCheckServers {
    pub fn new(healthz: Healthz) -> Self {
        HealthCheckServers {
            checks: Arc::default(),
            servers: BTreeMap::new(),
            healthz,
        }
    }

    /// Ports currently served.
    pub fn ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.servers.keys().copied()
    }

    /// Makes the servers match `wanted`. A port that cannot be bound is
    /// reported naming the service and retried at the next sync.
    pub async fn sync(&mut self, wanted: &BTreeMap<u16, HealthCheck>) -> Vec<String> {
        *lock(&self.checks) = wanted.clone();
        let gone: Vec<u16> = self
            .servers
            .keys()
            .filter(|port| !wanted.contains_key(port))
            .copied()
            .collect();
        for port in gone {
            if let Some(tasks) = self.servers.remove(&port) {
                tasks.iter().for_each(JoinHandle::abort);
                log::info!("healthCheckNodePort {port}: stopped");
            }
        }
        let mut errors = Vec::new();
        for (port, check) in wanted {
            if self.servers.contains_key(port) {
                continue;
            }
            match bind_both_families(*port).await {
                Ok(listeners) => {
                    let tasks = listeners
                        .into_iter()
                        .map(|listener| tokio::spawn(http::serve(listener, self.handler(*port))))
                        .collect();
                    self.servers.insert(*port, tasks);
                    log::info!(
                        "healthCheckNodePort {port}: serving Service {}",
                        check.service
                    );
                }
                Err(e) => errors.push(format!(
                    "Service {}: spec.healthCheckNodePort: cannot listen on port {port}: {e}",
                    check.service
                )),
            }
        }
        errors
    }

    fn handler(&self, port: u16) -> Handler {
        let checks = self.checks.clone();
        let healthz = self.healthz.clone();
        Arc::new(move |_method, _path| {
            let Some(check) = lock(&checks).get(&port).cloned() else {
                return Response::json(404, r#"{"error":"no such service"}"#.into());
            };
            let body = json!({
                "service": {"namespace": check.service.namespace, "name": check.service.name},
                "localEndpoints": check.local_endpoints,
                "serviceProxyHealthy": healthz.healthy(),
            });
            let status = if check.local_endpoints > 0 { 200 } else { 503 };
            Response::json(status, body.to_string())
        })
    }
}

/// Listens on `port` for both families: `[::]` (dual-stack unless the host
/// sets `net.ipv6.bindv6only`), plus `0.0.0.0` when the IPv6 socket left
/// IPv4 free; IPv4 alone on a host without IPv6.
async fn bind_both_families(port: u16) -> std::io::Result<Vec<TcpListener>> {
    let v4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    let v6 = match TcpListener::bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))).await {
        Ok(listener) => listener,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => return Err(e),
        // No IPv6 on this host.
        Err(_) => return Ok(vec![TcpListener::bind(v4).await?]),
    };
    match TcpListener::bind(v4).await {
        Ok(listener) => Ok(vec![v6, listener]),
        // The IPv6 socket is dual-stack and holds IPv4 too.
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Ok(vec![v6]),
        Err(e) => Err(e),
    }
}

impl Drop for HealthCheckServers {
    fn drop(&mut self) {
        for task in self.servers.values().flatten() {
            task.abort();
        }
    }
}
