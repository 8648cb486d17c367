//! ICMP errors for UDP (Linux `IP_RECVERR`): without it an unconnected UDP socket never hears
//! that a stale binding's port is closed, and a call to it waits for Timer B (32 s).

use std::net::SocketAddr;

use crate::udp_socket::UdpSock;

/// Asks the kernel to queue ICMP errors on the socket's error queue.
#[cfg(target_os = "linux")]
pub(crate) fn enable(sock: &UdpSock) {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    let (level, name) = match sock.local_addr() {
        Ok(SocketAddr::V6(_)) => (libc::IPPROTO_IPV6, libc::IPV6_RECVERR),
        _ => (libc::IPPROTO_IP, libc::IP_RECVERR),
    };
    // SAFETY: the fd is an open socket owned by `sock`; the option value points to a c_int
    // that outlives the call and its exact size is passed.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&one as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "IP_RECVERR not available");
    }
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn enable(_sock: &UdpSock) {}

/// Destinations of datagrams the network refused, read from the error queue (non-blocking).
#[cfg(target_os = "linux")]
pub(crate) fn drain(sock: &UdpSock) -> Vec<SocketAddr> {
    use std::os::fd::AsRawFd;
    let mut out = Vec::new();
    for _ in 0..64 {
        let mut buf = [0u8; 256];
        // SAFETY: sockaddr_storage is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: the buffer and address pointers are valid for the lengths given and live
        // across the call; MSG_DONTWAIT keeps it from blocking.
        let n = unsafe {
            libc::recvfrom(
                sock.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT,
                (&mut addr as *mut libc::sockaddr_storage).cast(),
                &mut len,
            )
        };
        if n < 0 {
            break;
        }
        // For the error queue the address is where the refused datagram was going.
        if let Some(dest) = socket_addr(&addr) {
            out.push(dest);
        }
    }
    out
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn drain(_sock: &UdpSock) -> Vec<SocketAddr> {
    Vec::new()
}

/// The IPv4 or IPv6 address a kernel wrote into `addr`.
#[cfg(target_os = "linux")]
pub(crate) fn socket_addr(addr: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match libc::c_int::from(addr.ss_family) {
        libc::AF_INET => {
            // SAFETY: ss_family says the storage holds a sockaddr_in.
            let sin: libc::sockaddr_in =
                unsafe { std::ptr::read((addr as *const libc::sockaddr_storage).cast()) };
            let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            Some(SocketAddr::from((ip, u16::from_be(sin.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: ss_family says the storage holds a sockaddr_in6.
            let sin6: libc::sockaddr_in6 =
                unsafe { std::ptr::read((addr as *const libc::sockaddr_storage).cast()) };
            let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(SocketAddr::from((ip, u16::from_be(sin6.sin6_port))))
        }
        _ => None,
    }
}
