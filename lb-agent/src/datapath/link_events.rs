//! Link notifications (`RTM_NEWLINK`/`RTM_DELLINK`) of the agent's network
//! namespace, so a new pod device is attached as it appears rather than at
//! the next once-a-second resync.

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::Instant,
};

use tokio::io::{Interest, unix::AsyncFd};

/// An `AF_NETLINK`/`NETLINK_ROUTE` socket subscribed to `RTMGRP_LINK`.
pub struct LinkEvents {
    socket: AsyncFd<OwnedFd>,
    buffer: Vec<u8>,
}

/// What a batch of notifications said.
#[derive(Clone, Copy, Debug)]
pub struct LinkChange {
    /// When the first of them was read.
    pub at: Instant,
    /// How many `RTM_NEWLINK`/`RTM_DELLINK` messages arrived.
    pub links: usize,
    /// The kernel dropped notifications (the socket's buffer was full):
    /// anything may have changed.
    pub overflowed: bool,
}

impl LinkEvents {
    /// Opens the socket in the calling thread's network namespace (the
    /// agent's). Needs a tokio runtime with I/O enabled.
    pub fn open() -> io::Result<LinkEvents> {
        // SAFETY: socket(2) with constant arguments; the fd is owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh socket nobody else owns.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_nl is plain data; zeroed is a valid value.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        addr.nl_groups = libc::RTMGRP_LINK as u32;
        // SAFETY: bind(2) with a sockaddr_nl of the size given.
        let bound = unsafe {
            libc::bind(
                socket.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if bound != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the OwnedFd is moved in and neither replaced nor closed
        // while the AsyncFd holds it.
        let socket = unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE)? };
        Ok(LinkEvents {
            socket,
            // Notifications are small (~1 KiB); a page-sized batch or more.
            buffer: vec![0; 64 * 1024],
        })
    }

    /// Waits for notifications and reads every one queued; returns once at
    /// least one link message (or an overflow) was seen.
    pub async fn next(&mut self) -> io::Result<LinkChange> {
        loop {
            let mut guard = self.socket.readable().await?;
            let at = Instant::now();
            let mut change = LinkChange {
                at,
                links: 0,
                overflowed: false,
            };
            loop {
                // SAFETY: recv(2) into our buffer, at most its length.
                let n = unsafe {
                    libc::recv(
                        self.socket.get_ref().as_raw_fd(),
                        self.buffer.as_mut_ptr().cast(),
                        self.buffer.len(),
                        libc::MSG_DONTWAIT,
                    )
                };
                if n < 0 {
                    let e = io::Error::last_os_error();
                    match e.raw_os_error() {
                        Some(libc::EAGAIN) => {
                            guard.clear_ready();
                            break;
                        }
                        Some(libc::EINTR) => continue,
                        Some(libc::ENOBUFS) => change.overflowed = true,
                        _ => return Err(e),
                    }
                    continue;
                }
                change.links += count_link_messages(&self.buffer[..n as usize]);
            }
            if change.links > 0 || change.overflowed {
                return Ok(change);
            }
        }
    }
}

/// The `RTM_NEWLINK`/`RTM_DELLINK` messages in one netlink datagram.
fn count_link_messages(datagram: &[u8]) -> usize {
    const HEADER: usize = std::mem::size_of::<libc::nlmsghdr>();
    let mut count = 0;
    let mut rest = datagram;
    while rest.len() >= HEADER {
        let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let kind = u16::from_ne_bytes([rest[4], rest[5]]);
        if len < HEADER || len > rest.len() {
            break;
        }
        if kind == libc::RTM_NEWLINK || kind == libc::RTM_DELLINK {
            count += 1;
        }
        // Messages are 4-byte aligned (NLMSG_ALIGN).
        let advance = (len + 3) & !3;
        rest = rest.get(advance..).unwrap_or_default();
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: u16, payload: usize) -> Vec<u8> {
        let len = 16 + payload;
        let mut out = Vec::new();
        out.extend_from_slice(&(len as u32).to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(&[0; 10]);
        out.extend(std::iter::repeat_n(0xaa, payload));
        out.resize((len + 3) & !3, 0);
        out
    }

    #[test]
    fn counts_only_link_messages_and_stops_at_a_bad_length() {
        let mut datagram = message(libc::RTM_NEWLINK, 17);
        datagram.extend(message(libc::RTM_NEWADDR, 8));
        datagram.extend(message(libc::RTM_DELLINK, 0));
        assert_eq!(count_link_messages(&datagram), 2);
        // A length past the end ends the walk without reading past it.
        let mut truncated = message(libc::RTM_NEWLINK, 4);
        truncated[0] = 200;
        assert_eq!(count_link_messages(&truncated), 0);
        assert_eq!(count_link_messages(&[1, 2, 3]), 0);
    }

    #[test]
    fn a_new_link_in_a_private_namespace_is_reported() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root for a network namespace");
            return;
        }
        // A thread of our own in a namespace of its own, so the veth pair
        // never appears in the machine's namespace.
        let reported = std::thread::spawn(|| {
            // SAFETY: unshare(2) of this thread's network namespace only.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async {
                let mut events = LinkEvents::open().expect("netlink socket");
                let status = std::process::Command::new("ip")
                    .args([
                        "link", "add", "lbtv0", "type", "veth", "peer", "name", "lbtv1",
                    ])
                    .status()
                    .expect("run ip");
                // `ip` runs in the namespace the thread had at fork: ours.
                assert!(status.success(), "ip link add");
                tokio::time::timeout(std::time::Duration::from_secs(5), events.next())
                    .await
                    .expect("a notification within 5 s")
                    .expect("recv")
            })
        })
        .join()
        .expect("namespace thread");
        assert!(reported.links >= 1, "{reported:?}");
    }
}
