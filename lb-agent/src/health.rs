//! Health endpoints: a healthCheckNodePort server per externalTrafficPolicy
//! Local LoadBalancer service (what cloud load balancers probe to find the
//! nodes with local endpoints), and the agent's own `/healthz`.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant, SystemTime},
};

use serde_json::json;
use tokio::{net::TcpListener, task::JoinHandle};

use crate::{
    http::{self, Handler, Response},
    model::HealthCheck,
};

/// How long an update may wait to be programmed before `/healthz` fails
/// (kube-proxy: twice its 30 s sync period).
pub const HEALTHZ_TIMEOUT: Duration = Duration::from_secs(60);

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

    /// Whether this node should receive external traffic (false while the
    /// Node is being deleted).
    pub fn set_node_eligible(&self, eligible: bool) {
        lock(&self.0).node_eligible = eligible;
    }

    /// Healthy once programmed, and while no update waits too long.
    pub fn healthy(&self) -> bool {
        let p = lock(&self.0);
        p.last_updated.is_some()
            && p.pending_since
                .is_none_or(|since| since.elapsed() < HEALTHZ_TIMEOUT)
    }

    fn response(&self) -> Response {
        let healthy = self.healthy();
        let p = lock(&self.0);
        let body = json!({
            "lastUpdated": p.last_updated.map(http::rfc3339).unwrap_or_default(),
            "currentTime": http::rfc3339(SystemTime::now()),
            "nodeEligible": p.node_eligible,
        });
        Response::json(if healthy { 200 } else { 503 }, body.to_string())
    }

    /// Serves `/healthz` (and `/livez`) on `listener`.
    pub async fn serve(self, listener: TcpListener) {
        let handler: Handler = Arc::new(move |method, path| match (method, path) {
            ("GET", "/healthz" | "/livez") => self.response(),
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
    servers: BTreeMap<u16, JoinHandle<()>>,
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
            if let Some(task) = self.servers.remove(&port) {
                task.abort();
                log::info!("healthCheckNodePort {port}: stopped");
            }
        }
        let mut errors = Vec::new();
        for (port, check) in wanted {
            if self.servers.contains_key(port) {
                continue;
            }
            let address = SocketAddr::from((Ipv4Addr::UNSPECIFIED, *port));
            match TcpListener::bind(address).await {
                Ok(listener) => {
                    let handler = self.handler(*port);
                    self.servers
                        .insert(*port, tokio::spawn(http::serve(listener, handler)));
                    log::info!(
                        "healthCheckNodePort {port}: serving Service {}",
                        check.service
                    );
                }
                Err(e) => errors.push(format!(
                    "Service {}: spec.healthCheckNodePort: cannot listen on {address}: {e}",
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

impl Drop for HealthCheckServers {
    fn drop(&mut self) {
        for task in self.servers.values() {
            task.abort();
        }
    }
}
