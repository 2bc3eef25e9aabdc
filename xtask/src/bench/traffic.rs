//! The benchmark's server and closed-loop clients.
//!
//! One server per server pod, several threads sharing one listener; what a
//! connection gets depends on its first bytes:
//! - anything else (an HTTP request): a short HTTP/1.0 answer, then the
//!   server closes (so TIME_WAIT lands on the server, not on the client's
//!   ephemeral ports);
//! - `RR\n`: every further 64-byte message is echoed (request/response);
//! - `BULK\n`: everything is read until EOF, then the byte count is sent back.
//!
//! Every loop is bounded by a deadline and every socket operation by a
//! timeout.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use xtask::NetNs;

/// The request a new connection sends.
const REQUEST: &[u8] = b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n";
const RESPONSE: &[u8] = b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nok\n";
/// Size of one request/response message.
pub const RR_MESSAGE: usize = 64;
const BULK_CHUNK: usize = 64 * 1024;
/// Timeout of any single socket operation.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// How often idle server threads look at the stop flag.
const ACCEPT_POLL: Duration = Duration::from_millis(100);

/// A server inside a pod namespace; stops (threads joined) on drop.
pub struct BenchServer {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl BenchServer {
    pub fn start(ns: &NetNs, port: u16, threads: usize) -> Result<BenchServer> {
        let listener = ns
            .run(move || TcpListener::bind(("0.0.0.0", port)))?
            .with_context(|| format!("binding port {port} in {}", ns.name()))?;
        set_accept_timeout(&listener, ACCEPT_POLL)?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut handles = Vec::new();
        for _ in 0..threads {
            let listener = listener.try_clone()?;
            let stop = stop.clone();
            handles.push(
                std::thread::Builder::new()
                    .name("bench-server".into())
                    .spawn(move || serve(listener, stop))?,
            );
        }
        Ok(BenchServer {
            stop,
            threads: handles,
        })
    }
}

impl Drop for BenchServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for handle in self.threads.drain(..) {
            let _ = handle.join();
        }
    }
}

/// SO_RCVTIMEO on a listener bounds `accept` (Linux), so threads see `stop`.
fn set_accept_timeout(listener: &TcpListener, timeout: Duration) -> Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: setsockopt on a valid socket with a correctly sized timeval.
    let ret = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if ret != 0 {
        bail!("SO_RCVTIMEO: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

fn serve(listener: TcpListener, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                let _ = serve_connection(stream, &stop);
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

fn serve_connection(mut stream: TcpStream, stop: &AtomicBool) -> std::io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    stream.set_nodelay(true)?;
    let mut buf = vec![0u8; BULK_CHUNK];
    let mut head = Vec::new();
    let complete = |head: &[u8]| {
        head.starts_with(b"RR\n")
            || head.starts_with(b"BULK\n")
            || head.windows(4).any(|w| w == b"\r\n\r\n")
    };
    // Read the header: the mode line, or a whole HTTP request header.
    while !complete(&head) {
        let n = stream.read(&mut buf[..64])?;
        if n == 0 || head.len() > 4096 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    if head.starts_with(b"RR\n") {
        // Bytes read past the mode line begin the first message.
        let mut message = [0u8; RR_MESSAGE];
        let mut have = head.len() - 3;
        message[..have].copy_from_slice(&head[3..]);
        while !stop.load(Ordering::Relaxed) {
            while have < RR_MESSAGE {
                let n = stream.read(&mut message[have..])?;
                if n == 0 {
                    return Ok(());
                }
                have += n;
            }
            stream.write_all(&message)?;
            have = 0;
        }
        Ok(())
    } else if head.starts_with(b"BULK\n") {
        let mut total = (head.len() - 5) as u64;
        loop {
            let n = stream.read(&mut buf)?;
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        stream.write_all(format!("{total}\n").as_bytes())
    } else {
        stream.write_all(RESPONSE)
        // Dropping the stream closes it: the server closes first.
    }
}

fn read_full(stream: &mut TcpStream, buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let n = stream.read(&mut buf[done..])?;
        if n == 0 {
            return Err(ErrorKind::UnexpectedEof.into());
        }
        done += n;
    }
    Ok(())
}

/// What a closed-loop connection run measured.
#[derive(Clone, Debug, Default)]
pub struct ConnStats {
    pub completed: u64,
    pub failed: u64,
    pub elapsed: Duration,
    /// Per-connection latencies, microseconds, sorted.
    pub latencies_us: Vec<u32>,
}

impl ConnStats {
    pub fn rate(&self) -> f64 {
        self.completed as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn quantile_us(&self, q: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return f64::NAN;
        }
        let index = ((self.latencies_us.len() - 1) as f64 * q).round() as usize;
        f64::from(self.latencies_us[index])
    }

    pub fn summary(&self) -> ConnSummary {
        ConnSummary {
            completed: self.completed,
            failed: self.failed,
            rate: self.rate(),
            p50_us: self.quantile_us(0.5),
            p99_us: self.quantile_us(0.99),
        }
    }
}

/// What is reported of a connection run, in the one line a client process
/// prints (`CONNS completed=.. failed=.. rate=.. p50_us=.. p99_us=..`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ConnSummary {
    pub completed: u64,
    pub failed: u64,
    pub rate: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

impl ConnSummary {
    const MARKER: &str = "CONNS ";

    pub fn line(&self) -> String {
        format!(
            "{}completed={} failed={} rate={:.3} p50_us={:.1} p99_us={:.1}",
            Self::MARKER,
            self.completed,
            self.failed,
            self.rate,
            self.p50_us,
            self.p99_us
        )
    }

    /// `label: N/s p50 N us p99 N us, N failed`, for progress output.
    pub fn show(&self, label: &str) -> String {
        format!(
            "{label}: {:.0}/s p50 {:.0} us p99 {:.0} us, {} failed",
            self.rate, self.p50_us, self.p99_us, self.failed
        )
    }

    /// The summary in `text` (a client's whole output), if there is one.
    pub fn find(text: &str) -> Option<ConnSummary> {
        let line = text.lines().find_map(|l| l.strip_prefix(Self::MARKER))?;
        let field = |key: &str| {
            line.split_whitespace()
                .find_map(|part| part.strip_prefix(key)?.strip_prefix('='))
        };
        Some(ConnSummary {
            completed: field("completed")?.parse().ok()?,
            failed: field("failed")?.parse().ok()?,
            rate: field("rate")?.parse().ok()?,
            p50_us: field("p50_us")?.parse().ok()?,
            p99_us: field("p99_us")?.parse().ok()?,
        })
    }
}

/// One connection: connect, request, read the answer to EOF, close.
fn one_connection(addr: SocketAddrV4) -> std::io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&addr.into(), IO_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    stream.set_nodelay(true)?;
    stream.write_all(REQUEST)?;
    let mut answer = Vec::with_capacity(64);
    stream.read_to_end(&mut answer)?;
    if !answer.starts_with(b"HTTP/1.0 200") {
        return Err(ErrorKind::InvalidData.into());
    }
    Ok(())
}

/// `threads` closed-loop clients inside `ns` (`None`: this process's own
/// namespace), each opening connection after connection to `addr` until
/// `duration` is over.
pub fn connection_rate(
    ns: Option<&NetNs>,
    addr: SocketAddrV4,
    threads: usize,
    duration: Duration,
) -> Result<ConnStats> {
    let started = Instant::now();
    let deadline = started + duration;
    let mut handles = Vec::new();
    for _ in 0..threads {
        let client = move || {
            let mut stats = ConnStats::default();
            while Instant::now() < deadline {
                let begun = Instant::now();
                match one_connection(addr) {
                    Ok(()) => {
                        stats.completed += 1;
                        let us = begun.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
                        stats.latencies_us.push(us);
                    }
                    Err(_) => stats.failed += 1,
                }
            }
            stats
        };
        handles.push(match ns {
            Some(ns) => ns.spawn_thread("bench-client", client)?,
            None => std::thread::Builder::new()
                .name("bench-client".into())
                .spawn(client)?,
        });
    }
    let mut total = ConnStats::default();
    for handle in handles {
        let stats = handle
            .join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))?;
        total.completed += stats.completed;
        total.failed += stats.failed;
        total.latencies_us.extend(stats.latencies_us);
    }
    total.elapsed = started.elapsed();
    total.latencies_us.sort_unstable();
    Ok(total)
}

/// Request/response round trips per second over one connection.
pub fn request_response_rate(ns: &NetNs, addr: SocketAddrV4, duration: Duration) -> Result<f64> {
    ns.run(move || -> Result<f64> {
        let mut stream = TcpStream::connect_timeout(&addr.into(), IO_TIMEOUT)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        stream.set_nodelay(true)?;
        stream.write_all(b"RR\n")?;
        let mut message = [7u8; RR_MESSAGE];
        let started = Instant::now();
        let deadline = started + duration;
        let mut round_trips = 0u64;
        while Instant::now() < deadline {
            stream.write_all(&message)?;
            read_full(&mut stream, &mut message)?;
            round_trips += 1;
        }
        let elapsed = started.elapsed();
        let _ = stream.shutdown(Shutdown::Both);
        Ok(round_trips as f64 / elapsed.as_secs_f64())
    })?
    .with_context(|| format!("request/response to {addr}"))
}

/// Bulk throughput in bits per second over one connection: the client
/// sends for `duration`, the server counts what arrived.
pub fn bulk_throughput(ns: &NetNs, addr: SocketAddrV4, duration: Duration) -> Result<f64> {
    ns.run(move || -> Result<f64> {
        let mut stream = TcpStream::connect_timeout(&addr.into(), IO_TIMEOUT)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        stream.write_all(b"BULK\n")?;
        let chunk = vec![0x5au8; BULK_CHUNK];
        let started = Instant::now();
        let deadline = started + duration;
        while Instant::now() < deadline {
            stream.write_all(&chunk)?;
        }
        stream.shutdown(Shutdown::Write)?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        let elapsed = started.elapsed();
        let bytes: u64 = answer
            .trim()
            .parse()
            .with_context(|| format!("bulk answer {answer:?}"))?;
        Ok(bytes as f64 * 8.0 / elapsed.as_secs_f64())
    })?
    .with_context(|| format!("bulk transfer to {addr}"))
}

/// Waits until one connection to `addr` from `ns` succeeds.
pub fn wait_until_answering(ns: &NetNs, addr: SocketAddrV4, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let ok = ns.run(move || one_connection(addr).is_ok())?;
        if ok {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "{addr} did not answer from {} within {timeout:?}",
                ns.name()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_summary_line_parses_back() {
        let summary = ConnSummary {
            completed: 41,
            failed: 2,
            rate: 20.5,
            p50_us: 81.0,
            p99_us: 300.5,
        };
        let output = format!("noise\n{}\n", summary.line());
        assert_eq!(ConnSummary::find(&output), Some(summary));
        assert_eq!(ConnSummary::find("CONNS completed=x"), None);
    }
}
