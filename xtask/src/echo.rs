//! Test servers that answer with their pod name and the client address they
//! saw, and the clients that talk to them from inside a namespace.
//!
//! Every answer has the shape `pod=<name> client=<ip:port>\n`:
//! - TCP, one request (an HTTP request, or any single line): an HTTP/1.0
//!   response whose body is the answer, then the server closes;
//! - TCP, a first line `HOLD`: the connection stays open and every further
//!   line gets an answer (long-lived connection tests);
//! - UDP: every datagram gets an answer; one that starts with
//!   [`ECHO_PREFIX`] gets the answer followed by the whole datagram (a
//!   large request makes an equally large answer: fragmentation tests).

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::netns::NetNs;

/// How often server threads look at the stop flag.
const POLL: Duration = Duration::from_millis(100);
/// How long a server waits for a complete request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// First line of a connection that asks to be held open.
pub const HOLD_LINE: &str = "HOLD";

/// First bytes of a UDP datagram that asks to be echoed after the answer.
pub const ECHO_PREFIX: &[u8] = b"ECHO ";
/// The largest UDP datagram the servers and clients read (the IPv4 limit).
const MAX_DATAGRAM: usize = 65536;

#[derive(Debug, Default)]
struct Counters {
    tcp: AtomicU64,
    udp: AtomicU64,
}

/// Echo servers of one pod; they stop (threads joined) on drop.
#[derive(Debug)]
pub struct EchoServer {
    pod_name: String,
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
    threads: Vec<JoinHandle<()>>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl EchoServer {
    /// Binds 0.0.0.0 on every port inside `ns` (so clients may connect as
    /// soon as this returns) and serves them on background threads.
    pub fn start(
        ns: &NetNs,
        pod_name: &str,
        tcp_ports: &[u16],
        udp_ports: &[u16],
    ) -> Result<EchoServer> {
        EchoServer::bind(ns, pod_name, &["0.0.0.0"], tcp_ports, udp_ports)
    }

    /// The same on 0.0.0.0 and [::], for a pod of a dual-stack node (whose
    /// namespace has `net.ipv6.bindv6only=1`, so the two binds coexist and
    /// IPv4 peers keep their plain IPv4 addresses).
    pub fn start_dual_stack(
        ns: &NetNs,
        pod_name: &str,
        tcp_ports: &[u16],
        udp_ports: &[u16],
    ) -> Result<EchoServer> {
        EchoServer::bind(ns, pod_name, &["0.0.0.0", "::"], tcp_ports, udp_ports)
    }

    /// The same on the given local addresses only, as a host-network
    /// server bound to its node's addresses: a UDP answer leaves from the
    /// address asked, not from the one the route to the client prefers.
    pub fn start_on(
        ns: &NetNs,
        pod_name: &str,
        hosts: &[&'static str],
        tcp_ports: &[u16],
        udp_ports: &[u16],
    ) -> Result<EchoServer> {
        EchoServer::bind(ns, pod_name, hosts, tcp_ports, udp_ports)
    }

    fn bind(
        ns: &NetNs,
        pod_name: &str,
        hosts: &[&'static str],
        tcp_ports: &[u16],
        udp_ports: &[u16],
    ) -> Result<EchoServer> {
        let (tcp_owned, udp_owned) = (tcp_ports.to_vec(), udp_ports.to_vec());
        let hosts = hosts.to_vec();
        let (listeners, udp_sockets) = ns
            .run(move || -> Result<(Vec<TcpListener>, Vec<UdpSocket>)> {
                let mut listeners = Vec::new();
                let mut udp_sockets = Vec::new();
                for host in hosts {
                    for &port in &tcp_owned {
                        listeners.push(
                            TcpListener::bind((host, port))
                                .with_context(|| format!("binding TCP {host} port {port}"))?,
                        );
                    }
                    for &port in &udp_owned {
                        udp_sockets.push(
                            UdpSocket::bind((host, port))
                                .with_context(|| format!("binding UDP {host} port {port}"))?,
                        );
                    }
                }
                Ok((listeners, udp_sockets))
            })?
            .with_context(|| format!("echo server for pod {pod_name} in {}", ns.name()))?;

        let mut server = EchoServer {
            pod_name: pod_name.to_owned(),
            stop: Arc::new(AtomicBool::new(false)),
            counters: Arc::default(),
            threads: Vec::new(),
            connections: Arc::default(),
        };
        for listener in listeners {
            listener.set_nonblocking(true)?;
            let (pod, stop, counters, connections) = server.shared();
            server.threads.push(
                thread::Builder::new()
                    .name("echo-tcp".into())
                    .spawn(move || accept_loop(listener, pod, stop, counters, connections))?,
            );
        }
        for socket in udp_sockets {
            socket.set_read_timeout(Some(POLL))?;
            let (pod, stop, counters, _) = server.shared();
            server.threads.push(
                thread::Builder::new()
                    .name("echo-udp".into())
                    .spawn(move || udp_loop(socket, pod, stop, counters))?,
            );
        }
        Ok(server)
    }

    pub fn pod_name(&self) -> &str {
        &self.pod_name
    }

    /// Answers sent so far, TCP and UDP.
    pub fn served(&self) -> u64 {
        self.tcp_served() + self.udp_served()
    }

    /// TCP answers (one per request, one per line on a held connection).
    pub fn tcp_served(&self) -> u64 {
        self.counters.tcp.load(Ordering::Relaxed)
    }

    pub fn udp_served(&self) -> u64 {
        self.counters.udp.load(Ordering::Relaxed)
    }

    #[allow(clippy::type_complexity)]
    fn shared(
        &self,
    ) -> (
        Arc<str>,
        Arc<AtomicBool>,
        Arc<Counters>,
        Arc<Mutex<Vec<JoinHandle<()>>>>,
    ) {
        (
            Arc::from(self.pod_name.as_str()),
            self.stop.clone(),
            self.counters.clone(),
            self.connections.clone(),
        )
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        // The accept loops are gone: no new connection threads appear.
        let connections = std::mem::take(&mut *lock(&self.connections));
        for thread in connections {
            let _ = thread.join();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The answer line every server sends.
fn answer(pod: &str, peer: SocketAddr) -> String {
    format!("pod={pod} client={peer}\n")
}

fn accept_loop(
    listener: TcpListener,
    pod: Arc<str>,
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, peer)) => {
                let (pod, stop, counters) = (pod.clone(), stop.clone(), counters.clone());
                let spawned = thread::Builder::new()
                    .name("echo-conn".into())
                    .spawn(move || {
                        let _ = serve_connection(stream, peer, &pod, &stop, &counters);
                    });
                if let Ok(handle) = spawned {
                    let mut connections = lock(&connections);
                    connections.retain(|handle| !handle.is_finished());
                    connections.push(handle);
                }
            }
            // WouldBlock (nothing pending) or a transient error (a client
            // that reset before accept): look again shortly.
            Err(_) => thread::sleep(Duration::from_millis(10)),
        }
    }
}

fn serve_connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    pod: &str,
    stop: &AtomicBool,
    counters: &Counters,
) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(POLL))?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;

    let deadline = Instant::now() + REQUEST_TIMEOUT;
    let mut request = Vec::new();
    let mut chunk = [0u8; 1024];
    while !request_complete(&request) && Instant::now() < deadline {
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => request.extend_from_slice(&chunk[..n]),
            Err(error) if is_timeout(&error) => {}
            Err(error) => return Err(error),
        }
    }

    if let Some(rest) = strip_hold_line(&request) {
        return serve_held(stream, peer, pod, stop, counters, rest.to_vec());
    }

    // Counted before the write: a client that has its answer sees the count.
    counters.tcp.fetch_add(1, Ordering::Relaxed);
    let response = format!(
        "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n{}",
        answer(pod, peer)
    );
    stream.write_all(response.as_bytes())?;
    // Close gracefully: FIN, then wait for the client's FIN, so unread
    // request bytes never turn the close into a reset that eats the answer.
    stream.shutdown(Shutdown::Write)?;
    let drain_deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < drain_deadline && !stop.load(Ordering::Relaxed) {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(error) if is_timeout(&error) => {}
            Err(_) => break,
        }
    }
    Ok(())
}

/// An HTTP request is complete after its blank line; anything else after
/// its first line.
fn request_complete(request: &[u8]) -> bool {
    let Some(first_newline) = request.iter().position(|&b| b == b'\n') else {
        return false;
    };
    let first_line = &request[..first_newline];
    if first_line.windows(6).any(|w| w == b" HTTP/") {
        request.windows(4).any(|w| w == b"\r\n\r\n") || request.windows(2).any(|w| w == b"\n\n")
    } else {
        true
    }
}

/// The bytes after a `HOLD` first line, if the request is one.
fn strip_hold_line(request: &[u8]) -> Option<&[u8]> {
    let first_newline = request.iter().position(|&b| b == b'\n')?;
    let first_line = String::from_utf8_lossy(&request[..first_newline]);
    (first_line.trim() == HOLD_LINE).then(|| &request[first_newline + 1..])
}

fn serve_held(
    mut stream: TcpStream,
    peer: SocketAddr,
    pod: &str,
    stop: &AtomicBool,
    counters: &Counters,
    mut pending: Vec<u8>,
) -> std::io::Result<()> {
    let mut chunk = [0u8; 1024];
    loop {
        while let Some(newline) = pending.iter().position(|&b| b == b'\n') {
            pending.drain(..=newline);
            counters.tcp.fetch_add(1, Ordering::Relaxed);
            stream.write_all(answer(pod, peer).as_bytes())?;
        }
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        match stream.read(&mut chunk) {
            Ok(0) => return Ok(()),
            Ok(n) => pending.extend_from_slice(&chunk[..n]),
            Err(error) if is_timeout(&error) => {}
            Err(error) => return Err(error),
        }
    }
}

fn udp_loop(socket: UdpSocket, pod: Arc<str>, stop: Arc<AtomicBool>, counters: Arc<Counters>) {
    let mut datagram = vec![0u8; MAX_DATAGRAM];
    while !stop.load(Ordering::Relaxed) {
        match socket.recv_from(&mut datagram) {
            Ok((n, peer)) => {
                counters.udp.fetch_add(1, Ordering::Relaxed);
                let mut reply = answer(&pod, peer).into_bytes();
                if datagram[..n].starts_with(ECHO_PREFIX) {
                    reply.extend_from_slice(&datagram[..n]);
                }
                let _ = socket.send_to(&reply, peer);
            }
            Err(error) if is_timeout(&error) => {}
            // E.g. ECONNREFUSED from an earlier ICMP error: keep serving.
            Err(_) => thread::sleep(Duration::from_millis(10)),
        }
    }
}

fn is_timeout(error: &std::io::Error) -> bool {
    matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// Time left before `deadline`, or an error naming what timed out.
fn remaining(deadline: Instant, what: &str) -> Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        bail!("timed out {what}");
    }
    Ok(left)
}

/// `GET /` over HTTP/1.0 from inside `ns`; returns the response body. Fails
/// on anything but a 200.
pub fn http_get(ns: &NetNs, addr: impl Into<SocketAddr>, timeout: Duration) -> Result<String> {
    let addr = addr.into();
    ns.run(move || http_get_here(addr, timeout))?
        .with_context(|| format!("GET http://{addr}/ from {}", ns.name()))
}

fn http_get_here(addr: SocketAddr, timeout: Duration) -> Result<String> {
    let deadline = Instant::now() + timeout;
    let mut stream = TcpStream::connect_timeout(&addr, timeout).context("connecting")?;
    stream.set_write_timeout(Some(remaining(deadline, "before sending")?))?;
    stream
        .write_all(format!("GET / HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .context("sending request")?;
    let mut response = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        stream.set_read_timeout(Some(remaining(deadline, "reading the response")?))?;
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => response.extend_from_slice(&chunk[..n]),
            Err(error) if is_timeout(&error) => bail!("timed out reading the response"),
            Err(error) => return Err(error).context("reading the response"),
        }
    }
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response
        .split_once("\r\n\r\n")
        .with_context(|| format!("response without a header end: {response:?}"))?;
    let status_line = head.lines().next().unwrap_or_default();
    if status_line.split_whitespace().nth(1) != Some("200") {
        bail!("unexpected status {status_line:?}");
    }
    Ok(body.to_owned())
}

/// Sends one datagram from inside `ns` (from a socket connected to `addr`,
/// so only an answer from `addr` itself counts) and returns the answer.
pub fn udp_request(
    ns: &NetNs,
    addr: impl Into<SocketAddr>,
    payload: &[u8],
    timeout: Duration,
) -> Result<String> {
    let addr = addr.into();
    let payload = payload.to_vec();
    ns.run(move || -> Result<String> {
        let socket = UdpSocket::bind(if addr.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        })?;
        socket.connect(addr)?;
        socket.set_read_timeout(Some(timeout))?;
        socket.send(&payload).context("sending")?;
        let mut answer = vec![0u8; MAX_DATAGRAM];
        let n = socket.recv(&mut answer).map_err(|error| {
            if is_timeout(&error) {
                anyhow::anyhow!("no answer within {timeout:?}")
            } else {
                anyhow::Error::new(error).context("receiving")
            }
        })?;
        Ok(String::from_utf8_lossy(&answer[..n]).into_owned())
    })?
    .with_context(|| format!("UDP request to {addr} from {}", ns.name()))
}

/// A TCP connection held open (`HOLD`), asking one line at a time. The
/// socket belongs to the client namespace it was opened in, whichever
/// thread uses it later.
#[derive(Debug)]
pub struct HoldConnection {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    peer: SocketAddr,
}

impl HoldConnection {
    /// Connects from inside `ns`; `timeout` also bounds every later `ask`.
    pub fn open(
        ns: &NetNs,
        addr: impl Into<SocketAddr>,
        timeout: Duration,
    ) -> Result<HoldConnection> {
        let addr = addr.into();
        let stream = ns
            .run(move || -> Result<TcpStream> {
                let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
                stream.set_read_timeout(Some(timeout))?;
                stream.set_write_timeout(Some(timeout))?;
                stream.write_all(format!("{HOLD_LINE}\n").as_bytes())?;
                Ok(stream)
            })?
            .with_context(|| format!("opening a held connection to {addr} from {}", ns.name()))?;
        Ok(HoldConnection {
            writer: stream.try_clone()?,
            reader: BufReader::new(stream),
            peer: addr,
        })
    }

    /// Sends a line and returns the answer line (without its newline).
    pub fn ask(&mut self) -> Result<String> {
        self.writer
            .write_all(b"ask\n")
            .with_context(|| format!("held connection to {}: sending", self.peer))?;
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .with_context(|| format!("held connection to {}: reading", self.peer))?;
        if n == 0 {
            bail!("held connection to {}: closed by the server", self.peer);
        }
        Ok(line.trim_end().to_owned())
    }

    /// The client side's address.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.writer.local_addr()?)
    }
}

/// The pod name in an answer (`pod=echo-a client=...`).
pub fn pod_of(reply: &str) -> Option<&str> {
    reply
        .split_whitespace()
        .find_map(|word| word.strip_prefix("pod="))
}

/// The client address the server saw, as written in an answer.
pub fn client_of(reply: &str) -> Option<SocketAddr> {
    reply
        .split_whitespace()
        .find_map(|word| word.strip_prefix("client="))?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_parse_back() {
        let reply = answer("echo-a", "10.244.1.2:40000".parse().unwrap());
        assert_eq!(reply, "pod=echo-a client=10.244.1.2:40000\n");
        assert_eq!(pod_of(&reply), Some("echo-a"));
        assert_eq!(client_of(&reply), Some("10.244.1.2:40000".parse().unwrap()));
        assert_eq!(pod_of("nothing here"), None);
    }

    #[test]
    fn request_completion() {
        assert!(!request_complete(b"GET / HTTP/1.0\r\n"));
        assert!(!request_complete(b"GET / HTTP/1.0\r\nHost: x\r\n"));
        assert!(request_complete(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n"));
        assert!(request_complete(b"hello\n"));
        assert!(!request_complete(b"hel"));
        assert_eq!(strip_hold_line(b"HOLD\nask\n"), Some(&b"ask\n"[..]));
        assert_eq!(strip_hold_line(b"HOLD\r\n"), Some(&b""[..]));
        assert_eq!(strip_hold_line(b"GET / HTTP/1.0\r\n\r\n"), None);
    }
}
