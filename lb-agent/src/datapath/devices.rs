//! Device discovery in the agent's own network namespace.
//!
//! `if_nameindex(3)` asks the kernel over netlink, so it sees the namespace
//! of the calling process; `/sys/class/net` would show the namespace sysfs
//! was mounted in, which is not the same under `nsenter`.

use std::{collections::BTreeMap, ffi::CStr};

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
    fn lists_loopback() {
        let interfaces = list_interfaces().expect("if_nameindex");
        assert!(interfaces.contains_key("lo"), "{interfaces:?}");
    }
}
