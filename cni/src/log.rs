//! Plugin logs: to the configured file, else stderr. Never stdout (that is the CNI result).
use std::io::Write;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

static SINK: Mutex<Option<std::fs::File>> = Mutex::new(None);
static CONTEXT: Mutex<String> = Mutex::new(String::new());

/// Sends later lines to `path` (appending); if it cannot be opened, they go to stderr.
pub fn init(path: Option<&str>, context: String) {
    if let Ok(mut c) = CONTEXT.lock() {
        *c = context;
    }
    let Some(path) = path.filter(|p| !p.is_empty()) else { return };
    if let Some(dir) = std::path::Path::new(path).parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    match std::fs::OpenOptions::new().create(true).append(true).open(path) {
        Ok(f) => {
            if let Ok(mut s) = SINK.lock() {
                *s = Some(f);
            }
        }
        Err(e) => eprintln!("rmq-cni: cannot open log file {path}: {e}; logging to stderr"),
    }
}

pub fn write(level: &str, msg: &str) {
    let ts = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
    let ctx = CONTEXT.lock().map(|c| c.clone()).unwrap_or_default();
    let line = format!("{ts:.3} rmq-cni[{}] {level} {ctx} {msg}\n", std::process::id());
    let mut wrote = false;
    if let Ok(mut s) = SINK.lock() {
        if let Some(f) = s.as_mut() {
            wrote = f.write_all(line.as_bytes()).is_ok();
        }
    }
    // Errors also go to stderr: runtimes show a failed plugin's stderr.
    if !wrote || level == "ERROR" {
        let _ = std::io::stderr().write_all(line.as_bytes());
    }
}

pub fn info(msg: impl AsRef<str>) {
    write("INFO", msg.as_ref());
}
pub fn warn(msg: impl AsRef<str>) {
    write("WARN", msg.as_ref());
}
pub fn error(msg: impl AsRef<str>) {
    write("ERROR", msg.as_ref());
}
