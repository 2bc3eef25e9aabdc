//! The generated service population every variant is programmed with.
//!
//! N services `bench/svc-<i>` (i = 0..N), port 80/TCP to targetPort 8080,
//! ClusterIP `10.96.0.1 + i` (10.96.0.0/12), 10 endpoints each. Services
//! 0..N-1 are filler: their endpoints are 10.128.0.0/9 addresses that no
//! packet ever reaches. The last service is the target: it is also a
//! NodePort (30080) and its 10 endpoints are the server pod's addresses
//! 10.244.1.10-19; it is placed last in every rule order. The addressing
//! matches `lb-bench` (tests/src/bin/lb-bench.rs).

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;

use anyhow::{Context, Result};

pub const ENDPOINTS_PER_SERVICE: u32 = 10;
pub const SERVICE_PORT: u16 = 80;
pub const TARGET_PORT: u16 = 8080;
pub const NODE_PORT: u16 = 30080;
pub const NAMESPACE: &str = "bench";
/// The pod network of the cluster (kube-proxy's `--cluster-cidr`).
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
pub const NODE_NAME: &str = "node-1";
/// The server pod's first address; it holds this and the next nine.
pub const SERVER_POD_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
pub const CLIENT_POD_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);

#[derive(Clone, Copy, Debug)]
pub struct ServiceSet {
    pub count: u32,
}

impl ServiceSet {
    pub fn new(count: u32) -> ServiceSet {
        assert!(count >= 1, "at least the target service");
        ServiceSet { count }
    }

    pub fn target(&self) -> u32 {
        self.count - 1
    }

    pub fn name(&self, i: u32) -> String {
        format!("svc-{i}")
    }

    pub fn vip(&self, i: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 1)) + i)
    }

    pub fn target_vip(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.vip(self.target()), SERVICE_PORT)
    }

    /// Endpoint addresses of service `i`.
    pub fn endpoints(&self, i: u32) -> Vec<Ipv4Addr> {
        (0..ENDPOINTS_PER_SERVICE)
            .map(|j| {
                if i == self.target() {
                    Ipv4Addr::from(u32::from(SERVER_POD_IP) + j)
                } else {
                    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + i * 10 + j)
                }
            })
            .collect()
    }

    /// Writes Service, EndpointSlice and Node manifests for the agent's
    /// `--manifests` directory (compact flow-style YAML: 100k services make
    /// ~60 MB as it is).
    pub fn write_manifests(&self, dir: &Path) -> Result<()> {
        let mut services = String::with_capacity(self.count as usize * 200);
        let mut slices = String::with_capacity(self.count as usize * 700);
        for i in 0..self.count {
            let name = self.name(i);
            let (kind, node_port) = if i == self.target() {
                ("NodePort", format!(", nodePort: {NODE_PORT}"))
            } else {
                ("ClusterIP", String::new())
            };
            let _ = write!(
                services,
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {NAMESPACE}}}\n\
                 spec: {{type: {kind}, clusterIP: {vip}, ports: [{{name: http, port: {SERVICE_PORT}, \
                 targetPort: {TARGET_PORT}, protocol: TCP{node_port}}}]}}\n",
                vip = self.vip(i),
            );
            let _ = write!(
                slices,
                "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\naddressType: IPv4\n\
                 metadata: {{name: {name}-x1, namespace: {NAMESPACE}, labels: \
                 {{kubernetes.io/service-name: {name}}}}}\n\
                 ports: [{{name: http, port: {TARGET_PORT}, protocol: TCP}}]\nendpoints:\n"
            );
            for addr in self.endpoints(i) {
                let _ = writeln!(
                    slices,
                    "- {{addresses: [\"{addr}\"], conditions: {{ready: true}}, nodeName: {NODE_NAME}}}"
                );
            }
        }
        let node = format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: {NODE_NAME}}}\n\
             spec: {{podCIDR: 10.244.1.0/24}}\n\
             status: {{addresses: [{{address: 198.51.100.11, type: InternalIP}}]}}\n"
        );
        for (file, content) in [
            ("nodes.yaml", node),
            ("services.yaml", services),
            ("endpointslices.yaml", slices),
        ] {
            std::fs::write(dir.join(file), content)
                .with_context(|| format!("writing {}", dir.join(file).display()))?;
        }
        Ok(())
    }
}
