//! kube-proxy's rulesets for a [`ServiceSet`], generated to the layout
//! kube-proxy itself programs (kubernetes/kubernetes `pkg/proxy/iptables/
//! proxier.go` and `pkg/proxy/nftables/proxier.go` + its README; the layout
//! is described in docs/benchmarks.md). Our own code: chain-name hashes are
//! FNV-based instead of SHA-256, with the same shape.
//!
//! iptables (`iptables-restore`), nat table:
//! PREROUTING/OUTPUT -> KUBE-SERVICES: one rule per ClusterIP
//! (`-d VIP/32 -p tcp --dport 80 -j KUBE-SVC-<hash>`), the last rule
//! `-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS`; KUBE-SVC-<hash>: mark
//! off-cluster sources for masquerade, then one rule per endpoint with
//! `-m statistic --mode random --probability 1/(n-k)` jumping to
//! KUBE-SEP-<hash> (`-s EP -j KUBE-MARK-MASQ`, `-j DNAT --to-destination`);
//! KUBE-NODEPORTS -> KUBE-EXT-<hash> (mark, then KUBE-SVC); POSTROUTING ->
//! KUBE-POSTROUTING (masquerade marked packets). Filter table: KUBE-FORWARD
//! (drop INVALID, accept marked and established) and the other kube-proxy
//! chains, empty as for services that all have endpoints. As kube-proxy
//! does above 1000 endpoints ("large cluster mode"), per-endpoint rules
//! carry no comments.
//!
//! nftables (`nft -f`), `table ip kube-proxy`: base chains jump to
//! `services`, which does `ip daddr . meta l4proto . th dport vmap
//! @service-ips` and, for local destinations, `meta l4proto . th dport vmap
//! @service-nodeports`; `service-<hash>-<ns>/<name>/tcp/<port>` chains mark
//! for masquerade and pick an endpoint with `numgen random mod N vmap`,
//! `endpoint-<hash>-...__<ip>/<port>` chains `dnat to`; filter-forward
//! checks `cluster-ips` and `no-endpoint-services`.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use super::services::{CLUSTER_CIDR, NAMESPACE, NODE_PORT, SERVICE_PORT, ServiceSet, TARGET_PORT};

/// kube-proxy's masquerade mark bit.
const MASQ_MARK: &str = "0x4000";
/// Above this many endpoints kube-proxy drops per-endpoint comments.
const LARGE_CLUSTER_ENDPOINTS: u64 = 1000;

/// 16 characters of base32 over a 128-bit FNV-1a of `text` (kube-proxy:
/// base32 of SHA-256, first 16 characters).
fn hash16(text: &str) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let fnv = |seed: u64| {
        text.bytes().fold(seed, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        })
    };
    let bits = (u128::from(fnv(0xcbf2_9ce4_8422_2325)) << 64) | u128::from(fnv(0x84222325cbf29ce4));
    (0..16)
        .map(|k| ALPHABET[((bits >> (k * 5)) & 31) as usize] as char)
        .collect()
}

fn port_name(set: &ServiceSet, i: u32) -> String {
    format!("{NAMESPACE}/{}:http", set.name(i))
}

fn svc_chain(set: &ServiceSet, i: u32) -> String {
    format!("KUBE-SVC-{}", hash16(&format!("{}tcp", port_name(set, i))))
}

fn ext_chain(set: &ServiceSet, i: u32) -> String {
    format!("KUBE-EXT-{}", hash16(&format!("{}tcp", port_name(set, i))))
}

fn sep_chain(set: &ServiceSet, i: u32, endpoint: Ipv4Addr) -> String {
    format!(
        "KUBE-SEP-{}",
        hash16(&format!("{}tcp{endpoint}:{TARGET_PORT}", port_name(set, i)))
    )
}

fn large_cluster(set: &ServiceSet) -> bool {
    u64::from(set.count) * 10 > LARGE_CLUSTER_ENDPOINTS
}

/// The filter table as kube-proxy leaves it when every service has endpoints.
fn iptables_filter(out: &mut String, with_base_jumps: bool) {
    out.push_str("*filter\n");
    for chain in [
        "KUBE-SERVICES",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-FORWARD",
        "KUBE-NODEPORTS",
        "KUBE-PROXY-FIREWALL",
    ] {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    if with_base_jumps {
        out.push_str(
            "-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
             -A INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS\n\
             -A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n\
             -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
             -A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n\
             -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
             -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n\
             -A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
             -A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
        );
    }
    let _ = writeln!(
        out,
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -m comment --comment \"kubernetes forwarding rules\" -j DROP\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
         COMMIT"
    );
}

/// The top-level nat chains kube-proxy rewrites on every sync.
fn iptables_nat_top(out: &mut String, set: &ServiceSet) {
    for i in 0..set.count {
        let _ = writeln!(
            out,
            "-A KUBE-SERVICES -d {vip}/32 -p tcp -m comment --comment \"{pn} cluster IP\" -m tcp --dport {SERVICE_PORT} -j {svc}",
            vip = set.vip(i),
            pn = port_name(set, i),
            svc = svc_chain(set, i),
        );
    }
    out.push_str(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n",
    );
    let t = set.target();
    let _ = writeln!(
        out,
        "-A KUBE-NODEPORTS -p tcp -m comment --comment \"{pn}\" -m tcp --dport {NODE_PORT} -j {ext}",
        pn = port_name(set, t),
        ext = ext_chain(set, t),
    );
    let _ = writeln!(
        out,
        "-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}"
    );
}

/// KUBE-SVC-<hash> of service `i` and its KUBE-SEP chains' rules.
fn iptables_service_rules(out: &mut String, set: &ServiceSet, i: u32, endpoints: &[Ipv4Addr]) {
    let pn = port_name(set, i);
    let svc = svc_chain(set, i);
    let large = large_cluster(set);
    let _ = writeln!(
        out,
        "-A {svc} ! -s {CLUSTER_CIDR} -d {vip}/32 -p tcp -m comment --comment \"{pn} cluster IP\" -m tcp --dport {SERVICE_PORT} -j KUBE-MARK-MASQ",
        vip = set.vip(i),
    );
    let n = endpoints.len();
    for (k, endpoint) in endpoints.iter().enumerate() {
        let sep = sep_chain(set, i, *endpoint);
        let comment = if large {
            String::new()
        } else {
            format!(" -m comment --comment \"{pn} -> {endpoint}:{TARGET_PORT}\"")
        };
        if k + 1 < n {
            let _ = writeln!(
                out,
                "-A {svc}{comment} -m statistic --mode random --probability {:.10} -j {sep}",
                1.0 / (n - k) as f64
            );
        } else {
            let _ = writeln!(out, "-A {svc}{comment} -j {sep}");
        }
    }
    for endpoint in endpoints {
        let sep = sep_chain(set, i, *endpoint);
        let comment = if large {
            String::new()
        } else {
            format!(" -m comment --comment {pn}")
        };
        let _ = writeln!(
            out,
            "-A {sep} -s {endpoint}/32{comment} -j KUBE-MARK-MASQ\n\
             -A {sep} -p tcp{comment} -m tcp -j DNAT --to-destination {endpoint}:{TARGET_PORT}"
        );
    }
}

/// The whole ruleset, for `iptables-restore` into a namespace without rules.
pub fn iptables_ruleset(set: &ServiceSet) -> String {
    let mut out = String::with_capacity(set.count as usize * 2500);
    iptables_filter(&mut out, true);
    out.push_str("*nat\n");
    for chain in [
        "KUBE-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
    ] {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    let t = set.target();
    for i in 0..set.count {
        let _ = writeln!(out, ":{} - [0:0]", svc_chain(set, i));
        for endpoint in set.endpoints(i) {
            let _ = writeln!(out, ":{} - [0:0]", sep_chain(set, i, endpoint));
        }
    }
    let _ = writeln!(out, ":{} - [0:0]", ext_chain(set, t));
    out.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n",
    );
    iptables_nat_top(&mut out, set);
    let _ = writeln!(
        out,
        "-A {ext} -m comment --comment \"masquerade traffic for {pn} external destinations\" -j KUBE-MARK-MASQ\n\
         -A {ext} -j {svc}",
        ext = ext_chain(set, t),
        pn = port_name(set, t),
        svc = svc_chain(set, t),
    );
    for i in 0..set.count {
        iptables_service_rules(&mut out, set, i, &set.endpoints(i));
    }
    out.push_str("COMMIT\n");
    out
}

/// What kube-proxy (with MinimizeIPTablesRestore, the default since 1.27)
/// sends with `iptables-restore --noflush` when endpoint 0 of service `i`
/// is replaced by `new`: the top-level chains in full, the changed
/// KUBE-SVC chain, the new KUBE-SEP chain, and the deletion of the old one.
pub fn iptables_endpoint_change(set: &ServiceSet, i: u32, new: Ipv4Addr) -> String {
    let old_endpoints = set.endpoints(i);
    let mut endpoints = old_endpoints.clone();
    endpoints[0] = new;
    let mut out = String::with_capacity(set.count as usize * 150);
    iptables_filter(&mut out, false);
    out.push_str("*nat\n");
    for chain in [
        "KUBE-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
    ] {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    let _ = writeln!(out, ":{} - [0:0]", svc_chain(set, i));
    let _ = writeln!(out, ":{} - [0:0]", sep_chain(set, i, new));
    // A chain must be empty to be deleted: declared (flushed), then -X.
    let _ = writeln!(out, ":{} - [0:0]", sep_chain(set, i, old_endpoints[0]));
    iptables_nat_top(&mut out, set);
    iptables_service_rules(&mut out, set, i, &endpoints);
    let _ = writeln!(out, "-X {}", sep_chain(set, i, old_endpoints[0]));
    out.push_str("COMMIT\n");
    out
}

fn nft_service_chain(set: &ServiceSet, i: u32) -> String {
    let id = format!("{NAMESPACE}/{}/tcp/http", set.name(i));
    format!("service-{}-{id}", &hash16(&id)[..8])
}

fn nft_external_chain(set: &ServiceSet, i: u32) -> String {
    let id = format!("{NAMESPACE}/{}/tcp/http", set.name(i));
    format!("external-{}-{id}", &hash16(&id)[..8])
}

fn nft_endpoint_chain(set: &ServiceSet, i: u32, endpoint: Ipv4Addr) -> String {
    let id = format!(
        "{NAMESPACE}/{}/tcp/http__{endpoint}/{TARGET_PORT}",
        set.name(i)
    );
    format!("endpoint-{}-{id}", &hash16(&id)[..8])
}

/// The rules of service `i`'s chain (the same text in a `chain {}` block
/// and after `add rule ip kube-proxy <chain>`).
fn nft_service_rules(set: &ServiceSet, i: u32, endpoints: &[Ipv4Addr]) -> [String; 2] {
    let choices: Vec<String> = endpoints
        .iter()
        .enumerate()
        .map(|(k, endpoint)| format!("{k} : goto {}", nft_endpoint_chain(set, i, *endpoint)))
        .collect();
    [
        format!(
            "ip daddr {vip} tcp dport {SERVICE_PORT} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade",
            vip = set.vip(i)
        ),
        format!(
            "numgen random mod {} vmap {{ {} }}",
            endpoints.len(),
            choices.join(", ")
        ),
    ]
}

fn nft_endpoint_rules(endpoint: Ipv4Addr) -> [String; 2] {
    [
        format!("ip saddr {endpoint} jump mark-for-masquerade"),
        format!("meta l4proto tcp dnat to {endpoint}:{TARGET_PORT}"),
    ]
}

/// The whole `table ip kube-proxy`, for `nft -f` into a namespace without rules.
pub fn nft_ruleset(set: &ServiceSet) -> String {
    let mut out = String::with_capacity(set.count as usize * 2500);
    let t = set.target();
    out.push_str(
        "table ip kube-proxy {\n\
         \tcomment \"rules for kube-proxy\"\n\
         \tchain filter-forward {\n\t\ttype filter hook forward priority -110; policy accept;\n\
         \t\tct state new jump service-endpoints-check\n\t\tct state new jump cluster-ips-check\n\t}\n\
         \tchain service-endpoints-check {\n\t\tip daddr . meta l4proto . th dport vmap @no-endpoint-services\n\t}\n\
         \tchain cluster-ips-check {\n\t\tip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\"\n\t}\n\
         \tchain nat-prerouting {\n\t\ttype nat hook prerouting priority -100; policy accept;\n\t\tjump services\n\t}\n\
         \tchain nat-output {\n\t\ttype nat hook output priority -100; policy accept;\n\t\tjump services\n\t}\n\
         \tchain nat-postrouting {\n\t\ttype nat hook postrouting priority 100; policy accept;\n\t\tjump masquerading\n\t}\n",
    );
    let _ = writeln!(
        out,
        "\tchain mark-for-masquerade {{\n\t\tmeta mark set meta mark or {MASQ_MARK}\n\t}}\n\
         \tchain masquerading {{\n\t\tmeta mark and {MASQ_MARK} == 0 return\n\
         \t\tmeta mark set meta mark xor {MASQ_MARK}\n\t\tmasquerade fully-random\n\t}}\n\
         \tchain services {{\n\t\tip daddr . meta l4proto . th dport vmap @service-ips\n\
         \t\tfib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports\n\t}}\n\
         \tmap no-endpoint-services {{\n\t\ttype ipv4_addr . inet_proto . inet_service : verdict\n\t}}"
    );
    let vips: Vec<String> = (0..set.count).map(|i| set.vip(i).to_string()).collect();
    let _ = writeln!(
        out,
        "\tset cluster-ips {{\n\t\ttype ipv4_addr\n\t\tcomment \"Active ClusterIPs\"\n\t\telements = {{ {} }}\n\t}}",
        vips.join(", ")
    );
    let elements: Vec<String> = (0..set.count)
        .map(|i| {
            format!(
                "{} . tcp . {SERVICE_PORT} : goto {}",
                set.vip(i),
                nft_service_chain(set, i)
            )
        })
        .collect();
    let _ = writeln!(
        out,
        "\tmap service-ips {{\n\t\ttype ipv4_addr . inet_proto . inet_service : verdict\n\
         \t\tcomment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\"\n\t\telements = {{ {} }}\n\t}}",
        elements.join(", ")
    );
    let _ = writeln!(
        out,
        "\tmap service-nodeports {{\n\t\ttype inet_proto . inet_service : verdict\n\
         \t\tcomment \"NodePort traffic\"\n\t\telements = {{ tcp . {NODE_PORT} : goto {} }}\n\t}}",
        nft_external_chain(set, t)
    );
    for i in 0..set.count {
        let endpoints = set.endpoints(i);
        let _ = writeln!(out, "\tchain {} {{", nft_service_chain(set, i));
        for rule in nft_service_rules(set, i, &endpoints) {
            let _ = writeln!(out, "\t\t{rule}");
        }
        out.push_str("\t}\n");
        for endpoint in endpoints {
            let _ = writeln!(out, "\tchain {} {{", nft_endpoint_chain(set, i, endpoint));
            for rule in nft_endpoint_rules(endpoint) {
                let _ = writeln!(out, "\t\t{rule}");
            }
            out.push_str("\t}\n");
        }
    }
    let _ = writeln!(
        out,
        "\tchain {} {{\n\t\tjump mark-for-masquerade\n\t\tgoto {}\n\t}}",
        nft_external_chain(set, t),
        nft_service_chain(set, t)
    );
    out.push_str("}\n");
    out
}

/// kube-proxy's incremental transaction when endpoint 0 of service `i` is
/// replaced by `new`: the new endpoint chain, the service chain flushed and
/// rewritten, the old endpoint chain deleted.
pub fn nft_endpoint_change(set: &ServiceSet, i: u32, new: Ipv4Addr) -> String {
    let old_endpoints = set.endpoints(i);
    let mut endpoints = old_endpoints.clone();
    endpoints[0] = new;
    let mut out = String::new();
    let new_chain = nft_endpoint_chain(set, i, new);
    let _ = writeln!(out, "add chain ip kube-proxy {new_chain}");
    let _ = writeln!(out, "flush chain ip kube-proxy {new_chain}");
    for rule in nft_endpoint_rules(new) {
        let _ = writeln!(out, "add rule ip kube-proxy {new_chain} {rule}");
    }
    let service = nft_service_chain(set, i);
    let _ = writeln!(out, "flush chain ip kube-proxy {service}");
    for rule in nft_service_rules(set, i, &endpoints) {
        let _ = writeln!(out, "add rule ip kube-proxy {service} {rule}");
    }
    let _ = writeln!(
        out,
        "delete chain ip kube-proxy {}",
        nft_endpoint_chain(set, i, old_endpoints[0])
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rulesets_have_kube_proxy_shape() {
        let set = ServiceSet::new(3);
        let ipt = iptables_ruleset(&set);
        assert_eq!(ipt.matches("-j KUBE-SVC-").count(), 3 + 1, "{ipt}");
        assert_eq!(ipt.matches("--probability").count(), 3 * 9);
        assert_eq!(ipt.matches("-j DNAT").count(), 30);
        assert!(ipt.contains("--probability 0.1000000000"));
        let last_service = ipt
            .rfind("cluster IP\" -m tcp --dport 80 -j KUBE-SVC")
            .unwrap();
        assert!(ipt.rfind("-j KUBE-NODEPORTS\n").unwrap() > last_service);
        let nft = nft_ruleset(&set);
        assert_eq!(nft.matches("numgen random mod 10 vmap").count(), 3);
        assert_eq!(nft.matches("dnat to").count(), 30);
        assert!(nft.contains("ip daddr . meta l4proto . th dport vmap @service-ips"));
        let change = nft_endpoint_change(&set, 1, Ipv4Addr::new(10, 64, 0, 1));
        assert!(change.contains("dnat to 10.64.0.1:8080"));
        let change = iptables_endpoint_change(&set, 1, Ipv4Addr::new(10, 64, 0, 1));
        assert!(change.contains("--to-destination 10.64.0.1:8080"));
        assert!(change.contains("\n-X KUBE-SEP-"));
    }
}
