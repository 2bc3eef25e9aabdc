//! Destroying sockets that socket-level balancing connected to a backend
//! that is gone: the socket-level counterpart of the UDP conntrack flush.
//!
//! A connected UDP socket keeps the backend `connect()` gave it for as long
//! as it lives; no later program run re-balances it. When that backend
//! leaves its service, the agent finds the sockets in the network
//! namespaces of the `--socket-lb-cgroup`'s processes and destroys them
//! with the sock_diag `SOCK_DESTROY` request (`CONFIG_INET_DIAG_DESTROY`,
//! Linux 4.5+ for TCP, 4.17+ for UDP), so the application sees
//! `ECONNABORTED` and reconnects (and is balanced afresh), as it would after
//! a reset. Only sockets socket-level balancing translated are candidates:
//! their cookie and backend are in `LB4_SOCK_REVNAT_V1` (IPv6:
//! `LB6_SOCK_REVNAT_V1`) with the service address they asked for; a socket
//! that connected to the pod address itself is left alone. Both families'
//! sockets are dumped (one request each).
//!
//! A BPF socket iterator calling `bpf_sock_destroy()` (Linux 6.5+) would do
//! the same from inside the kernel; sock_diag needs no extra program, works
//! on older kernels and is what `ss -K` uses.

use std::{
    collections::BTreeSet,
    fs::File,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

use anyhow::{Context as _, bail};

/// `SOCK_DIAG_BY_FAMILY` and `SOCK_DESTROY` (linux/sock_diag.h).
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_HDR_LEN: usize = 16;
/// `struct inet_diag_req_v2`.
const REQ_LEN: usize = 56;
/// `struct inet_diag_msg` (without attributes).
const MSG_LEN: usize = 72;
/// `TCP_ESTABLISHED`: the state of a connected UDP socket.
const STATE_ESTABLISHED: u8 = 1;

/// One socket as sock_diag identifies it (`struct inet_diag_sockid`). Both
/// ends are of the socket's family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct UdpSocketId {
    pub local: SocketAddr,
    pub peer: SocketAddr,
    pub interface: u32,
    pub cookie: u64,
}

/// An address as `inet_diag_sockid` holds it: 16 bytes, an IPv4 one in
/// the first four.
fn wire_addr(ip: IpAddr) -> [u8; 16] {
    let mut out = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => out[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => out = v6.octets(),
    }
    out
}

impl UdpSocketId {
    /// The socket's address family (`AF_INET`, `AF_INET6`).
    fn family(&self) -> u8 {
        match self.peer {
            SocketAddr::V4(_) => libc::AF_INET as u8,
            SocketAddr::V6(_) => libc::AF_INET6 as u8,
        }
    }

    /// The 48 bytes of `inet_diag_sockid`: ports and addresses in network
    /// order, interface and cookie (two 32-bit halves, low first) native.
    fn encode(&self) -> [u8; 48] {
        let mut id = [0u8; 48];
        id[0..2].copy_from_slice(&self.local.port().to_be_bytes());
        id[2..4].copy_from_slice(&self.peer.port().to_be_bytes());
        id[4..20].copy_from_slice(&wire_addr(self.local.ip()));
        id[20..36].copy_from_slice(&wire_addr(self.peer.ip()));
        id[36..40].copy_from_slice(&self.interface.to_ne_bytes());
        id[40..44].copy_from_slice(&(self.cookie as u32).to_ne_bytes());
        id[44..48].copy_from_slice(&((self.cookie >> 32) as u32).to_ne_bytes());
        id
    }

    /// A socket id of `family` from its wire form; `None` when truncated
    /// or of another family.
    fn decode(family: u8, id: &[u8]) -> Option<Self> {
        let u16_be = |at: usize| Some(u16::from_be_bytes(id.get(at..at + 2)?.try_into().ok()?));
        let addr = |at: usize| -> Option<IpAddr> {
            match i32::from(family) {
                libc::AF_INET => {
                    let b: [u8; 4] = id.get(at..at + 4)?.try_into().ok()?;
                    Some(Ipv4Addr::from(b).into())
                }
                libc::AF_INET6 => {
                    let b: [u8; 16] = id.get(at..at + 16)?.try_into().ok()?;
                    Some(Ipv6Addr::from(b).into())
                }
                _ => None,
            }
        };
        let u32_ne = |at: usize| Some(u32::from_ne_bytes(id.get(at..at + 4)?.try_into().ok()?));
        Some(Self {
            local: SocketAddr::new(addr(4)?, u16_be(0)?),
            peer: SocketAddr::new(addr(20)?, u16_be(2)?),
            interface: u32_ne(36)?,
            cookie: u64::from(u32_ne(40)?) | (u64::from(u32_ne(44)?) << 32),
        })
    }
}

/// A request: `nlmsghdr` + `inet_diag_req_v2` for UDP sockets of `family`.
fn request(kind: u16, flags: u16, seq: u32, family: u8, id: Option<&UdpSocketId>) -> Vec<u8> {
    let len = NLMSG_HDR_LEN + REQ_LEN;
    let mut msg = Vec::with_capacity(len);
    msg.extend_from_slice(&(len as u32).to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(&flags.to_ne_bytes());
    msg.extend_from_slice(&seq.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.push(family);
    msg.push(libc::IPPROTO_UDP as u8);
    msg.push(0); // idiag_ext
    msg.push(0); // pad
    msg.extend_from_slice(&u32::MAX.to_ne_bytes()); // every state
    msg.extend_from_slice(&id.map_or([0u8; 48], UdpSocketId::encode));
    msg
}

/// A `NETLINK_SOCK_DIAG` socket of the calling thread's network namespace.
fn diag_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the descriptor is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn send(fd: &OwnedFd, msg: &[u8]) -> io::Result<()> {
    // SAFETY: msg is a valid buffer of msg.len() bytes.
    let n = unsafe { libc::send(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn recv(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: buf is a valid writable buffer of buf.len() bytes.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// The netlink messages in one datagram: (type, payload).
fn messages(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut at = 0;
    std::iter::from_fn(move || {
        let header = buf.get(at..at + NLMSG_HDR_LEN)?;
        let len = u32::from_ne_bytes(header[0..4].try_into().ok()?) as usize;
        let kind = u16::from_ne_bytes(header[4..6].try_into().ok()?);
        if len < NLMSG_HDR_LEN || at + len > buf.len() {
            return None;
        }
        let payload = &buf[at + NLMSG_HDR_LEN..at + len];
        at += (len + 3) & !3;
        Some((kind, payload))
    })
}

/// The error code of an `NLMSG_ERROR` payload (0 is an acknowledgement).
fn error_code(payload: &[u8]) -> i32 {
    payload
        .get(0..4)
        .and_then(|b| b.try_into().ok())
        .map_or(-libc::EINVAL, i32::from_ne_bytes)
}

/// Every connected UDP socket of the caller's network namespace, IPv4
/// and IPv6.
pub fn connected_udp_sockets() -> anyhow::Result<Vec<UdpSocketId>> {
    let mut sockets = connected_udp_sockets_of(libc::AF_INET as u8)?;
    sockets.extend(connected_udp_sockets_of(libc::AF_INET6 as u8)?);
    Ok(sockets)
}

/// Every connected UDP socket of `family` of the caller's network namespace.
fn connected_udp_sockets_of(family: u8) -> anyhow::Result<Vec<UdpSocketId>> {
    let fd = diag_socket().context("opening a sock_diag socket")?;
    send(
        &fd,
        &request(
            SOCK_DIAG_BY_FAMILY,
            NLM_F_REQUEST | NLM_F_DUMP,
            1,
            family,
            None,
        ),
    )
    .context("asking sock_diag for the UDP sockets")?;
    let mut sockets = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = recv(&fd, &mut buf).context("reading the UDP socket dump")?;
        if n == 0 {
            bail!("sock_diag closed the dump");
        }
        for (kind, payload) in messages(&buf[..n]) {
            match kind {
                NLMSG_DONE => return Ok(sockets),
                NLMSG_ERROR => {
                    let code = error_code(payload);
                    bail!(
                        "sock_diag refused the UDP dump: {}",
                        io::Error::from_raw_os_error(-code)
                    );
                }
                SOCK_DIAG_BY_FAMILY if payload.len() >= MSG_LEN => {
                    if payload[1] != STATE_ESTABLISHED {
                        continue;
                    }
                    if let Some(id) = UdpSocketId::decode(payload[0], &payload[4..52]) {
                        sockets.push(id);
                    }
                }
                _ => {}
            }
        }
    }
}

/// Destroys one UDP socket of the caller's network namespace (the cookie
/// must still match: a socket that closed and whose tuple was reused is
/// not touched).
pub fn destroy_udp_socket(id: &UdpSocketId) -> io::Result<()> {
    let fd = diag_socket()?;
    send(
        &fd,
        &request(
            SOCK_DESTROY,
            NLM_F_REQUEST | NLM_F_ACK,
            2,
            id.family(),
            Some(id),
        ),
    )?;
    let mut buf = [0u8; 512];
    let n = recv(&fd, &mut buf)?;
    for (kind, payload) in messages(&buf[..n]) {
        if kind == NLMSG_ERROR {
            let code = error_code(payload);
            return if code == 0 {
                Ok(())
            } else {
                Err(io::Error::from_raw_os_error(-code))
            };
        }
    }
    Err(io::Error::other("no acknowledgement from sock_diag"))
}

/// The network namespaces the processes of `cgroup` (and of its
/// descendants) live in, one open handle each.
pub fn cgroup_namespaces(cgroup: &Path) -> anyhow::Result<Vec<File>> {
    let mut pids = Vec::new();
    let mut dirs = vec![cgroup.to_owned()];
    while let Some(dir) = dirs.pop() {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs"))
            .with_context(|| format!("reading {}/cgroup.procs", dir.display()))?;
        pids.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        for entry in std::fs::read_dir(&dir)?.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                dirs.push(entry.path());
            }
        }
    }
    let mut seen = BTreeSet::new();
    let mut namespaces = Vec::new();
    for pid in pids {
        // A process that exited meanwhile has no sockets left.
        let Ok(ns) = File::open(format!("/proc/{pid}/ns/net")) else {
            continue;
        };
        let Ok(meta) = ns.metadata() else {
            continue;
        };
        use std::os::unix::fs::MetadataExt;
        if seen.insert((meta.dev(), meta.ino())) {
            namespaces.push(ns);
        }
    }
    Ok(namespaces)
}

/// Runs `f` on a thread that has entered the network namespace `ns` (the
/// thread ends with it, so no other code runs in that namespace).
pub fn in_namespace<T: Send + 'static>(
    ns: File,
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    std::thread::spawn(move || {
        // SAFETY: setns(2) on this thread only, with a namespace fd.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(anyhow::Error::new(io::Error::last_os_error())
                .context("entering a network namespace of the cgroup"));
        }
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the socket-destroy thread panicked"))?
}

/// Destroys, in every network namespace of `cgroup`'s processes, the
/// connected UDP sockets for which `doomed` says yes; returns how many.
pub fn destroy_udp_sockets(
    cgroup: &Path,
    doomed: impl Fn(&UdpSocketId) -> bool + Clone + Send + 'static,
) -> anyhow::Result<usize> {
    let mut destroyed = 0;
    for ns in cgroup_namespaces(cgroup)? {
        let doomed = doomed.clone();
        destroyed += in_namespace(ns, move || {
            let mut count = 0;
            for id in connected_udp_sockets()?.iter().filter(|id| doomed(id)) {
                match destroy_udp_socket(id) {
                    Ok(()) => count += 1,
                    // Closed meanwhile: nothing to destroy.
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                    Err(e) => return Err(anyhow::Error::new(e).context("SOCK_DESTROY")),
                }
            }
            Ok(count)
        })?;
    }
    Ok(destroyed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_ids_round_trip_through_the_wire_layout() {
        let id = UdpSocketId {
            local: SocketAddr::from(([10, 244, 1, 2], 40000)),
            peer: SocketAddr::from(([10, 244, 1, 11], 5353)),
            interface: 7,
            cookie: 0x1234_5678_9abc_def0,
        };
        let wire = id.encode();
        // Ports big-endian at the front, addresses at 4 and 20.
        assert_eq!(&wire[0..4], &[0x9c, 0x40, 0x14, 0xe9]);
        assert_eq!(&wire[4..8], &[10, 244, 1, 2]);
        assert_eq!(&wire[8..20], &[0; 12]);
        assert_eq!(&wire[20..24], &[10, 244, 1, 11]);
        assert_eq!(UdpSocketId::decode(libc::AF_INET as u8, &wire), Some(id));
        let req = request(
            SOCK_DESTROY,
            NLM_F_REQUEST | NLM_F_ACK,
            9,
            id.family(),
            Some(&id),
        );
        assert_eq!(req.len(), NLMSG_HDR_LEN + REQ_LEN);
        assert_eq!(u32::from_ne_bytes(req[0..4].try_into().expect("len")), 72);
        assert_eq!(req[16], libc::AF_INET as u8);
        assert_eq!(&req[24..], &wire[..]);
    }

    #[test]
    fn ipv6_socket_ids_carry_the_whole_addresses() {
        let local: Ipv6Addr = "fd00:10:244:1::2".parse().expect("address");
        let peer: Ipv6Addr = "fd00:10:244:1::11".parse().expect("address");
        let id = UdpSocketId {
            local: SocketAddr::from((local, 40000)),
            peer: SocketAddr::from((peer, 5353)),
            interface: 0,
            cookie: 42,
        };
        let wire = id.encode();
        assert_eq!(&wire[4..20], &local.octets());
        assert_eq!(&wire[20..36], &peer.octets());
        assert_eq!(UdpSocketId::decode(libc::AF_INET6 as u8, &wire), Some(id));
        // Another family's bytes are not read as this one's.
        assert_ne!(UdpSocketId::decode(libc::AF_INET as u8, &wire), Some(id));
        assert_eq!(UdpSocketId::decode(0, &wire), None);
        let req = request(SOCK_DESTROY, NLM_F_REQUEST, 3, id.family(), Some(&id));
        assert_eq!(req[16], libc::AF_INET6 as u8);
        assert_eq!(req[17], libc::IPPROTO_UDP as u8);
        assert_eq!(&req[24..], &wire[..]);
    }

    #[test]
    fn truncated_netlink_messages_end_the_walk() {
        let mut buf = request(
            SOCK_DIAG_BY_FAMILY,
            NLM_F_REQUEST,
            1,
            libc::AF_INET as u8,
            None,
        );
        let whole: Vec<u16> = messages(&buf).map(|(kind, _)| kind).collect();
        assert_eq!(whole, vec![SOCK_DIAG_BY_FAMILY]);
        buf.truncate(40);
        assert_eq!(messages(&buf).count(), 0);
        assert_eq!(messages(&[0u8; 3]).count(), 0);
    }
}
