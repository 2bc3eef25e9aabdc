//! Device discovery in the agent's own network namespace.
//!
//! `if_nameindex(3)` asks the kernel over netlink, so it sees the namespace
//! of the calling process; `/sys/class/net` would show the namespace sysfs
//! was mounted in, which is not the same under `nsenter`.

use std::{
    collections::BTreeMap,
    ffi::CStr,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

/// Every interface of the current network namespace: name -> ifindex.
pub fn list_interfaces() -> std::io::Result<BTreeMap<String, u32>> {
    let mut out = BTreeMap::new();
    // SAFETY: if_nameindex returns a heap array terminated by a zero entry,
    // freed below with if_freenameindex.
    unsafe {
        let head = libc::if_nameindex();
        if head.is_null() {
            return Err(std::io::Error::last_os_error());
        }
        let mut cur = head;
        while (*cur).if_index != 0 && !(*cur).if_name.is_null() {
            let name = CStr::from_ptr((*cur).if_name)
                .to_string_lossy()
                .into_owned();
            out.insert(name, (*cur).if_index);
            cur = cur.add(1);
        }
        libc::if_freenameindex(head);
    }
    Ok(out)
}

/// Every address of every interface of the current network namespace:
/// name -> addresses, in the order the kernel lists them.
pub fn interface_addresses() -> std::io::Result<BTreeMap<String, Vec<IpAddr>>> {
    let mut out: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a linked list freed below with freeifaddrs;
    // every pointer is checked before use and read according to sa_family.
    unsafe {
        if libc::getifaddrs(&mut head) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut cur = head;
        while !cur.is_null() {
            let entry = &*cur;
            cur = entry.ifa_next;
            if entry.ifa_addr.is_null() || entry.ifa_name.is_null() {
                continue;
            }
            let addr = match i32::from((*entry.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let sin = &*(entry.ifa_addr as *const libc::sockaddr_in);
                    IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)))
                }
                libc::AF_INET6 => {
                    let sin6 = &*(entry.ifa_addr as *const libc::sockaddr_in6);
                    IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr))
                }
                _ => continue,
            };
            let name = CStr::from_ptr(entry.ifa_name)
                .to_string_lossy()
                .into_owned();
            out.entry(name).or_default().push(addr);
        }
        libc::freeifaddrs(head);
    }
    Ok(out)
}

/// How a device came to accept packets from the node's own addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcceptLocal {
    /// `net.ipv4.conf.all.accept_local` is 1: the kernel ORs it with each
    /// device's own value, so every device, present or future, accepts.
    All,
    /// The device's own value was 1 already.
    Device,
    /// The agent wrote the device's value.
    Written,
}

/// Where the `accept_local` sysctls live (the agent's network namespace:
/// /proc/sys/net shows the namespace of the process that opens it).
const PROC_SYS_CONF: &str = "/proc/sys/net/ipv4/conf";

/// Lets a device accept packets whose source is one of the node's own
/// addresses (`accept_local`). The programs give packets such a source
/// before the stack sees them: traffic from outside SNATed to this node
/// (node device, after XDP), and replies translated back to a NodePort
/// frontend, which is a node address (pod device, after TC). Without it the
/// stack drops them as martians. The setting is per device and per network
/// namespace (the agent's).
///
/// Reads first and writes only when neither `all` nor the device has it:
/// the shipped DaemonSet's container sees /proc/sys read-only (its init
/// container sets `all`), and an error there names the sysctl, the device
/// and the way out.
pub fn accept_local_sources(ifname: &str) -> anyhow::Result<AcceptLocal> {
    if ifname.is_empty() || ifname.contains('/') || ifname.starts_with('.') {
        anyhow::bail!("{ifname:?} is not an interface name");
    }
    if read_flag("all")? {
        return Ok(AcceptLocal::All);
    }
    if read_flag(ifname)? {
        return Ok(AcceptLocal::Device);
    }
    std::fs::write(format!("{PROC_SYS_CONF}/{ifname}/accept_local"), "1").map_err(|e| {
        anyhow::anyhow!(
            "net.ipv4.conf.{ifname}.accept_local is 0 (and net.ipv4.conf.all.accept_local is \
             0), and writing it failed ({e}): packets translated to a node address as source \
             (SNAT, NodePort replies) are dropped as martians on {ifname}; set \
             net.ipv4.conf.all.accept_local=1 on the node (deploy/daemonset.yaml's init \
             container does)"
        )
    })?;
    Ok(AcceptLocal::Written)
}

/// Checked once at start, before any device is attached: when this process
/// cannot write /proc/sys (a container that is not privileged), every
/// device it will attach to, present or future, relies on
/// `net.ipv4.conf.all.accept_local` being 1 already. Returns whether the
/// agent will write the per-device values itself.
pub fn check_accept_local_at_start(devices: &[String], pod_devices: bool) -> anyhow::Result<bool> {
    if read_flag("all")? {
        return Ok(false);
    }
    // SAFETY: access(2) on a NUL-terminated constant path; it only reads.
    if unsafe {
        libc::access(
            c"/proc/sys/net/ipv4/conf/all/accept_local".as_ptr(),
            libc::W_OK,
        )
    } == 0
    {
        return Ok(true);
    }
    let why = std::io::Error::last_os_error();
    // Node devices that have it set on their own are fine; pod devices come
    // later and copy `default` at best, so only `all` covers them.
    let device = match devices.iter().find(|d| !read_flag(d).unwrap_or(false)) {
        Some(d) => format!("{d} (net.ipv4.conf.{d}.accept_local is 0 too)"),
        None if pod_devices => "every pod device".to_owned(),
        None => return Ok(false),
    };
    anyhow::bail!(
        "net.ipv4.conf.all.accept_local is 0 and /proc/sys is not writable here ({why}): \
         packets translated to a node address as source (SNAT, NodePort replies) would be \
         dropped as martians on {device}; set net.ipv4.conf.all.accept_local=1 on the node \
         before the agent starts (deploy/daemonset.yaml's privileged init container does)"
    )
}

/// `net.ipv4.conf.<device>.accept_local` (`all` for the global one) is 1.
fn read_flag(device: &str) -> anyhow::Result<bool> {
    let path = format!("{PROC_SYS_CONF}/{device}/accept_local");
    let value = std::fs::read_to_string(&path)
        .map_err(|e| anyhow::anyhow!("reading net.ipv4.conf.{device}.accept_local: {e}"))?;
    Ok(value.trim() != "0")
}

/// Shell-style glob: `*` any run, `?` one character, everything else literal.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    fn go(p: &[u8], n: &[u8]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some(b'*'), _) => go(&p[1..], n) || (!n.is_empty() && go(p, &n[1..])),
            (Some(b'?'), Some(_)) => go(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &n[1..]),
            _ => false,
        }
    }
    go(pattern.as_bytes(), name.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_matches_like_a_shell() {
        for (pattern, name, want) in [
            ("lbv*", "lbv1", true),
            ("lbv*", "lbv", true),
            ("lbv*", "eth0", false),
            ("veth?", "veth1", true),
            ("veth?", "veth12", false),
            ("*", "anything", true),
            ("eth0", "eth0", true),
            ("eth0", "eth01", false),
            ("*-pod", "a-pod", true),
        ] {
            assert_eq!(glob_match(pattern, name), want, "{pattern} vs {name}");
        }
    }

    #[test]
    fn loopback_has_its_address() {
        let addresses = interface_addresses().expect("getifaddrs");
        assert!(
            addresses
                .get("lo")
                .is_some_and(|a| a.contains(&IpAddr::V4(Ipv4Addr::LOCALHOST))),
            "{addresses:?}"
        );
    }

    #[test]
    fn lists_loopback() {
        let interfaces = list_interfaces().expect("if_nameindex");
        assert!(interfaces.contains_key("lo"), "{interfaces:?}");
    }
}
