//! `rmq-cni install | uninstall [--watch]`: put the binary into the CNI bin directory and
//! our entry last into the primary network's conflist (as istio-cni does), atomically,
//! idempotently and without changing the file's permissions.
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Map, Value};

use crate::conf::{NetConf, PLUGIN_TYPE};

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("no CNI network configuration in {0}: install the node's primary CNI first (rmq-cni chains onto it), or use --watch to wait for it")]
    NoPrimary(PathBuf),
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{path} is not valid CNI JSON: {err}; fix or remove it")]
    BadJson { path: PathBuf, err: String },
    #[error("the rmq-cni entry is invalid: {0}")]
    BadEntry(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> InstallError + '_ {
    move |err| InstallError::Io { path: path.to_path_buf(), err }
}

#[derive(Debug, Clone)]
pub struct Options {
    pub bin_dir: PathBuf,
    pub conf_dir: PathBuf,
    /// The binary to copy (default: ourselves).
    pub source_bin: PathBuf,
    /// Our conflist entry (at least `"type": "rmq-cni"`).
    pub entry: Map<String, Value>,
    /// A specific file in `conf_dir`; default: the one the runtime uses (first by name).
    pub conf_file: Option<String>,
}

/// What one install pass changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub binary: bool,
    pub conflist: Option<PathBuf>,
    pub converted_from: Option<PathBuf>,
}

impl Changes {
    pub fn any(&self) -> bool {
        self.binary || self.conflist.is_some()
    }
}

/// Key in our entry that remembers a `.conf` we turned into a `.conflist`, so uninstall
/// can put it back.
const CONVERTED_FROM: &str = "rmqConvertedFrom";

/// The file a runtime (libcni) picks: the first `.conf`/`.conflist`/`.json` by name.
pub fn primary_conf(dir: &Path, name: Option<&str>) -> Result<Option<PathBuf>, InstallError> {
    if let Some(n) = name {
        let p = dir.join(n);
        return Ok(p.exists().then_some(p));
    }
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(dir)(e)),
    };
    let mut files: Vec<PathBuf> = rd
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .filter(|p| !p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.')))
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("conf" | "conflist" | "json")))
        .collect();
    files.sort();
    Ok(files.into_iter().next())
}

/// Checks the entry the way the plugin will read it, so a typo fails here and not at
/// every pod start.
pub fn validate_entry(entry: &Map<String, Value>) -> Result<(), InstallError> {
    if entry.get("type").and_then(Value::as_str) != Some(PLUGIN_TYPE) {
        return Err(InstallError::BadEntry(format!("\"type\" must be {PLUGIN_TYPE:?}")));
    }
    let mut probe = entry.clone();
    probe.insert("cniVersion".into(), "1.0.0".into());
    probe.insert("name".into(), "probe".into());
    NetConf::parse(Value::Object(probe).to_string().as_bytes()).map(drop).map_err(|e| InstallError::BadEntry(e.to_string()))
}

pub fn install(o: &Options) -> Result<Changes, InstallError> {
    validate_entry(&o.entry)?;
    let mut changes = Changes { binary: install_binary(&o.source_bin, &o.bin_dir)?, ..Default::default() };
    let conf = primary_conf(&o.conf_dir, o.conf_file.as_deref())?.ok_or_else(|| InstallError::NoPrimary(o.conf_dir.clone()))?;
    let text = fs::read_to_string(&conf).map_err(io(&conf))?;
    let mut doc: Map<String, Value> = parse_obj(&conf, &text)?;
    let is_list = doc.contains_key("plugins");
    let mut entry = o.entry.clone();
    if !is_list {
        // A single-plugin .conf: wrap it into a conflist, as libcni would read it.
        let version = doc.get("cniVersion").cloned().unwrap_or_else(|| "1.0.0".into());
        let name = doc.get("name").cloned().unwrap_or_else(|| "k8s-pod-network".into());
        let mut list = Map::new();
        list.insert("cniVersion".into(), version);
        list.insert("name".into(), name);
        list.insert("plugins".into(), Value::Array(vec![Value::Object(doc)]));
        doc = list;
        entry.insert(CONVERTED_FROM.into(), conf.file_name().and_then(|n| n.to_str()).unwrap_or_default().into());
    }
    let plugins = plugins_mut(&conf, &mut doc)?;
    // Keep a conversion marker across re-installs of an already converted file.
    if let Some(old) = plugins.iter().find(|p| is_ours(p)).and_then(|p| p.get(CONVERTED_FROM)).cloned() {
        entry.insert(CONVERTED_FROM.into(), old);
    }
    let want = Value::Object(entry);
    if plugins.last() == Some(&want) && plugins.iter().filter(|p| is_ours(p)).count() == 1 {
        return Ok(changes);
    }
    plugins.retain(|p| !is_ours(p));
    plugins.push(want);
    let target = if is_list { conf.clone() } else { conf.with_extension("conflist") };
    let mode = fs::metadata(&conf).map_err(io(&conf))?.permissions().mode();
    write_atomic(&target, &pretty(&doc), mode)?;
    if !is_list {
        fs::remove_file(&conf).map_err(io(&conf))?;
        changes.converted_from = Some(conf);
    }
    changes.conflist = Some(target);
    Ok(changes)
}

/// Removes our entry (restoring a converted `.conf`) and the binary. Succeeds when
/// nothing of ours is there.
pub fn uninstall(o: &Options) -> Result<Changes, InstallError> {
    let mut changes = Changes::default();
    if let Some(conf) = primary_conf(&o.conf_dir, o.conf_file.as_deref())? {
        let text = fs::read_to_string(&conf).map_err(io(&conf))?;
        let mut doc = parse_obj(&conf, &text)?;
        if doc.contains_key("plugins") {
            let mode = fs::metadata(&conf).map_err(io(&conf))?.permissions().mode();
            let plugins = plugins_mut(&conf, &mut doc)?;
            let converted = plugins.iter().find(|p| is_ours(p)).and_then(|p| p.get(CONVERTED_FROM)).and_then(Value::as_str).map(str::to_string);
            let before = plugins.len();
            plugins.retain(|p| !is_ours(p));
            if plugins.len() != before {
                match converted {
                    Some(name) if plugins.len() == 1 => {
                        let orig = conf.with_file_name(name);
                        write_atomic(&orig, &pretty(&plugins[0]), mode)?;
                        fs::remove_file(&conf).map_err(io(&conf))?;
                        changes.converted_from = Some(orig);
                    }
                    _ => write_atomic(&conf, &pretty(&doc), mode)?,
                }
                changes.conflist = Some(conf);
            }
        }
    }
    let bin = o.bin_dir.join(PLUGIN_TYPE);
    if bin.exists() {
        fs::remove_file(&bin).map_err(io(&bin))?;
        changes.binary = true;
    }
    Ok(changes)
}

/// Installs, then re-checks every `interval` and repairs what the primary CNI (or anyone)
/// rewrote, until `stop()` is true. Waits for the primary config if it is not there yet.
pub fn watch(o: &Options, interval: Duration, stop: impl Fn() -> bool, mut report: impl FnMut(Result<&Changes, &InstallError>)) {
    while !stop() {
        match install(o) {
            Ok(c) if c.any() => report(Ok(&c)),
            Ok(_) => {}
            Err(e) => report(Err(&e)),
        }
        std::thread::sleep(interval);
    }
}

fn is_ours(p: &Value) -> bool {
    p.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

fn parse_obj(path: &Path, text: &str) -> Result<Map<String, Value>, InstallError> {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(InstallError::BadJson { path: path.into(), err: "not a JSON object".into() }),
        Err(e) => Err(InstallError::BadJson { path: path.into(), err: e.to_string() }),
    }
}

fn plugins_mut<'a>(path: &Path, doc: &'a mut Map<String, Value>) -> Result<&'a mut Vec<Value>, InstallError> {
    match doc.get_mut("plugins") {
        Some(Value::Array(a)) => Ok(a),
        _ => Err(InstallError::BadJson { path: path.into(), err: "\"plugins\" is not an array".into() }),
    }
}

fn pretty<T: serde::Serialize>(v: &T) -> String {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_default();
    s.push('\n');
    s
}

/// Same directory temp file + rename: a runtime never reads a half-written file.
fn write_atomic(path: &Path, content: &str, mode: u32) -> Result<(), InstallError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("rmq-cni");
    let tmp = dir.join(format!(".{name}.rmq-cni-tmp"));
    fs::write(&tmp, content).map_err(io(&tmp))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode & 0o7777)).map_err(io(&tmp))?;
    if let Ok(f) = fs::File::open(&tmp) {
        let _ = f.sync_all();
    }
    fs::rename(&tmp, path).map_err(io(path))
}

/// Copies the binary unless an identical one is there; returns whether it changed.
fn install_binary(src: &Path, bin_dir: &Path) -> Result<bool, InstallError> {
    let dst = bin_dir.join(PLUGIN_TYPE);
    let new = fs::read(src).map_err(io(src))?;
    if fs::read(&dst).is_ok_and(|old| old == new) {
        return Ok(false);
    }
    fs::create_dir_all(bin_dir).map_err(io(bin_dir))?;
    let tmp = bin_dir.join(format!(".{PLUGIN_TYPE}.rmq-cni-tmp"));
    fs::write(&tmp, &new).map_err(io(&tmp))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755)).map_err(io(&tmp))?;
    // rename over the old file: a runtime exec'ing it sees either version, never a torn one.
    fs::rename(&tmp, &dst).map_err(io(&dst))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BRIDGE_CONF: &str = r#"{"cniVersion":"1.0.0","name":"podnet","type":"bridge","bridge":"cni0","ipam":{"type":"host-local","subnet":"10.22.0.0/16"}}"#;
    const PTP_LIST: &str = r#"{"cniVersion":"1.0.0","name":"podnet","plugins":[{"type":"ptp","ipam":{"type":"host-local","subnet":"10.23.0.0/16"}},{"type":"portmap","capabilities":{"portMappings":true}}]}"#;

    fn setup(files: &[(&str, &str, u32)]) -> (tempfile::TempDir, Options) {
        let d = tempfile::tempdir().unwrap();
        let conf_dir = d.path().join("net.d");
        fs::create_dir_all(&conf_dir).unwrap();
        for (n, c, mode) in files {
            let p = conf_dir.join(n);
            fs::write(&p, c).unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(*mode)).unwrap();
        }
        let src = d.path().join("src-bin");
        fs::write(&src, b"#!/bin/sh\n").unwrap();
        let mut entry = Map::new();
        entry.insert("type".into(), PLUGIN_TYPE.into());
        entry.insert("captureMode".into(), "auto".into());
        let o = Options { bin_dir: d.path().join("bin"), conf_dir, source_bin: src, entry, conf_file: None };
        (d, o)
    }

    fn read(p: &Path) -> Value {
        serde_json::from_str(&fs::read_to_string(p).unwrap()).unwrap()
    }

    #[test]
    fn appends_last_and_is_idempotent_and_keeps_mode() {
        let (_d, o) = setup(&[("10-ptp.conflist", PTP_LIST, 0o600), ("99-other.conflist", PTP_LIST, 0o644)]);
        let c = install(&o).unwrap();
        assert!(c.binary);
        let p = o.conf_dir.join("10-ptp.conflist");
        assert_eq!(c.conflist.as_deref(), Some(p.as_path()));
        let v = read(&p);
        let types: Vec<&str> = v["plugins"].as_array().unwrap().iter().map(|x| x["type"].as_str().unwrap()).collect();
        assert_eq!(types, ["ptp", "portmap", "rmq-cni"]);
        assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::metadata(o.bin_dir.join("rmq-cni")).unwrap().permissions().mode() & 0o777, 0o755);
        // The other file is untouched; a second pass changes nothing.
        assert_eq!(fs::read_to_string(o.conf_dir.join("99-other.conflist")).unwrap(), PTP_LIST);
        assert_eq!(install(&o).unwrap(), Changes::default());
    }

    #[test]
    fn converts_a_conf_and_uninstall_restores_it() {
        let (_d, o) = setup(&[("10-bridge.conf", BRIDGE_CONF, 0o644)]);
        let c = install(&o).unwrap();
        let list = o.conf_dir.join("10-bridge.conflist");
        assert_eq!(c.converted_from.as_deref(), Some(o.conf_dir.join("10-bridge.conf").as_path()));
        assert!(!o.conf_dir.join("10-bridge.conf").exists());
        let v = read(&list);
        assert_eq!(v["name"], "podnet");
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["plugins"][0]["type"], "bridge");
        assert_eq!(v["plugins"][1]["type"], "rmq-cni");
        assert_eq!(install(&o).unwrap(), Changes::default());
        let u = uninstall(&o).unwrap();
        assert!(u.binary);
        assert!(!list.exists());
        assert_eq!(read(&o.conf_dir.join("10-bridge.conf")), serde_json::from_str::<Value>(BRIDGE_CONF).unwrap());
        assert!(!o.bin_dir.join("rmq-cni").exists());
        assert_eq!(uninstall(&o).unwrap(), Changes::default());
    }

    #[test]
    fn moves_our_entry_back_to_last_and_updates_it() {
        let (_d, mut o) = setup(&[("10-ptp.conflist", PTP_LIST, 0o644)]);
        install(&o).unwrap();
        let p = o.conf_dir.join("10-ptp.conflist");
        // The primary CNI rewrote its file and appended something after us.
        let mut v = read(&p);
        v["plugins"].as_array_mut().unwrap().push(serde_json::json!({"type":"tuning"}));
        fs::write(&p, v.to_string()).unwrap();
        o.entry.insert("captureMode".into(), "redirect".into());
        assert!(install(&o).unwrap().conflist.is_some());
        let v = read(&p);
        let plugins = v["plugins"].as_array().unwrap();
        assert_eq!(plugins.iter().filter(|x| x["type"] == "rmq-cni").count(), 1);
        assert_eq!(plugins.last().unwrap()["captureMode"], "redirect");
        uninstall(&o).unwrap();
        let types: Vec<String> = read(&p)["plugins"].as_array().unwrap().iter().map(|x| x["type"].as_str().unwrap().to_string()).collect();
        assert_eq!(types, ["ptp", "portmap", "tuning"]);
    }

    #[test]
    fn missing_primary_and_bad_entry_are_clear_errors() {
        let (_d, mut o) = setup(&[]);
        let e = install(&o).unwrap_err();
        assert!(e.to_string().contains("install the node's primary CNI first"), "{e}");
        o.entry.insert("captureMode".into(), "bogus".into());
        assert!(matches!(install(&o).unwrap_err(), InstallError::BadEntry(_)));
    }

    #[test]
    fn watch_repairs_a_rewritten_conflist() {
        let (_d, o) = setup(&[("10-ptp.conflist", PTP_LIST, 0o644)]);
        let p = o.conf_dir.join("10-ptp.conflist");
        let stop = std::sync::atomic::AtomicBool::new(false);
        let repairs = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            s.spawn(|| {
                watch(&o, Duration::from_millis(20), || stop.load(std::sync::atomic::Ordering::SeqCst), |r| {
                    if r.is_ok() {
                        repairs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                })
            });
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while repairs.load(std::sync::atomic::Ordering::SeqCst) < 1 && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            // The primary CNI rewrites its file without us.
            fs::write(&p, PTP_LIST).unwrap();
            while repairs.load(std::sync::atomic::Ordering::SeqCst) < 2 && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        assert_eq!(repairs.load(std::sync::atomic::Ordering::SeqCst), 2);
        assert_eq!(read(&p)["plugins"][2]["type"], "rmq-cni");
    }
}
