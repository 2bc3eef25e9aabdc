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

/// Lets a device accept packets whose source is one of the node's own
/// addresses (`accept_local`). The programs give packets such a source
/// before the stack sees them: traffic from outside SNATed to this node
/// (node device, after XDP), and replies translated back to a NodePort
/// frontend, which is a node address (pod device, after TC). Without it the
/// stack drops them as martians. The setting is per device and per network
/// namespace (the agent's).
pub fn accept_local_sources(ifname: &str) -> std::io::Result<()> {
    if ifname.is_empty() || ifname.contains('/') || ifname.starts_with('.') {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{ifname:?} is not an interface name"),
        ));
    }
    std::fs::write(
        format!("/proc/sys/net/ipv4/conf/{ifname}/accept_local"),
        "1",
    )
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
