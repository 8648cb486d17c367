//! A large receive buffer for UDP listeners: bursts the server itself causes (a NOTIFY to a
//! thousand busy-lamp watchers answered at once, a restart storm of REGISTERs) must not
//! overflow the kernel's default (about 200 KiB, some 150 datagrams at loopback truesize) and
//! be dropped, to come back as retransmissions half a second later.

use crate::udp_socket::UdpSock;

/// What we ask for; the kernel caps it at `net.core.rmem_max`.
pub(crate) const UDP_RECEIVE_BUFFER: usize = 4 << 20;

/// Sets the socket-level buffer size `option` (`SO_RCVBUF`, `SO_SNDBUF`) of `sock` to
/// `bytes`; the kernel caps and doubles what it grants.
#[cfg(target_os = "linux")]
pub(crate) fn set_buffer(
    sock: &impl std::os::fd::AsRawFd,
    option: libc::c_int,
    bytes: libc::c_int,
) -> std::io::Result<()> {
    // SAFETY: the fd is an open socket owned by `sock`; the option value points to a c_int
    // that outlives the call and its exact size is passed.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&bytes as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Sets the receive buffer of `sock` to [`UDP_RECEIVE_BUFFER`], logging what it got.
#[cfg(target_os = "linux")]
pub(crate) fn enlarge(sock: &UdpSock) {
    use std::os::fd::AsRawFd;
    if let Err(error) = set_buffer(sock, libc::SO_RCVBUF, UDP_RECEIVE_BUFFER as libc::c_int) {
        tracing::debug!(%error, "SO_RCVBUF not set");
        return;
    }
    let mut got: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: as above; `got` and `len` are valid for writes of their sizes.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&mut got as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    // Linux reports twice what was granted (its bookkeeping overhead).
    if rc == 0 && (got as usize) < UDP_RECEIVE_BUFFER {
        tracing::info!(
            granted = got / 2,
            asked = UDP_RECEIVE_BUFFER,
            "UDP receive buffer capped by net.core.rmem_max; raise it (sysctl) for sites with many phones"
        );
    }
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn enlarge(_sock: &UdpSock) {}
