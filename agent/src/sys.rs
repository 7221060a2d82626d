//! The only module with `unsafe`: socket options that neither socket2 nor nix
//! exposes in the form we need. Each call is a plain setsockopt/getsockopt on
//! a live fd with correctly sized buffers.
#![allow(unsafe_code)]

use std::io;
use std::mem::{size_of, MaybeUninit};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// `SO_ORIGINAL_DST` (REDIRECT), IPv4 then IPv6 (`IP6T_SO_ORIGINAL_DST`, same number).
const SO_ORIGINAL_DST: libc::c_int = 80;

/// IPV6_TRANSPARENT: socket2 only sets the IPv4 flavour; a dual-stack
/// listener needs this one to accept IPv6 TPROXY traffic.
pub fn set_ipv6_transparent(fd: BorrowedFd<'_>) -> io::Result<()> {
    let one: libc::c_int = 1;
    // Safety: fd is a valid open socket for the borrow; we pass a pointer to a
    // live c_int and its exact size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_IPV6,
            libc::IPV6_TRANSPARENT,
            &one as *const libc::c_int as *const libc::c_void,
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The pre-NAT destination of a REDIRECTed connection, from conntrack.
pub fn original_dst(fd: BorrowedFd<'_>) -> io::Result<SocketAddr> {
    original_dst_v4(fd).or_else(|_| original_dst_v6(fd))
}

fn original_dst_v4(fd: BorrowedFd<'_>) -> io::Result<SocketAddr> {
    let mut sa = MaybeUninit::<libc::sockaddr_in>::zeroed();
    let mut len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // Safety: fd is valid for the borrow; sa is a zeroed sockaddr_in and len
    // is its size, so the kernel writes at most that many bytes.
    let rc = unsafe {
        libc::getsockopt(fd.as_raw_fd(), libc::SOL_IP, SO_ORIGINAL_DST, sa.as_mut_ptr().cast(), &mut len)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // Safety: zero-initialised and filled by the kernel; every bit pattern is a valid sockaddr_in.
    let sa = unsafe { sa.assume_init() };
    let ip = Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr));
    Ok(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(sa.sin_port))))
}

fn original_dst_v6(fd: BorrowedFd<'_>) -> io::Result<SocketAddr> {
    let mut sa = MaybeUninit::<libc::sockaddr_in6>::zeroed();
    let mut len = size_of::<libc::sockaddr_in6>() as libc::socklen_t;
    // Safety: as above, with a sockaddr_in6 buffer and its size.
    let rc = unsafe {
        libc::getsockopt(fd.as_raw_fd(), libc::SOL_IPV6, SO_ORIGINAL_DST, sa.as_mut_ptr().cast(), &mut len)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // Safety: zero-initialised and filled by the kernel; any bit pattern is valid.
    let sa = unsafe { sa.assume_init() };
    let ip = Ipv6Addr::from(sa.sin6_addr.s6_addr);
    Ok(SocketAddr::V6(SocketAddrV6::new(ip, u16::from_be(sa.sin6_port), 0, 0)))
}

/// Takes ownership of a descriptor the kernel just created for this process
/// (accept4, or SCM_RIGHTS in a hand-off).
pub fn owned_from_kernel(fd: RawFd) -> OwnedFd {
    // Safety: the caller got `fd` from a syscall that creates a new
    // descriptor, so nothing else in this process owns or will close it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Registers a descriptor we own with the tokio reactor.
pub fn register_owned(fd: OwnedFd) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // Safety: an OwnedFd stays open and returns the same raw descriptor for
    // as long as it lives, and the AsyncFd owns it for its whole lifetime.
    unsafe { tokio::io::unix::AsyncFd::register(fd) }.map_err(|e| io::Error::other(e.to_string()))
}

/// SO_RCVLOWAT: wake the reader only once this many bytes are queued.
pub fn set_recv_lowat(fd: BorrowedFd<'_>, bytes: i32) -> io::Result<()> {
    // Safety: fd is valid for the borrow; we pass a live c_int and its size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            &bytes as *const libc::c_int as *const libc::c_void,
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
