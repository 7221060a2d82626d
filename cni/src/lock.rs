//! The plugin's own lock: our check-then-add sequences (chains, jump rules, pod rules)
//! must not interleave between parallel ADD/DEL runs. Individual iptables calls also
//! wait on the xtables lock (`-w`), which protects us against other writers (kube-proxy).
use std::fs::{File, OpenOptions};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::error::{CniError, Code};

pub struct PluginLock {
    _lock: Flock<File>,
}

impl PluginLock {
    /// Waits up to `limit` for the lock at `path`.
    pub fn acquire(path: &str, limit: Duration) -> Result<Self, CniError> {
        if let Some(dir) = std::path::Path::new(path).parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let deadline = Instant::now() + limit;
        let mut file = OpenOptions::new().create(true).truncate(false).write(true).open(path).map_err(|e| {
            CniError::new(Code::Io, format!("cannot open the rmq-cni lock file {path}"), format!("{e}; set \"lockFile\" to a writable path"))
        })?;
        loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(l) => return Ok(PluginLock { _lock: l }),
                Err((f, Errno::EWOULDBLOCK)) | Err((f, Errno::EINTR)) => {
                    if Instant::now() >= deadline {
                        return Err(CniError::new(
                            Code::TryAgainLater,
                            format!("another rmq-cni run held {path} for more than {limit:?}"),
                            "the runtime will retry; if this persists, look for a hung rmq-cni or iptables process",
                        ));
                    }
                    file = f;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err((_, e)) => return Err(CniError::new(Code::Io, format!("cannot lock {path}"), e.to_string())),
            }
        }
    }
}
