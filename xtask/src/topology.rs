//! Mini-clusters made of network namespaces, wired the way a CNI wires pods.
//!
//! A [`Node`] is a node namespace with pods attached by veth pairs: the host
//! side `lbvK` stays in the node, the pod side is the pod's `eth0`. Every
//! host side carries the node's pod gateway address (/32), each pod has a /32
//! address and a default route via the gateway, the node has a /32 route per
//! pod. No bridge, no ARP proxy: the same shape as Calico or Cilium routing.
//!
//! [`SingleNode`] is one such node. [`Cluster`] is several, joined by an
//! underlay, plus an external client:
//!
//! ```text
//!   pods 10.244.1.0/24           pods 10.244.2.0/24
//!   (gw 10.244.1.1, lbvJ)        (gw 10.244.2.1, lbvJ)
//!        node-1                       node-2              ext
//!   eth0 198.51.100.11/24           eth0 198.51.100.12/24      eth0 198.51.100.100/24
//!        |                            |                   |
//!   ----n1--------------------------n2-----------------ext0----  underlay: br0
//! ```
//!
//! - underlay: one namespace holding the bridge `br0` (no address,
//!   `ip_forward=0`); every other device on the 198.51.100.0/24 (TEST-NET-2; the machine itself may sit on TEST-NET-1)
//!   segment is a veth whose underlay end (`nK`, `ext0`) is a port of br0.
//! - node K (1-based, Kubernetes name `node-K`): device [`NODE_DEVICE`]
//!   (`eth0`) with `198.51.100.(10+K)/24`, pod CIDR `10.244.K.0/24` with gateway
//!   `10.244.K.1`, and a route `10.244.J.0/24 via 198.51.100.(10+J)` for every
//!   other node J (host-gw style). Forwarding on. Strict reverse-path
//!   filtering (`rp_filter=1`: all, default, so every device, eth0 and the
//!   pod veths; and in every pod), as on RHEL-family and CIS-hardened
//!   nodes: the datapath must deliver translated replies without relying
//!   on a lenient check.
//! - dual stack: every address above has an IPv6 twin. The underlay is
//!   2001:db8:100::/64 (documentation prefix): node K is
//!   `2001:db8:100::(10+K)`, the external client `2001:db8:100::100`. Pod
//!   addresses are the [`mirror6`] of the IPv4 ones in the ULA prefix
//!   (`10.244.K.N` -> `fd00:10:244:K::N`, gateway `fd00:10:244:K::1`, pod
//!   CIDR `fd00:10:244:K::/64`), with the same /128 host routes, default
//!   route and host-gw routes `fd00:10:244:J::/64 via 2001:db8:100::(10+J)`.
//!   IPv6 forwarding is on in the nodes, DAD off everywhere (addresses are
//!   usable at once), MLD snooping off on br0. Services use
//!   [`SERVICE_CIDR6`]. [`SingleNode`] stays IPv4 only.
//! - external client `ext`: `eth0` with `198.51.100.100/24` and no default
//!   route: it reaches the underlay segment and whatever
//!   [`Cluster::route_via`] points at a node (LoadBalancer IPs, externalIPs),
//!   never a pod address.
//!
//! Checksum offload. A veth passes a locally generated or forwarded TCP/UDP
//! packet to its peer as CHECKSUM_PARTIAL (only the pseudo-header sum in
//! the checksum field) as long as the transmitting veth has TX checksum
//! offload on, and a bridge in between keeps it that way. An XDP program
//! on the receiving node's `eth0` sees the raw bytes and cannot finish
//! such a checksum (tcpdump on that `eth0` reports "incorrect" checksums
//! for pod-to-pod traffic across nodes). A real wire always delivers full
//! checksums, so `ethtool -K eth0 tx off` is applied to every device that
//! puts frames on the underlay: every node's `eth0` and the external
//! client's `eth0`. The kernel then completes the checksum in software (and
//! segments GSO packets, since TSO needs TX checksumming) when a packet
//! leaves through them, so everything on the underlay, and hence everything
//! arriving on a node's `eth0`, carries a full checksum. TC programs on the
//! egress of `eth0` still run before that step and see what a real NIC
//! driver's stack would. (Turning it off on the underlay ports `nK`
//! instead also fixes what arrives on the nodes, but leaves partial
//! checksums on br0, which makes underlay captures misleading.) The pod
//! veths keep their offloads: TC programs (the ones on `lbvJ`) handle
//! partial checksums correctly.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};

use anyhow::{Context, Result, bail, ensure};

use crate::netns::{NetNs, TEST_PREFIX};

/// Kubernetes node name of [`SingleNode`]'s node; matches examples/manifests.
pub const SINGLE_NODE_NAME: &str = "node-1";
/// Pod gateway of [`SingleNode`]'s node (a CNI's per-node router address).
pub const SINGLE_NODE_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);
/// Glob matching the host-side veths, for the agent's `--pod-devices`.
pub const POD_DEVICE_GLOB: &str = "lbv*";

/// The IPv6 address mirroring an IPv4 one in the ULA prefix fd00::/8: the
/// four decimal octets become the last four hextets' digits, read as hex
/// (`10.244.1.11` -> `fd00:10:244:1::11`, `10.244.2.0/24` ->
/// `fd00:10:244:2::/64`). Readable at a glance, one-to-one on the
/// addresses the topologies use.
pub fn mirror6(ip: Ipv4Addr) -> Ipv6Addr {
    let hextet = |octet: u8| {
        u16::from_str_radix(&octet.to_string(), 16).expect("decimal digits are hex digits")
    };
    let [a, b, c, d] = ip.octets();
    Ipv6Addr::new(0xfd00, hextet(a), hextet(b), hextet(c), 0, 0, 0, hextet(d))
}

/// Turns duplicate address detection off in `ns` (for devices created or
/// moved in later): test addresses are unique by construction and must be
/// usable the moment they are added.
fn no_dad(ns: &NetNs) -> Result<()> {
    ns.sysctl("net.ipv6.conf.all.accept_dad", "0")?;
    ns.sysctl("net.ipv6.conf.default.accept_dad", "0")
}

/// One pod: its namespace and how it is attached to its node.
#[derive(Debug)]
pub struct Pod {
    name: String,
    ip: Ipv4Addr,
    ip6: Option<Ipv6Addr>,
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

    /// The pod's IPv6 address ([`mirror6`] of its IPv4 one) on a
    /// dual-stack node ([`Cluster`]); `None` on an IPv4-only one.
    pub fn ip6(&self) -> Option<Ipv6Addr> {
        self.ip6
    }

    /// The pod's IPv6 address with a port; panics on an IPv4-only node.
    pub fn addr6(&self, port: u16) -> SocketAddrV6 {
        let ip6 = self
            .ip6
            .unwrap_or_else(|| panic!("pod {} has no IPv6 address", self.name));
        SocketAddrV6::new(ip6, port, 0, 0)
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
    /// Dual-stack nodes only: the IPv6 pod gateway ([`mirror6`] of `gateway`).
    gateway6: Option<Ipv6Addr>,
    prefix: String,
    next_veth: u32,
}

/// `rp_filter` of every node and pod device: strict (RFC 3704), the
/// default of RHEL-family and CIS-hardened nodes.
pub const STRICT_RP_FILTER: &str = "1";

impl Node {
    /// Creates the node namespace with forwarding on and strict
    /// reverse-path filtering, as a production node has it (see the module
    /// documentation).
    pub fn new(prefix: &str, name: &str, gateway: Ipv4Addr) -> Result<Node> {
        Node::create(prefix, name, gateway, false)
    }

    /// The same, dual-stack: IPv6 forwarding on as well, and every pod
    /// also gets the IPv6 [`mirror6`] of its address, with the gateway's
    /// mirror as its IPv6 gateway.
    pub fn dual_stack(prefix: &str, name: &str, gateway: Ipv4Addr) -> Result<Node> {
        Node::create(prefix, name, gateway, true)
    }

    fn create(prefix: &str, name: &str, gateway: Ipv4Addr, dual_stack: bool) -> Result<Node> {
        let ns = NetNs::with_prefix(prefix, name)?;
        // Before any veth exists: new devices copy conf.default.
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        ns.sysctl("net.ipv4.conf.all.rp_filter", STRICT_RP_FILTER)?;
        ns.sysctl("net.ipv4.conf.default.rp_filter", STRICT_RP_FILTER)?;
        if dual_stack {
            no_dad(&ns)?;
            ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        }
        Ok(Node {
            pods: Vec::new(),
            ns,
            name: name.to_owned(),
            gateway,
            gateway6: dual_stack.then(|| mirror6(gateway)),
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

    /// The IPv6 pod gateway of a dual-stack node.
    pub fn gateway6(&self) -> Option<Ipv6Addr> {
        self.gateway6
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
            ip6: self.gateway6.map(|_| mirror6(ip)),
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

        pod_ns.sysctl("net.ipv4.conf.all.rp_filter", STRICT_RP_FILTER)?;
        pod_ns.sysctl("net.ipv4.conf.eth0.rp_filter", STRICT_RP_FILTER)?;
        pod_ns.ip(&["addr", "add", &pod_addr, "dev", "eth0"])?;
        pod_ns.ip(&["link", "set", "eth0", "up"])?;
        pod_ns.ip(&["route", "add", &gateway, "dev", "eth0", "scope", "link"])?;
        pod_ns.ip(&["route", "add", "default", "via", &gateway, "dev", "eth0"])?;
        if let Some(gateway6) = self.gateway6 {
            self.attach6(pod_ns, host_if, gateway6, mirror6(ip))?;
        }
        Ok(())
    }

    /// The IPv6 half of [`Node::attach`], the same shape: the gateway /128
    /// on the host side, the pod's /128 routed to it, a default route via
    /// the gateway in the pod. No DAD anywhere (addresses usable at once).
    fn attach6(
        &self,
        pod_ns: &NetNs,
        host_if: &str,
        gateway6: Ipv6Addr,
        ip6: Ipv6Addr,
    ) -> Result<()> {
        let gateway = gateway6.to_string();
        let pod_addr = format!("{ip6}/128");
        self.ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{gateway}/128"),
            "dev",
            host_if,
            "nodad",
        ])?;
        self.ns
            .ip(&["-6", "route", "add", &pod_addr, "dev", host_if])?;
        no_dad(pod_ns)?;
        pod_ns.sysctl("net.ipv6.conf.eth0.accept_dad", "0")?;
        // Servers bind 0.0.0.0 and [::] separately (IPv4 peers stay IPv4).
        pod_ns.sysctl("net.ipv6.bindv6only", "1")?;
        pod_ns.ip(&["-6", "addr", "add", &pod_addr, "dev", "eth0", "nodad"])?;
        pod_ns.ip(&["-6", "route", "add", &gateway, "dev", "eth0"])?;
        pod_ns.ip(&[
            "-6", "route", "add", "default", "via", &gateway, "dev", "eth0",
        ])?;
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
        SingleNode::with_node(
            Node::new(prefix, SINGLE_NODE_NAME, SINGLE_NODE_GATEWAY)?,
            pods,
        )
    }

    /// A dual-stack node: every pod also has the IPv6 [`mirror6`] of its
    /// address (`10.244.1.11` -> `fd00:10:244:1::11`), routed like the
    /// IPv4 one (the demo's dual-stack service).
    pub fn dual_stack(prefix: &str, pods: &[(&str, Ipv4Addr)]) -> Result<SingleNode> {
        let node = Node::dual_stack(prefix, SINGLE_NODE_NAME, SINGLE_NODE_GATEWAY)?;
        SingleNode::with_node(node, pods)
    }

    fn with_node(mut node: Node, pods: &[(&str, Ipv4Addr)]) -> Result<SingleNode> {
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

/// A node's (and the external client's) device on the underlay.
pub const NODE_DEVICE: &str = "eth0";
/// The bridge in the underlay namespace.
pub const UNDERLAY_BRIDGE: &str = "br0";
/// Prefix length of the underlay segment 198.51.100.0/24.
pub const UNDERLAY_PREFIX_LEN: u8 = 24;
/// The external client's address on the underlay.
pub const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 100);
/// The external client's IPv6 address on the underlay.
pub const EXTERNAL_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x100);
/// Prefix length of the IPv6 underlay segment 2001:db8:100::/64.
pub const UNDERLAY_PREFIX6_LEN: u8 = 64;
/// The IPv6 service range the manifests of dual-stack tests use (the
/// mirror of 10.96.0.0/16's first /112).
pub const SERVICE_CIDR6: &str = "fd00:10:96::/112";
/// Underlay-side port of the external client's veth.
const EXTERNAL_PORT: &str = "ext0";
/// Most nodes a [`Cluster`] can have: node K is 198.51.100.(10+K), below the
/// external client's .100.
pub const MAX_CLUSTER_NODES: usize = 89;

/// Underlay address of node `k` (1-based): 198.51.100.(10+k).
pub fn cluster_node_ip(k: usize) -> Ipv4Addr {
    assert!(
        (1..=MAX_CLUSTER_NODES).contains(&k),
        "node index {k} outside 1..={MAX_CLUSTER_NODES}"
    );
    Ipv4Addr::new(198, 51, 100, 10 + k as u8)
}

/// IPv6 underlay address of node `k` (1-based): 2001:db8:100::(10+k),
/// the digits of the IPv4 one.
pub fn cluster_node_ip6(k: usize) -> Ipv6Addr {
    let last = mirror6(cluster_node_ip(k)).segments()[7];
    Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, last)
}

/// Pod gateway of node `k` (1-based): 10.244.k.1; its pod CIDR is 10.244.k.0/24.
pub fn cluster_pod_gateway(k: usize) -> Ipv4Addr {
    assert!(
        (1..=MAX_CLUSTER_NODES).contains(&k),
        "node index {k} outside 1..={MAX_CLUSTER_NODES}"
    );
    Ipv4Addr::new(10, 244, k as u8, 1)
}

/// Nodes (`node-1`..`node-N`) on an underlay bridge, plus an external client;
/// see the module documentation for the addressing plan. Nodes are
/// numbered from 1, as in their names and addresses. Dropping it removes,
/// in this order, the pods, the nodes, the external client and the underlay.
#[derive(Debug)]
pub struct Cluster {
    // Field order is drop order (after `Drop::drop` has cleared the nodes).
    nodes: Vec<Node>,
    external: NetNs,
    underlay: NetNs,
}

impl Cluster {
    /// A test cluster (`lbt-` names) of `nodes` nodes, without pods.
    pub fn new(nodes: usize) -> Result<Cluster> {
        Cluster::with_prefix(TEST_PREFIX, nodes)
    }

    /// Same with another name prefix (the demo and benchmarks use `lbd`).
    pub fn with_prefix(prefix: &str, nodes: usize) -> Result<Cluster> {
        ensure!(
            (1..=MAX_CLUSTER_NODES).contains(&nodes),
            "a cluster has 1..={MAX_CLUSTER_NODES} nodes, not {nodes}"
        );
        let underlay = NetNs::with_prefix(prefix, "underlay")?;
        underlay.sysctl("net.ipv4.ip_forward", "0")?;
        // No MLD snooping: IPv6 neighbour discovery is multicast, and no
        // querier runs on this segment.
        underlay
            .ip(&[
                "link",
                "add",
                UNDERLAY_BRIDGE,
                "type",
                "bridge",
                "mcast_snooping",
                "0",
            ])
            .context("creating the underlay bridge")?;
        underlay.ip(&["link", "set", UNDERLAY_BRIDGE, "up"])?;

        let external = NetNs::with_prefix(prefix, "ext")?;
        // From here on a failure drops `cluster`: nodes, then ext, underlay.
        let mut cluster = Cluster {
            nodes: Vec::with_capacity(nodes),
            external,
            underlay,
        };
        no_dad(&cluster.external)?;
        cluster
            .plug(&cluster.external, EXTERNAL_PORT, EXTERNAL_IP, EXTERNAL_IP6)
            .context("attaching the external client")?;

        for k in 1..=nodes {
            let name = format!("node-{k}");
            let node = Node::dual_stack(prefix, &name, cluster_pod_gateway(k))?;
            cluster.nodes.push(node);
            let node = cluster.nodes.last().expect("just pushed");
            cluster
                .plug(
                    node.ns(),
                    &format!("n{k}"),
                    cluster_node_ip(k),
                    cluster_node_ip6(k),
                )
                .with_context(|| format!("attaching {name} to the underlay"))?;
            node.ns().sysctl(
                &format!("net.ipv4.conf.{NODE_DEVICE}.rp_filter"),
                STRICT_RP_FILTER,
            )?;
        }
        // Host-gw routes, once every node's address is up.
        for (i, node) in cluster.nodes.iter().enumerate() {
            for j in (1..=nodes).filter(|&j| j != i + 1) {
                let cidr = format!("{}/24", Ipv4Addr::new(10, 244, j as u8, 0));
                let via = cluster_node_ip(j).to_string();
                node.ns()
                    .ip(&["route", "add", &cidr, "via", &via, "dev", NODE_DEVICE])
                    .with_context(|| format!("{}: route to node-{j}'s pods", node.name()))?;
                let cidr6 = format!("{}/64", mirror6(Ipv4Addr::new(10, 244, j as u8, 0)));
                let via6 = cluster_node_ip6(j).to_string();
                node.ns()
                    .ip(&[
                        "-6",
                        "route",
                        "add",
                        &cidr6,
                        "via",
                        &via6,
                        "dev",
                        NODE_DEVICE,
                    ])
                    .with_context(|| format!("{}: IPv6 route to node-{j}'s pods", node.name()))?;
            }
        }
        Ok(cluster)
    }

    /// Connects `ns` to the underlay: `NODE_DEVICE` in `ns` with `ip`/24 and
    /// `ip6`/64, its peer `port` a port of br0, TX checksum offload off on
    /// `NODE_DEVICE`.
    fn plug(&self, ns: &NetNs, port: &str, ip: Ipv4Addr, ip6: Ipv6Addr) -> Result<()> {
        // Created in the underlay, peer placed straight into `ns`: nothing
        // ever appears in the root namespace.
        self.underlay.ip(&[
            "link",
            "add",
            port,
            "type",
            "veth",
            "peer",
            "name",
            NODE_DEVICE,
            "netns",
            ns.name(),
        ])?;
        self.underlay
            .ip(&["link", "set", port, "master", UNDERLAY_BRIDGE])?;
        self.underlay.ip(&["link", "set", port, "up"])?;
        ns.ip(&[
            "addr",
            "add",
            &format!("{ip}/{UNDERLAY_PREFIX_LEN}"),
            "dev",
            NODE_DEVICE,
        ])?;
        ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{ip6}/{UNDERLAY_PREFIX6_LEN}"),
            "dev",
            NODE_DEVICE,
            "nodad",
        ])?;
        // See the module documentation: frames on the underlay carry full
        // checksums, as on a real wire.
        ns.sh_ok(&["ethtool", "-K", NODE_DEVICE, "tx", "off"])
            .context(
                "turning TX checksum offload off (is ethtool installed? `cargo xtask setup`)",
            )?;
        ns.ip(&["link", "set", NODE_DEVICE, "up"])?;
        Ok(())
    }

    /// Number of nodes.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Node `k`, 1-based (`node(1)` is `node-1`). Panics outside 1..=N.
    pub fn node(&self, k: usize) -> &Node {
        self.index(k)
            .map(|i| &self.nodes[i])
            .unwrap_or_else(|| panic!("no node {k} in a {}-node cluster", self.nodes.len()))
    }

    /// The node with Kubernetes name `name` (`node-2`).
    pub fn node_by_name(&self, name: &str) -> Result<&Node> {
        self.nodes
            .iter()
            .find(|node| node.name() == name)
            .with_context(|| format!("no node named {name:?}"))
    }

    /// Underlay address of node `k` (1-based): 198.51.100.(10+k). Panics
    /// outside 1..=N.
    pub fn node_ip(&self, k: usize) -> Ipv4Addr {
        let _ = self.node(k);
        cluster_node_ip(k)
    }

    /// IPv6 underlay address of node `k` (1-based): 2001:db8:100::(10+k).
    /// Panics outside 1..=N.
    pub fn node_ip6(&self, k: usize) -> Ipv6Addr {
        let _ = self.node(k);
        cluster_node_ip6(k)
    }

    /// Creates a pod behind node `k` (1-based). `ip` must lie in the node's
    /// pod CIDR 10.244.k.0/24 (not .0, .1 (the gateway) or .255); pod names
    /// are unique across the cluster.
    pub fn add_pod(&mut self, k: usize, name: &str, ip: Ipv4Addr) -> Result<&Pod> {
        let index = self
            .index(k)
            .with_context(|| format!("no node {k} in a {}-node cluster", self.nodes.len()))?;
        let [a, b, c, d] = ip.octets();
        ensure!(
            [a, b, c] == [10, 244, k as u8] && !matches!(d, 0 | 1 | 255),
            "pod {name:?}: {ip} is not a pod address of node-{k} (10.244.{k}.2-254)"
        );
        if let Some(node) = self.nodes.iter().find(|node| node.pod(name).is_ok()) {
            bail!("a pod named {name:?} already exists on {}", node.name());
        }
        self.nodes[index].add_pod(name, ip)
    }

    /// The pod named `name`, on whichever node.
    pub fn pod(&self, name: &str) -> Result<&Pod> {
        self.nodes
            .iter()
            .find_map(|node| node.pod(name).ok())
            .with_context(|| format!("no pod named {name:?} on any node"))
    }

    /// The external client's namespace (its device is `eth0`).
    pub fn external(&self) -> &NetNs {
        &self.external
    }

    /// The external client's address, 198.51.100.100.
    pub fn external_ip(&self) -> Ipv4Addr {
        EXTERNAL_IP
    }

    /// The external client's IPv6 address, 2001:db8:100::100.
    pub fn external_ip6(&self) -> Ipv6Addr {
        EXTERNAL_IP6
    }

    /// Routes `prefix` (`203.0.113.0/24`, `203.0.113.10/32`, or an IPv6
    /// one, via the node's IPv6 address) from the external client via node
    /// `k` (1-based), the way a router in front of the cluster reaches
    /// LoadBalancer IPs and externalIPs. Replaces an earlier route for the
    /// same prefix.
    pub fn route_via(&self, prefix: &str, k: usize) -> Result<()> {
        self.index(k)
            .with_context(|| format!("no node {k} in a {}-node cluster", self.nodes.len()))?;
        let via = if prefix.contains(':') {
            cluster_node_ip6(k).to_string()
        } else {
            cluster_node_ip(k).to_string()
        };
        self.external
            .ip(&["route", "replace", prefix, "via", &via, "dev", NODE_DEVICE])
            .with_context(|| format!("routing {prefix} via node-{k} on the external client"))
    }

    /// The underlay namespace (bridge `br0`, ports `nK` and `ext0`).
    pub fn underlay(&self) -> &NetNs {
        &self.underlay
    }

    fn index(&self, k: usize) -> Option<usize> {
        (1..=self.nodes.len()).contains(&k).then(|| k - 1)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Pods (each node drops its pods first), then the nodes; the fields
        // then drop in order: external client, underlay.
        self.nodes.clear();
    }
}
