//! Mini-clusters made of network namespaces, wired the way a CNI wires pods.
//!
//! A [`Node`] is a node namespace with pods attached by veth pairs: the host
//! side `lbvK` stays in the node, the pod side is the pod's `eth0`. Every
//! host side carries the node's pod gateway address (/32), each pod has a /32
//! address and a default route via the gateway, the node has a /32 route per
//! pod. No bridge, no ARP proxy: the same shape as Calico or Cilium routing.
//!
//! [`SingleNode`] is one such node. A multi-node topology adds an underlay
//! (a bridge namespace joining the nodes' `eth0`s) and an external client
//! around several `Node`s; `Node` does not assume it is alone.

use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::{Context, Result, bail};

use crate::netns::{NetNs, TEST_PREFIX};

/// Kubernetes node name of [`SingleNode`]'s node; matches examples/manifests.
pub const SINGLE_NODE_NAME: &str = "node-1";
/// Pod gateway of [`SingleNode`]'s node (a CNI's per-node router address).
pub const SINGLE_NODE_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);
/// Glob matching the host-side veths, for the agent's `--pod-devices`.
pub const POD_DEVICE_GLOB: &str = "lbv*";

/// One pod: its namespace and how it is attached to its node.
#[derive(Debug)]
pub struct Pod {
    name: String,
    ip: Ipv4Addr,
    host_if: String,
    ns: NetNs,
}

impl Pod {
    /// Pod name (as in the manifests: `echo-a`).
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The pod's address with a port.
    pub fn addr(&self, port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(self.ip, port)
    }

    /// Host-side veth in the node namespace (`lbvK`).
    pub fn host_if(&self) -> &str {
        &self.host_if
    }

    /// The pod's namespace (its side of the veth is `eth0`).
    pub fn ns(&self) -> &NetNs {
        &self.ns
    }
}

/// A node namespace and its pods. Pods are dropped before the node.
#[derive(Debug)]
pub struct Node {
    // Field order is drop order: pods first, then the node namespace.
    pods: Vec<Pod>,
    ns: NetNs,
    name: String,
    gateway: Ipv4Addr,
    prefix: String,
    next_veth: u32,
}

impl Node {
    /// Creates the node namespace with forwarding on and reverse-path
    /// filtering off (pods answer from service addresses the node never
    /// routed to them).
    pub fn new(prefix: &str, name: &str, gateway: Ipv4Addr) -> Result<Node> {
        let ns = NetNs::with_prefix(prefix, name)?;
        // Before any veth exists: new devices copy conf.default.
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        ns.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
        ns.sysctl("net.ipv4.conf.default.rp_filter", "0")?;
        Ok(Node {
            pods: Vec::new(),
            ns,
            name: name.to_owned(),
            gateway,
            prefix: prefix.to_owned(),
            next_veth: 1,
        })
    }

    /// Kubernetes node name.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn ns(&self) -> &NetNs {
        &self.ns
    }

    /// The pod gateway address present on every host-side veth.
    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }

    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    pub fn pod(&self, name: &str) -> Result<&Pod> {
        self.pods
            .iter()
            .find(|pod| pod.name == name)
            .with_context(|| format!("node {}: no pod named {name:?}", self.name))
    }

    /// Creates a pod namespace and attaches it with a new veth `lbvK`.
    pub fn add_pod(&mut self, name: &str, ip: Ipv4Addr) -> Result<&Pod> {
        if self.pods.iter().any(|pod| pod.name == name || pod.ip == ip) {
            bail!(
                "node {}: pod {name:?} or address {ip} already exists",
                self.name
            );
        }
        let host_if = format!("lbv{}", self.next_veth);
        self.next_veth += 1;
        let pod_ns = NetNs::with_prefix(&self.prefix, name)?;
        self.attach(&pod_ns, &host_if, ip)
            .with_context(|| format!("attaching pod {name} ({ip}) to node {}", self.name))?;
        self.pods.push(Pod {
            name: name.to_owned(),
            ip,
            host_if,
            ns: pod_ns,
        });
        Ok(self.pods.last().expect("just pushed"))
    }

    fn attach(&self, pod_ns: &NetNs, host_if: &str, ip: Ipv4Addr) -> Result<()> {
        let gateway = self.gateway.to_string();
        let pod_addr = format!("{ip}/32");
        // Created inside the node namespace, peer moved straight into the
        // pod: nothing ever appears in the root namespace.
        self.ns.ip(&[
            "link",
            "add",
            host_if,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            pod_ns.name(),
        ])?;
        self.ns
            .ip(&["addr", "add", &format!("{gateway}/32"), "dev", host_if])?;
        self.ns.ip(&["link", "set", host_if, "up"])?;
        self.ns
            .ip(&["route", "add", &pod_addr, "dev", host_if, "scope", "link"])?;

        pod_ns.ip(&["addr", "add", &pod_addr, "dev", "eth0"])?;
        pod_ns.ip(&["link", "set", "eth0", "up"])?;
        pod_ns.ip(&["route", "add", &gateway, "dev", "eth0", "scope", "link"])?;
        pod_ns.ip(&["route", "add", "default", "via", &gateway, "dev", "eth0"])?;
        Ok(())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // Explicit, not left to field order alone: deleting a pod namespace
        // destroys its veth pair, then the node goes.
        self.pods.clear();
    }
}

/// One node (`node-1`, pod gateway 10.244.1.1) with pods.
#[derive(Debug)]
pub struct SingleNode {
    node: Node,
}

impl SingleNode {
    /// A test topology (`lbt-` names) with the given pods.
    pub fn new(pods: &[(&str, Ipv4Addr)]) -> Result<SingleNode> {
        SingleNode::with_prefix(TEST_PREFIX, pods)
    }

    /// Same with another name prefix (the demo uses `lbd`).
    pub fn with_prefix(prefix: &str, pods: &[(&str, Ipv4Addr)]) -> Result<SingleNode> {
        let mut node = Node::new(prefix, SINGLE_NODE_NAME, SINGLE_NODE_GATEWAY)?;
        for &(name, ip) in pods {
            node.add_pod(name, ip)?;
        }
        Ok(SingleNode { node })
    }

    pub fn node(&self) -> &Node {
        &self.node
    }

    /// The node namespace (where the agent runs).
    pub fn node_ns(&self) -> &NetNs {
        self.node.ns()
    }

    pub fn pods(&self) -> &[Pod] {
        self.node.pods()
    }

    pub fn pod(&self, name: &str) -> Result<&Pod> {
        self.node.pod(name)
    }

    /// Adds a pod later (a new `lbvK` appears in the node namespace).
    pub fn add_pod(&mut self, name: &str, ip: Ipv4Addr) -> Result<&Pod> {
        self.node.add_pod(name, ip)
    }
}
