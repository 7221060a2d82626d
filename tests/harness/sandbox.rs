//! The isolated sandbox every test binary runs in (the Rust twin of `scripts/sandbox`).
//!
//! Before `main`, a constructor moves the whole test process into a fresh network
//! namespace that has only `lo` (no uplink, no route out of the machine) and a private
//! mount namespace, so the lab's `/run/netns` entries and the xtables lock are private
//! too. Threads and child processes created afterwards inherit both namespaces, so a
//! harness bug that forgets `ip netns exec` still cannot reach a real network.
//!
//! It has to happen before `main`: `unshare(CLONE_NEWNET)` only moves the calling thread,
//! and the test runner starts its threads from the main thread.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::sync::Once;

use anyhow::{bail, ensure, Context, Result};
use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};

/// Env var holding the inode of the sandbox netns; `scripts/lab-guard` and
/// `scripts/lab.sh` refuse to run unless it names the namespace they run in.
pub const SANDBOX_ENV: &str = "RMQ_SANDBOX_NETNS";

static ENTER: Once = Once::new();

/// Enters the sandbox (once per process). Called from the constructors before `main`;
/// panics if any step fails: a test whose harness cannot start must fail, never skip,
/// and must never go on in the machine's real network namespace.
pub fn enter() {
    ENTER.call_once(|| {
        if let Err(e) = enter_inner() {
            panic!(
                "rmq-e2e: cannot enter the test sandbox: {e:#}\n\
                 The end-to-end tests must run as root (they create network and mount namespaces): \
                 sudo -E cargo nextest run -p rmq-e2e"
            );
        }
        if let Err(e) = guard() {
            panic!("rmq-e2e: the sandbox is not isolated: {e:#}");
        }
    });
}

fn enter_inner() -> Result<()> {
    ensure!(nix::unistd::geteuid().is_root(), "not running as root");
    unshare(CloneFlags::CLONE_NEWNET | CloneFlags::CLONE_NEWNS)
        .context("unshare(CLONE_NEWNET | CLONE_NEWNS)")?;
    // Nothing we mount from here on may propagate back to the machine's mount namespace.
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>)
        .context("make / mount propagation private")?;

    std::fs::create_dir_all("/run/netns").context("create /run/netns")?;
    mount(Some("rmq-e2e"), "/run/netns", Some("tmpfs"), MsFlags::empty(), None::<&str>)
        .context("mount a private tmpfs on /run/netns")?;

    // iptables serialises through /run/xtables.lock; a private copy means our lab's
    // iptables calls neither wait for nor block the machine's.
    let lock = Path::new("/run/xtables.lock");
    if !lock.exists() {
        std::fs::File::create(lock).context("create /run/xtables.lock (bind-mount target)")?;
    }
    let private_lock = std::env::temp_dir().join(format!("rmq-e2e-xtables.{}", std::process::id()));
    std::fs::File::create(&private_lock).with_context(|| format!("create {}", private_lock.display()))?;
    mount(Some(&private_lock), lock, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .context("bind-mount a private file over /run/xtables.lock")?;
    // The bind mount keeps the inode alive; the name is no longer needed.
    let _ = std::fs::remove_file(&private_lock);

    run_ip(&["link", "set", "lo", "up"])?;

    let ino = std::fs::metadata("/proc/thread-self/ns/net").context("stat /proc/thread-self/ns/net")?.ino();
    // Single-threaded at this point (before main), so mutating the environment is sound.
    std::env::set_var(SANDBOX_ENV, ino.to_string());
    Ok(())
}

/// Same checks as `scripts/lab-guard`: we are in the sandbox's netns, it has no
/// interface but `lo` and no default route. Run before any lab is built.
pub fn guard() -> Result<()> {
    let want = std::env::var(SANDBOX_ENV)
        .with_context(|| format!("{SANDBOX_ENV} is not set: the sandbox constructor did not run"))?;
    let here = std::fs::metadata("/proc/thread-self/ns/net").context("stat /proc/thread-self/ns/net")?.ino();
    ensure!(
        here.to_string() == want,
        "this thread is in netns {here}, not the sandbox's ({want})"
    );
    for family in ["-4", "-6"] {
        let routes = run_ip(&[family, "route", "show", "default"])?;
        ensure!(routes.trim().is_empty(), "the sandbox has a default route ({family}): {routes}");
    }
    let links = run_ip(&["-o", "link", "show"])?;
    for line in links.lines() {
        let name = line.split(':').nth(1).unwrap_or("").trim();
        let name = name.split('@').next().unwrap_or(name);
        ensure!(name == "lo", "the sandbox has interface {name:?}");
    }
    Ok(())
}

fn run_ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip").args(args).output().with_context(|| format!("run ip {}", args.join(" ")))?;
    if !out.status.success() {
        bail!("ip {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
