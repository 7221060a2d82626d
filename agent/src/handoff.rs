//! Hitless upgrade. A new agent connects to the running one's hand-off
//! socket and receives the *listening* socket itself (SCM_RIGHTS), so there
//! is never a moment without a listener (TPROXY drops SYNs when there is
//! none) and no accept backlog is lost. The old agent then pauses each live
//! connection at a read boundary and passes both of its sockets, with any
//! partly read header bytes, so the new agent resumes relaying mid-stream.
//! A connection's Pull→Pop state (receipts, sessions) and the learned routes
//! travel too. A message larger than one datagram goes as `Chunk`s followed by
//! `Assembled`, which carries its descriptors.
//!
//! SOCK_SEQPACKET keeps each message and its fds together.
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use nix::sys::socket::{
    accept4, bind, connect, listen, recvmsg, sendmsg, socket, AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag,
    SockType, UnixAddr,
};
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::relay::Moved;
use crate::sys;

/// Largest datagram read. A seqpacket datagram must also fit the socket's send
/// buffer (about 208 KiB by default): bigger messages are chunked.
const MAX_DATAGRAM: usize = 256 * 1024;
/// Messages whose JSON is longer than this go in `Chunk`s (escaped, a chunk at
/// most doubles, so it still fits one datagram).
const CHUNK: usize = 64 * 1024;
/// Largest message reassembled from chunks.
pub const MAX_MSG: usize = 256 * 1024 * 1024;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Msg {
    /// New → old: hand me your listener.
    Takeover { pid: u32 },
    /// Old → new, with the listening socket attached.
    Listener { generation: u64, listen: String },
    /// New → old: I am accepting; stop and send your connections. `adopts_state`: send
    /// converted connections too, with their state (agents before it lacked the field).
    Ready {
        pid: u32,
        #[serde(default)]
        adopts_state: bool,
    },
    /// Old → new, with the pod-side and broker-side sockets attached. `state`: the
    /// Pull→Pop and ack-routing state of the connection (JSON), for a successor that adopts it.
    Conn {
        pod: std::net::SocketAddr,
        dst: std::net::SocketAddr,
        #[serde(flatten)]
        moved: Box<Moved>,
    },
    /// Old → new: the state every connection shares (learned routes, ack routes; JSON).
    Shared { state: String },
    /// Framing: a piece of a large message's JSON.
    Chunk { data: String },
    /// Framing: the chunks before it form one message; its descriptors come with this one.
    Assembled,
    /// Old → new: nothing more is coming.
    Done,
}

fn seqpacket() -> io::Result<OwnedFd> {
    Ok(socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC, None)?)
}

/// The running agent's end: waits for a successor.
pub struct HandoffListener {
    fd: AsyncFd<OwnedFd>,
}

impl HandoffListener {
    /// Binds at `path`, atomically replacing whatever is there, so the newest
    /// agent is always the one a successor finds. Root only.
    pub fn bind(path: &Path) -> io::Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp: PathBuf = path.with_extension(format!("tmp{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let fd = seqpacket()?;
        bind(fd.as_raw_fd(), &UnixAddr::new(&tmp)?)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        listen(&fd, Backlog::new(4).map_err(io::Error::from)?)?;
        std::fs::rename(&tmp, path)?;
        Ok(HandoffListener { fd: sys::register_owned(fd)? })
    }

    pub async fn accept(&self) -> io::Result<Peer> {
        let fd = self
            .fd
            .async_io(Interest::READABLE, |fd| Ok(accept4(fd.as_raw_fd(), SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC)?))
            .await?;
        let fd = sys::owned_from_kernel(fd);
        Ok(Peer { fd: sys::register_owned(fd)? })
    }
}

/// Connects to a running agent; `None` when there is none (no socket file, or nobody listening).
pub fn connect_predecessor(path: &Path) -> io::Result<Option<Peer>> {
    let fd = seqpacket()?;
    match connect(fd.as_raw_fd(), &UnixAddr::new(path)?) {
        Ok(()) => {}
        Err(nix::errno::Errno::ENOENT | nix::errno::Errno::ECONNREFUSED) => return Ok(None),
        Err(nix::errno::Errno::EINPROGRESS | nix::errno::Errno::EAGAIN) => {}
        Err(e) => return Err(e.into()),
    }
    Ok(Some(Peer { fd: sys::register_owned(fd)? }))
}

/// A connected hand-off channel.
pub struct Peer {
    fd: AsyncFd<OwnedFd>,
}

impl Peer {
    pub async fn send(&self, msg: &Msg, fds: &[RawFd]) -> io::Result<()> {
        let text = serde_json::to_string(msg)?;
        if text.len() > MAX_MSG {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "hand-off message too large"));
        }
        if text.len() <= CHUNK {
            return self.send_datagram(text.as_bytes(), fds).await;
        }
        let mut rest = text.as_str();
        while !rest.is_empty() {
            let mut end = rest.len().min(CHUNK);
            while !rest.is_char_boundary(end) {
                end -= 1;
            }
            let (part, tail) = rest.split_at(end);
            self.send_datagram(&serde_json::to_vec(&Msg::Chunk { data: part.to_owned() })?, &[]).await?;
            rest = tail;
        }
        self.send_datagram(&serde_json::to_vec(&Msg::Assembled)?, fds).await
    }

    async fn send_datagram(&self, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
        self.fd
            .async_io(Interest::WRITABLE, |fd| {
                let iov = [IoSlice::new(bytes)];
                let cmsg = [ControlMessage::ScmRights(fds)];
                let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
                sendmsg::<UnixAddr>(fd.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)?;
                Ok(())
            })
            .await
    }

    /// The next message and the descriptors that came with it (chunks reassembled).
    pub async fn recv(&self) -> io::Result<(Msg, Vec<OwnedFd>)> {
        let mut chunks = String::new();
        loop {
            match self.recv_datagram().await? {
                (Msg::Chunk { data }, _) => {
                    if chunks.len() + data.len() > MAX_MSG {
                        return Err(io::Error::new(io::ErrorKind::InvalidData, "hand-off message larger than the limit"));
                    }
                    chunks.push_str(&data);
                }
                (Msg::Assembled, fds) => {
                    let msg = serde_json::from_str(&chunks).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                    return Ok((msg, fds));
                }
                other => return Ok(other),
            }
        }
    }

    async fn recv_datagram(&self) -> io::Result<(Msg, Vec<OwnedFd>)> {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let (n, fds) = self
            .fd
            .async_io(Interest::READABLE, |fd| {
                let mut cmsg = nix::cmsg_space!([RawFd; 4]);
                let mut iov = [IoSliceMut::new(&mut buf)];
                let r = recvmsg::<UnixAddr>(fd.as_fd().as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)?;
                let mut fds = Vec::new();
                for c in r.cmsgs()? {
                    if let ControlMessageOwned::ScmRights(raw) = c {
                        fds.extend(raw.into_iter().map(sys::owned_from_kernel));
                    }
                }
                Ok((r.bytes, fds))
            })
            .await?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the other agent closed the hand-off channel"));
        }
        let msg = serde_json::from_slice(&buf[..n]).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        Ok((msg, fds))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::socketpair;

    fn pair() -> (Peer, Peer) {
        let (a, b) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC).unwrap();
        (Peer { fd: sys::register_owned(a).unwrap() }, Peer { fd: sys::register_owned(b).unwrap() })
    }

    /// A connection whose state is far larger than one datagram arrives whole, with its
    /// descriptors, and small messages around it are untouched.
    #[tokio::test]
    async fn large_messages_are_chunked_and_reassembled() {
        let (old, new) = pair();
        let state: String = (0..200_000).map(|i| format!("\"é{i}\\\\\",")).collect();
        assert!(state.len() > 10 * CHUNK);
        let (r, w) = nix::unistd::pipe().unwrap();
        let addr: std::net::SocketAddr = "10.200.1.2:4000".parse().unwrap();
        let conn = Msg::Conn { pod: addr, dst: addr, moved: Box::new(Moved { state: Some(state.clone()), ..Default::default() }) };
        let sender = tokio::spawn(async move {
            old.send(&Msg::Shared { state: "{}".into() }, &[]).await.unwrap();
            old.send(&conn, &[r.as_raw_fd(), w.as_raw_fd()]).await.unwrap();
            old.send(&Msg::Done, &[]).await.unwrap();
        });
        assert!(matches!(new.recv().await.unwrap(), (Msg::Shared { state }, fds) if state == "{}" && fds.is_empty()));
        match new.recv().await.unwrap() {
            (Msg::Conn { moved, .. }, fds) => {
                assert_eq!(moved.state.as_deref(), Some(state.as_str()));
                assert_eq!(fds.len(), 2);
            }
            (m, _) => panic!("unexpected {m:?}"),
        }
        assert!(matches!(new.recv().await.unwrap().0, Msg::Done));
        sender.await.unwrap();
    }
}
