//! Handles on the lab's network namespaces: run a closure on a thread inside one
//! (for raw std::net clients written in Rust) or build a command that runs inside one.
//!
//! A [`Netns`] can only be obtained from a [`crate::lab::Lab`], so it always names one of
//! that lab's namespaces; anything else is refused.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::{Command, Output};

use anyhow::{bail, Context, Result};
use nix::sched::{setns, CloneFlags};

#[derive(Clone, Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Only the lab creates handles, and only for its own namespace names.
    pub(crate) fn of_lab(name: String, lab_namespaces: &[String]) -> Netns {
        assert!(
            lab_namespaces.contains(&name),
            "refusing netns {name:?}: it is not one of this lab's namespaces {lab_namespaces:?}"
        );
        Netns { name }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Runs `f` on a new OS thread that has joined this namespace and returns its
    /// result. Sockets created inside `f` stay in this namespace after it returns, so
    /// `ns.run(|| TcpStream::connect(..))` hands back a pod-side connection that any
    /// thread may use. Panics (the test fails) if the namespace cannot be entered;
    /// a panic inside `f` is propagated.
    pub fn run<T, F>(&self, f: F) -> T
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        let path = self.path();
        let name = self.name.clone();
        std::thread::scope(|scope| {
            let handle = std::thread::Builder::new()
                .name(format!("netns-{name}"))
                .spawn_scoped(scope, move || {
                    enter_on_this_thread(&path)
                        .unwrap_or_else(|e| panic!("cannot enter lab netns {name}: {e:#}"));
                    f()
                })
                .expect("spawn a netns thread");
            match handle.join() {
                Ok(v) => v,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// `ip netns exec <name> <program>`: a command that runs inside this namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Runs `sh -c script` inside this namespace; fails unless it exits 0.
    pub fn sh(&self, script: &str) -> Result<String> {
        let out = self.command("sh").args(["-c", script]).output().with_context(|| {
            format!("run `{script}` in netns {}", self.name)
        })?;
        check_output(&format!("`{script}` in netns {}", self.name), out)
    }
}

/// setns(2) for the calling thread only, then a check that it took.
fn enter_on_this_thread(path: &std::path::Path) -> Result<()> {
    let file = File::open(path).with_context(|| format!("open {} (is the lab up?)", path.display()))?;
    let want = file.metadata()?.ino();
    setns(&file, CloneFlags::CLONE_NEWNET).with_context(|| format!("setns({})", path.display()))?;
    let now = std::fs::metadata("/proc/thread-self/ns/net")?.ino();
    if now != want {
        bail!("setns({}) did not move this thread (netns inode {now}, want {want})", path.display());
    }
    Ok(())
}

pub(crate) fn check_output(what: &str, out: Output) -> Result<String> {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "{what} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(stdout)
}
