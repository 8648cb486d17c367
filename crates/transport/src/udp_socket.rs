//! A UDP listener's socket, registered with the reactor for reading only.
//!
//! `tokio::net::UdpSocket` registers for reading and writing. For UDP the kernel reports
//! "writable" again each time a datagram we sent leaves the send buffer (on loopback: when its
//! receiver reads it; on a network: when the NIC has sent it), so the reactor was handed one
//! more event per datagram sent, for which nobody waited (during calls 8.8 `epoll_wait` calls
//! per call instead of 6.2; a server parked by then is woken by it) (issue 22). Sends never
//! wait here (a full buffer is rare and its datagrams queue, see `udp::Backlog`); only the
//! backlog's drain asks for writability, through a registration of its own that exists while
//! it waits.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};

use tokio::io::Interest;
use tokio::io::unix::{AsyncFd, AsyncFdReadyGuard};

/// A bound, non-blocking UDP socket whose readiness for reading (and errors) wakes its
/// receive loop.
#[derive(Debug)]
pub(crate) struct UdpSock {
    fd: AsyncFd<std::net::UdpSocket>,
}

impl UdpSock {
    /// Binds `addr`; must be called within a tokio runtime.
    pub(crate) fn bind(addr: SocketAddr) -> io::Result<Self> {
        Self::from_std(std::net::UdpSocket::bind(addr)?)
    }

    /// Takes over a bound socket; must be called within a tokio runtime.
    fn from_std(sock: std::net::UdpSocket) -> io::Result<Self> {
        sock.set_nonblocking(true)?;
        // Errors (EPOLLERR: an ICMP error queued by IP_RECVERR) are reported whatever the
        // registration asks for.
        Ok(Self {
            fd: register(sock, Interest::READABLE)?,
        })
    }

    pub(crate) fn local_addr(&self) -> io::Result<SocketAddr> {
        self.fd.get_ref().local_addr()
    }

    /// Sends now or fails (`WouldBlock` when the send buffer is full); never waits.
    pub(crate) fn try_send_to(&self, buf: &[u8], dest: SocketAddr) -> io::Result<usize> {
        self.fd.get_ref().send_to(buf, dest)
    }

    /// Receives one datagram now or fails (`WouldBlock` when none is waiting); where
    /// `recvmmsg` is missing (see `mmsg.rs`).
    #[cfg(not(target_os = "linux"))]
    pub(crate) fn try_recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        self.fd.get_ref().recv_from(buf)
    }

    /// Waits until the socket is readable or has an error queued; the guard says which, and
    /// its `try_io` clears that readiness when the operation would block.
    pub(crate) async fn ready_to_receive(
        &self,
    ) -> io::Result<AsyncFdReadyGuard<'_, std::net::UdpSocket>> {
        self.fd.ready(Interest::READABLE | Interest::ERROR).await
    }

    /// Sends `buf`, waiting for room in the send buffer if it is full. The wait registers a
    /// duplicate of the socket for writability, dropped when the send is done, so that the
    /// listener's own registration never wakes for it.
    pub(crate) async fn send_to(&self, buf: &[u8], dest: SocketAddr) -> io::Result<usize> {
        match self.try_send_to(buf, dest) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            r => return r,
        }
        let dup = register(self.fd.get_ref().try_clone()?, Interest::WRITABLE)?;
        loop {
            let mut guard = dup.writable().await?;
            match guard.try_io(|s| s.get_ref().send_to(buf, dest)) {
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }
}

/// Registers `sock` with the current runtime's reactor for `interest`.
fn register(
    sock: std::net::UdpSocket,
    interest: Interest,
) -> io::Result<AsyncFd<std::net::UdpSocket>> {
    // SAFETY: a `std::net::UdpSocket` owns its open descriptor until it is dropped, and the
    // `AsyncFd` owns the socket (its `as_raw_fd` always returns that descriptor).
    Ok(unsafe { AsyncFd::register_with_interest(sock, interest) }?)
}

impl AsRawFd for UdpSock {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
#[cfg(target_os = "linux")]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    /// Times the calling thread has slept and been woken.
    fn wakeups_of_this_thread() -> u64 {
        let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap()
    }

    #[test]
    fn datagrams_leaving_the_send_buffer_do_not_wake_the_parked_reactor() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let sock = Arc::new(UdpSock::bind("127.0.0.1:0".parse().unwrap()).unwrap());
            let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let to = peer.local_addr().unwrap();
            let before = wakeups_of_this_thread();
            // While this thread is parked in the reactor, 50 datagrams are sent from our
            // socket and read by their receiver, each freeing our send buffer again.
            let sender = {
                let sock = sock.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16];
                    for _ in 0..50 {
                        std::thread::sleep(Duration::from_millis(3));
                        sock.try_send_to(b"hello", to).unwrap();
                        peer.recv_from(&mut buf).unwrap();
                    }
                })
            };
            tokio::time::sleep(Duration::from_millis(400)).await;
            let woken = wakeups_of_this_thread() - before;
            sender.join().unwrap();
            // The sleep's own timer and little else; a registration for writing woke the
            // thread once per datagram (~50).
            assert!(woken < 20, "reactor woken {woken} times by our own sends");
        });
    }

    #[tokio::test]
    async fn a_datagram_that_comes_in_makes_the_socket_ready_to_receive() {
        let sock = UdpSock::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let quiet = tokio::time::timeout(Duration::from_millis(50), sock.ready_to_receive()).await;
        assert!(quiet.is_err(), "ready with nothing to receive");
        peer.send_to(b"in", sock.local_addr().unwrap()).unwrap();
        let guard = tokio::time::timeout(Duration::from_secs(2), sock.ready_to_receive())
            .await
            .expect("a datagram must wake the receiver")
            .unwrap();
        assert!(guard.ready().is_readable());
    }

    /// The wait for room in a full send buffer (a burst bigger than a NIC drains; loopback
    /// never fills one, it frees each datagram as it sends it). In a network namespace of the
    /// test's own, a `tbf` qdisc at 1 kbit/s on a veth holds the datagrams, and with them the
    /// sender's buffer, until the qdisc is deleted. Needs root and iproute2.
    #[cfg(feature = "system-tests")]
    #[test]
    fn a_send_into_a_full_buffer_waits_for_room_and_goes_when_there_is_some() {
        use std::os::fd::AsRawFd as _;
        use std::process::Command;

        let ns = format!("cfudp{}", std::process::id() % 100_000);
        let run = |prog: &str, args: &[&str]| {
            let out = Command::new(prog)
                .args(args)
                .output()
                .unwrap_or_else(|e| panic!("{prog} (iproute2): {e}"));
            assert!(
                out.status.success(),
                "{prog} {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        struct Namespace(String);
        impl Drop for Namespace {
            fn drop(&mut self) {
                let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
            }
        }
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        run("ip", &["netns", "add", &ns]);
        let _gone = Namespace(ns.clone());
        let ip = |args: &[&str]| run("ip", &[&["-n", ns.as_str()][..], args].concat());
        ip(&[
            "link", "add", "veth0", "type", "veth", "peer", "name", "veth1",
        ]);
        ip(&["addr", "add", "10.99.0.1/24", "dev", "veth0"]);
        ip(&["link", "set", "veth0", "up"]);
        ip(&["link", "set", "veth1", "up"]);
        // A neighbour that needs no ARP: its datagrams go straight to the qdisc.
        ip(&[
            "neigh",
            "add",
            "10.99.0.3",
            "lladdr",
            "02:00:00:00:00:03",
            "dev",
            "veth0",
        ]);
        let tc = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &ns, "tc", "qdisc"];
            all.extend_from_slice(args);
            run("ip", &all);
        };
        tc(&[
            "add", "dev", "veth0", "root", "tbf", "rate", "1kbit", "burst", "1600", "limit",
            "100000",
        ]);

        // The socket is made inside the namespace (a thread may enter one; the socket stays
        // in it wherever it is used).
        let netns = std::fs::File::open(format!("/var/run/netns/{ns}")).unwrap();
        let std_sock = std::thread::spawn(move || {
            // SAFETY: `setns` on a descriptor this thread owns; it moves only this thread.
            assert_eq!(
                unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) },
                0
            );
            let sock = std::net::UdpSocket::bind("10.99.0.1:0").unwrap();
            // The smallest buffer the kernel grants: a few datagrams fill it.
            crate::sockbuf::set_buffer(&sock, libc::SO_SNDBUF, 1).unwrap();
            sock
        })
        .join()
        .unwrap();

        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let sock = UdpSock::from_std(std_sock).unwrap();
            let dest: SocketAddr = "10.99.0.3:5060".parse().unwrap();
            let datagram = [0u8; 500];
            let mut fitted = 0;
            loop {
                match sock.try_send_to(&datagram, dest) {
                    Ok(_) => fitted += 1,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("send failed: {e}"),
                }
                assert!(fitted < 1000, "the send buffer never filled");
            }
            let send = sock.send_to(&datagram, dest);
            tokio::pin!(send);
            let early = tokio::time::timeout(Duration::from_millis(300), &mut send).await;
            assert!(
                early.is_err(),
                "a send into a full buffer ({fitted} datagrams) must wait, got {early:?}"
            );
            tc(&["del", "dev", "veth0", "root"]);
            let sent = tokio::time::timeout(Duration::from_secs(5), send)
                .await
                .expect("the waiting send goes once the buffer has room")
                .unwrap();
            assert_eq!(sent, datagram.len());
        });
    }
}
