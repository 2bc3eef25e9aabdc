//! SCTP end to end in the two-node topology, one agent per node: a client
//! pod on node-1 reaches an SCTP ClusterIP whose endpoint runs on node-1
//! too (the pod TC program translates both ways; the node XDP program,
//! which replies from another node cross, passes SCTP untouched for now).
//! The Service port differs from its targetPort, so every packet's CRC32c
//! must be updated on the way.
//!
//! Two tests: one with raw IPPROTO_SCTP sockets on both ends, which needs
//! no SCTP in the kernel (the packets are built and checked here, CRC
//! included, with the independent CRC32c of `lb_tests::packet`), and one
//! with a real association (kernel SCTP one-to-one sockets), skipped with
//! a printed reason where the kernel has no SCTP.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

use lb_tests::{
    cluster::{NodeAgents, write_manifest},
    packet::{Packet, Transport, sctp_data, sctp_init},
    require_root,
};
use xtask::{Cluster, NetNs, TempDir};

const IPPROTO_SCTP: i32 = 132;
const ECHO: (&str, Ipv4Addr) = ("echo-a", Ipv4Addr::new(10, 244, 1, 11));
const CLIENT: (&str, Ipv4Addr) = ("client", Ipv4Addr::new(10, 244, 1, 2));
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 60);
const PORT: u16 = 80;
const TARGET: u16 = 3868;
const NODE_PORT: u16 = 30868;
/// How long one packet may take to arrive.
const WAIT: Duration = Duration::from_secs(2);

fn diameter_manifest() -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: diameter, namespace: default}}
spec:
  type: NodePort
  clusterIP: {CLUSTER_IP}
  ports: [{{name: diameter, port: {PORT}, targetPort: {TARGET}, nodePort: {NODE_PORT}, protocol: SCTP}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: diameter-x1
  namespace: default
  labels: {{kubernetes.io/service-name: diameter}}
addressType: IPv4
ports: [{{name: diameter, port: {TARGET}, protocol: SCTP}}]
endpoints:
- addresses: ["{ip}"]
  conditions: {{ready: true}}
  nodeName: node-1
  targetRef: {{kind: Pod, namespace: default, name: {name}}}
"#,
        ip = ECHO.1,
        name = ECHO.0,
    )
}

/// Two nodes, the backend pod and a client pod on node-1, one
/// agent per node. Field order is drop order.
struct TwoNodes {
    agents: NodeAgents,
    _manifests: TempDir,
    cluster: Cluster,
}

impl TwoNodes {
    fn start() -> Self {
        let mut cluster = Cluster::new(2).expect("two-node cluster");
        cluster.add_pod(1, ECHO.0, ECHO.1).expect("pod");
        cluster.add_pod(1, CLIENT.0, CLIENT.1).expect("pod");
        let manifests = TempDir::new("lbt", "manifests").expect("manifest dir");
        write_manifest(manifests.path(), "diameter.yaml", &diameter_manifest());
        let agents = NodeAgents::start(&cluster, manifests.path(), &[]);
        Self {
            agents,
            _manifests: manifests,
            cluster,
        }
    }

    fn pod_ns(&self, name: &str) -> &NetNs {
        self.cluster.pod(name).expect("pod").ns()
    }
}

/// A raw IPv4 socket of protocol SCTP in `ns`: it sends SCTP packets built
/// here (the kernel adds the IPv4 header) and receives every SCTP packet
/// delivered to the namespace, with its IPv4 header.
fn raw_sctp_socket(ns: &NetNs) -> OwnedFd {
    ns.run(|| {
        // SAFETY: plain socket(2); the result is checked.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, IPPROTO_SCTP) };
        assert!(
            fd >= 0,
            "raw SCTP socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: a descriptor we own from here on.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        // SAFETY: a valid timeval of the size given.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "SO_RCVTIMEO");
        fd
    })
    .expect("in namespace")
}

/// Sends `packet`'s SCTP part (CRC computed by the packet builder) from a
/// raw socket; the kernel writes the IPv4 header, its source the route's.
fn send(fd: &OwnedFd, packet: &Packet) {
    let frame = packet.emit();
    let sctp = &frame[14 + 20..];
    let to = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(packet.dst.octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: a valid buffer and address of the sizes given.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            sctp.as_ptr().cast(),
            sctp.len(),
            0,
            (&to as *const libc::sockaddr_in).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    assert_eq!(
        sent,
        sctp.len() as isize,
        "sendto: {}",
        std::io::Error::last_os_error()
    );
}

/// The next SCTP packet the raw socket receives within [`WAIT`] whose
/// destination port is `port`, parsed: `Err` when its checksums are
/// wrong (the CRC32c included), `None` when none came.
fn receive(fd: &OwnedFd, port: u16) -> Option<Result<Packet, String>> {
    let deadline = Instant::now() + WAIT;
    let mut buf = vec![0u8; 65_536];
    while Instant::now() < deadline {
        // SAFETY: a valid buffer of the size given.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n <= 0 {
            continue;
        }
        let ip = &buf[..n as usize];
        // The builder parses Ethernet frames: a dummy header in front.
        let mut frame = vec![0u8; 12];
        frame.extend_from_slice(&0x0800u16.to_be_bytes());
        frame.extend_from_slice(ip);
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        if ip.len() < ihl + 4 || u16::from_be_bytes([ip[ihl + 2], ip[ihl + 3]]) != port {
            continue;
        }
        return Some(Packet::parse(&frame));
    }
    None
}

fn with_tag(mut packet: Packet, tag: u32) -> Packet {
    if let Transport::Sctp {
        verification_tag, ..
    } = &mut packet.transport
    {
        *verification_tag = tag;
    }
    packet
}

/// The exchange of one association's first packets through a frontend:
/// INIT from `client` (address, port) to `frontend`, seen by the backend
/// on its targetPort from `seen_as`; INIT-ACK back, seen by the client
/// from the frontend; then DATA of several lengths each way. Every packet
/// is parsed on arrival, CRC32c checked.
fn exchange(
    setup: &TwoNodes,
    (client_fd, client): (&OwnedFd, SocketAddrV4),
    backend_fd: &OwnedFd,
    frontend: SocketAddrV4,
    seen_as: Ipv4Addr,
) {
    let init = Packet::sctp(
        (*client.ip(), client.port()),
        (*frontend.ip(), frontend.port()),
        &sctp_init(0x1111_2222),
    );
    // The agents may still be programming: the INIT is sent again until it
    // arrives (as SCTP retransmits it), within 30 s.
    let mut arrived = None;
    setup
        .agents
        .wait_until("the INIT reaching the backend", || {
            send(client_fd, &init);
            arrived = receive(backend_fd, TARGET);
            arrived.is_some()
        });
    let at_backend = arrived
        .expect("received")
        .unwrap_or_else(|e| panic!("INIT through {frontend} arrived broken: {e}"));
    assert_eq!(at_backend.dst, ECHO.1, "INIT not DNATed");
    assert_eq!(at_backend.src, seen_as, "INIT's source");
    let (from_port, _) = at_backend.ports().expect("ports");
    if seen_as == *client.ip() {
        assert_eq!(from_port, client.port(), "client port changed without SNAT");
    }
    assert_eq!(at_backend.payload, init.payload, "chunks changed");

    let mut ack_chunk = sctp_init(0x3333_4444);
    ack_chunk[0] = lb_tests::packet::SCTP_INIT_ACK;
    let ack = with_tag(
        Packet::sctp((ECHO.1, TARGET), (seen_as, from_port), &ack_chunk),
        0x1111_2222,
    );
    send(backend_fd, &ack);
    let at_client = receive(client_fd, client.port())
        .expect("INIT-ACK never reached the client")
        .unwrap_or_else(|e| panic!("INIT-ACK through {frontend} arrived broken: {e}"));
    assert_eq!(
        (at_client.src, at_client.ports()),
        (*frontend.ip(), Some((frontend.port(), client.port()))),
        "INIT-ACK not translated back to the frontend"
    );

    for (tsn, len) in [(1u32, 1usize), (2, 300), (3, 1200)] {
        let data = with_tag(
            Packet::sctp(
                (*client.ip(), client.port()),
                (*frontend.ip(), frontend.port()),
                &sctp_data(tsn, &vec![tsn as u8; len]),
            ),
            0x3333_4444,
        );
        send(client_fd, &data);
        let got = receive(backend_fd, TARGET)
            .expect("DATA never reached the backend")
            .unwrap_or_else(|e| panic!("DATA of {len} bytes arrived broken: {e}"));
        assert_eq!(got.payload, data.payload);
        let echo = with_tag(
            Packet::sctp((ECHO.1, TARGET), (seen_as, from_port), &data.payload),
            0x1111_2222,
        );
        send(backend_fd, &echo);
        let back = receive(client_fd, client.port())
            .expect("DATA echo never reached the client")
            .unwrap_or_else(|e| panic!("DATA echo of {len} bytes arrived broken: {e}"));
        assert_eq!(back.src, *frontend.ip());
        assert_eq!(back.payload, data.payload);
    }
}

#[test]
fn sctp_packets_cross_a_cluster_ip_with_valid_crcs() {
    require_root("sctp_packets_cross_a_cluster_ip_with_valid_crcs");
    let setup = TwoNodes::start();
    let backend_fd = raw_sctp_socket(setup.pod_ns(ECHO.0));

    // A pod to the ClusterIP: DNAT on its veth, the reply translated back
    // on the backend's.
    let client_fd = raw_sctp_socket(setup.pod_ns(CLIENT.0));
    exchange(
        &setup,
        (&client_fd, SocketAddrV4::new(CLIENT.1, 40_000)),
        &backend_fd,
        SocketAddrV4::new(CLUSTER_IP, PORT),
        CLIENT.1,
    );
}

/// Whether this kernel has SCTP sockets (built in or as a module that
/// `modprobe` can load).
fn kernel_sctp() -> Result<(), String> {
    let probe = || {
        // SAFETY: plain socket(2), closed at once.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, IPPROTO_SCTP) };
        if fd >= 0 {
            // SAFETY: our descriptor.
            unsafe { libc::close(fd) };
            return Ok(());
        }
        Err(std::io::Error::last_os_error())
    };
    if probe().is_ok() {
        return Ok(());
    }
    let modprobe = std::process::Command::new("modprobe").arg("sctp").output();
    match (probe(), modprobe) {
        (Ok(()), _) => Ok(()),
        (Err(e), Ok(out)) => Err(format!(
            "socket(AF_INET, SOCK_STREAM, IPPROTO_SCTP): {e}; modprobe sctp: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        (Err(e), Err(m)) => Err(format!(
            "socket(AF_INET, SOCK_STREAM, IPPROTO_SCTP): {e}; modprobe: {m}"
        )),
    }
}

/// A kernel SCTP one-to-one socket (SOCK_STREAM) in `ns`.
fn sctp_stream(ns: &NetNs) -> OwnedFd {
    ns.run(|| {
        // SAFETY: plain socket(2); the result is checked.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, IPPROTO_SCTP) };
        assert!(fd >= 0, "SCTP socket: {}", std::io::Error::last_os_error());
        // SAFETY: a descriptor we own from here on.
        unsafe { OwnedFd::from_raw_fd(fd) }
    })
    .expect("in namespace")
}

fn sockaddr(addr: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr.ip().octets()),
        },
        sin_zero: [0; 8],
    }
}

/// Connects a kernel SCTP association from `ns` to `to` (bounded: 30
/// tries of a connect with the kernel's INIT retransmissions cut short by
/// SO_SNDTIMEO), sends `message`, and returns the echo.
fn associate(ns: &NetNs, to: SocketAddrV4, message: &'static [u8]) -> Result<Vec<u8>, String> {
    let fd = sctp_stream(ns);
    let timeout = libc::timeval {
        tv_sec: 3,
        tv_usec: 0,
    };
    for opt in [libc::SO_SNDTIMEO, libc::SO_RCVTIMEO] {
        // SAFETY: a valid timeval of the size given.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&timeout as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
    }
    let sa = sockaddr(to);
    // SAFETY: a valid address of the size given.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&sa as *const libc::sockaddr_in).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(format!("connect {to}: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: valid buffers of the sizes given.
    let sent = unsafe { libc::send(fd.as_raw_fd(), message.as_ptr().cast(), message.len(), 0) };
    if sent != message.len() as isize {
        return Err(format!("send: {}", std::io::Error::last_os_error()));
    }
    let mut buf = vec![0u8; 4096];
    // SAFETY: as above.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n <= 0 {
        return Err(format!("recv: {}", std::io::Error::last_os_error()));
    }
    buf.truncate(n as usize);
    Ok(buf)
}

/// An SCTP echo server in `ns` on `port`: accepts associations one at a
/// time and echoes each message, until its listening socket is shut down
/// (the returned descriptor; dropping the test's topology ends it too).
fn sctp_echo_server(ns: &NetNs, port: u16) -> OwnedFd {
    let listener = sctp_stream(ns);
    let sa = sockaddr(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port));
    // SAFETY: a valid address of the size given; listen on our socket.
    unsafe {
        assert_eq!(
            libc::bind(
                listener.as_raw_fd(),
                (&sa as *const libc::sockaddr_in).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            ),
            0,
            "bind: {}",
            std::io::Error::last_os_error()
        );
        assert_eq!(libc::listen(listener.as_raw_fd(), 16), 0, "listen");
    }
    let raw = listener.as_raw_fd();
    std::thread::spawn(move || {
        loop {
            // SAFETY: accept on the listening socket; fails once it is shut down.
            let conn = unsafe { libc::accept(raw, std::ptr::null_mut(), std::ptr::null_mut()) };
            if conn < 0 {
                return;
            }
            // SAFETY: the accepted descriptor, ours.
            let conn = unsafe { OwnedFd::from_raw_fd(conn) };
            let mut buf = vec![0u8; 4096];
            // SAFETY: valid buffers of the sizes given.
            let n = unsafe { libc::recv(conn.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n > 0 {
                // SAFETY: as above.
                unsafe { libc::send(conn.as_raw_fd(), buf.as_ptr().cast(), n as usize, 0) };
            }
        }
    });
    listener
}

#[test]
fn a_real_sctp_association_through_a_cluster_ip() {
    require_root("a_real_sctp_association_through_a_cluster_ip");
    if let Err(why) = kernel_sctp() {
        eprintln!("skipped: this kernel has no SCTP ({why})");
        return;
    }
    let setup = TwoNodes::start();
    let listener = sctp_echo_server(setup.pod_ns(ECHO.0), TARGET);
    let mut answer = None;
    setup
        .agents
        .wait_until("an association through the ClusterIP", || {
            answer = associate(
                setup.pod_ns(CLIENT.0),
                SocketAddrV4::new(CLUSTER_IP, PORT),
                b"hello over sctp",
            )
            .ok();
            answer.is_some()
        });
    assert_eq!(answer.as_deref(), Some(&b"hello over sctp"[..]));
    // SAFETY: shuts our listening socket down, which ends the server thread.
    unsafe { libc::shutdown(listener.as_raw_fd(), libc::SHUT_RDWR) };
}
