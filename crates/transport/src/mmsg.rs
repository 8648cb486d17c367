//! Receiving several UDP datagrams in one system call (Linux `recvmmsg`): under load several
//! are waiting each time the socket becomes readable, and one call per datagram is the
//! largest fixed cost of a small message. Elsewhere, one `recv_from` at a time.

use std::io;
use std::net::SocketAddr;

use crate::udp_socket::UdpSock;

/// Datagrams taken per call; each slot holds a whole datagram of the largest size accepted,
/// so this bounds the memory a listener keeps (8 x 64 KiB by default).
#[cfg(target_os = "linux")]
pub(crate) const BATCH: usize = 8;
#[cfg(not(target_os = "linux"))]
pub(crate) const BATCH: usize = 1;

/// Reused receive buffers for one socket.
pub(crate) struct Batch {
    slots: Vec<Vec<u8>>,
    got: Vec<(usize, SocketAddr)>,
}

impl Batch {
    /// Buffers for datagrams of up to `slot` bytes.
    pub(crate) fn new(slot: usize) -> Self {
        Self {
            slots: (0..BATCH).map(|_| vec![0u8; slot]).collect(),
            got: Vec::with_capacity(BATCH),
        }
    }

    /// The datagrams of the last [`Self::recv`]: bytes (cut to the slot size) and source.
    pub(crate) fn datagrams(&self) -> impl Iterator<Item = (&[u8], SocketAddr)> {
        self.got
            .iter()
            .zip(&self.slots)
            .map(|(&(n, src), buf)| (&buf[..n.min(buf.len())], src))
    }

    /// Takes the datagrams waiting on `sock` (at least one; waits for the first); the number
    /// received.
    pub(crate) async fn recv(&mut self, sock: &UdpSock) -> io::Result<usize> {
        // Errors too: an ICMP error for an earlier send (IP_RECVERR) makes the socket report
        // only an error, and the receive must end with it (as `recv_from` does).
        loop {
            let mut guard = sock.ready_to_receive().await?;
            let readable = guard.ready().is_readable();
            let mut drained = 0;
            let r = guard.try_io(|_| {
                let n = self.recv_now(sock)?;
                if readable && n > 0 && n < BATCH {
                    // A batch that did not fill took all that was waiting: say WouldBlock so
                    // that tokio clears the readiness now (the next datagram's arrival sets it
                    // again) rather than after one more call that finds nothing.
                    drained = n;
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Ok(n)
            });
            match r {
                Ok(r) => return r,
                // The WouldBlock said after a partial batch: its datagrams are taken.
                Err(_would_block) if drained > 0 => return Ok(drained),
                // It would block with nothing taken: the readiness is cleared; wait again.
                Err(_would_block) => continue,
            }
        }
    }

    #[cfg(target_os = "linux")]
    fn recv_now(&mut self, sock: &UdpSock) -> io::Result<usize> {
        use std::os::fd::AsRawFd;
        // SAFETY (for the zeroed values): iovec, sockaddr_storage and mmsghdr are plain data
        // for which all-zero is valid.
        let mut addrs: [libc::sockaddr_storage; BATCH] = unsafe { std::mem::zeroed() };
        let mut iovs: [libc::iovec; BATCH] = unsafe { std::mem::zeroed() };
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        for i in 0..BATCH {
            iovs[i].iov_base = self.slots[i].as_mut_ptr().cast();
            iovs[i].iov_len = self.slots[i].len();
            msgs[i].msg_hdr.msg_name = (&mut addrs[i] as *mut libc::sockaddr_storage).cast();
            msgs[i].msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            msgs[i].msg_hdr.msg_iov = &mut iovs[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: every header points at a live iovec over a live slot of the length given
        // and at a live sockaddr_storage of the size given; all outlive the call, which does
        // not block (MSG_DONTWAIT) and writes at most BATCH headers.
        let n = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                msgs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        self.got.clear();
        for (m, addr) in msgs.iter().zip(&addrs).take(n as usize) {
            // A source we cannot read (not IPv4 or IPv6) cannot be answered: skipped.
            if let Some(src) = crate::icmp::socket_addr(addr) {
                self.got.push((m.msg_len as usize, src));
            }
        }
        Ok(n as usize)
    }

    #[cfg(not(target_os = "linux"))]
    fn recv_now(&mut self, sock: &UdpSock) -> io::Result<usize> {
        let (n, src) = sock.try_recv_from(&mut self.slots[0])?;
        self.got.clear();
        self.got.push((n, src));
        Ok(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bind() -> UdpSock {
        UdpSock::bind("127.0.0.1:0".parse().unwrap()).unwrap()
    }

    #[tokio::test]
    async fn waiting_datagrams_come_in_one_batch_with_their_sources_and_sizes() {
        let rx = bind();
        let to = rx.local_addr().unwrap();
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        a.send_to(b"first", to).unwrap();
        b.send_to(b"second", to).unwrap();
        a.send_to(&[7u8; 100], to).unwrap();
        // Give the kernel time to queue all three.
        std::thread::sleep(std::time::Duration::from_millis(50));
        let mut batch = Batch::new(64);
        let mut got: Vec<(Vec<u8>, SocketAddr)> = Vec::new();
        let first = batch.recv(&rx).await.unwrap();
        // All three were waiting: one call takes them (one at a time without recvmmsg).
        assert_eq!(first, BATCH.min(3));
        got.extend(batch.datagrams().map(|(d, s)| (d.to_vec(), s)));
        while got.len() < 3 {
            batch.recv(&rx).await.unwrap();
            got.extend(batch.datagrams().map(|(d, s)| (d.to_vec(), s)));
        }
        assert_eq!(got[0], (b"first".to_vec(), a.local_addr().unwrap()));
        assert_eq!(got[1], (b"second".to_vec(), b.local_addr().unwrap()));
        // Larger than a slot: cut to it (the caller sees a full slot and calls it oversize).
        assert_eq!(got[2].0, vec![7u8; 64]);
    }

    #[tokio::test]
    async fn after_a_batch_that_took_everything_the_next_datagram_still_wakes_the_receiver() {
        let rx = bind();
        let to = rx.local_addr().unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut batch = Batch::new(64);
        for round in 0..50u8 {
            // One, or several at once, then nothing: each partial batch clears the readiness.
            // Every other round they are sent while the receiver is already parked.
            let send = {
                let tx = tx.try_clone().unwrap();
                move || {
                    for k in 0..=(round % 3) {
                        tx.send_to(&[round, k], to).unwrap();
                    }
                }
            };
            if round % 2 == 0 {
                send();
            } else {
                std::thread::spawn(move || {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                    send();
                });
            }
            let mut got = 0;
            while got < usize::from(round % 3) + 1 {
                let n = tokio::time::timeout(std::time::Duration::from_secs(2), batch.recv(&rx))
                    .await
                    .unwrap_or_else(|_| {
                        panic!("round {round}: a datagram did not wake the receiver")
                    })
                    .unwrap();
                assert!(batch.datagrams().all(|(d, _)| d[0] == round));
                got += n;
            }
            assert_eq!(got, usize::from(round % 3) + 1);
        }
    }
}

#[cfg(test)]
#[cfg(target_os = "linux")]
mod icmp_tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    async fn dead_port() -> SocketAddr {
        let closed = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        closed.local_addr().unwrap()
    }

    #[tokio::test]
    async fn an_icmp_error_for_a_send_wakes_a_parked_receive_with_an_error() {
        let sock = Arc::new(UdpSock::bind("127.0.0.1:0".parse().unwrap()).unwrap());
        crate::icmp::enable(&sock);
        let dead = dead_port().await;
        let rx = sock.clone();
        let waiting = tokio::spawn(async move {
            let mut b = Batch::new(64);
            b.recv(&rx).await.map_err(|e| e.kind())
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        sock.send_to(b"x", dead).await.unwrap();
        let r = tokio::time::timeout(Duration::from_secs(2), waiting).await;
        assert!(matches!(r, Ok(Ok(Err(_)))), "{r:?}");
    }
}
