//! `tracing` set-up: stderr, text or JSON, filter from RMQ_AGENT_LOG and
//! changeable at run time through the admin socket (`/logging?level=`).
//! Writes go through a background thread so a slow stderr never blocks the data plane.
use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, reload, EnvFilter, Registry};

use crate::config::LogFormat;

/// Changes the log filter of the running agent.
#[derive(Clone)]
pub struct LogLevelHandle(reload::Handle<EnvFilter, Registry>);

impl LogLevelHandle {
    pub fn set(&self, directives: &str) -> Result<(), String> {
        let filter = EnvFilter::try_new(directives).map_err(|e| format!("bad filter {directives:?}: {e}"))?;
        self.0.reload(filter).map_err(|e| e.to_string())
    }

    pub fn current(&self) -> String {
        self.0.with_current(|f| f.to_string()).unwrap_or_default()
    }
}

pub fn init(format: LogFormat) -> (WorkerGuard, LogLevelHandle) {
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default().lossy(false).finish(std::io::stderr());
    let filter = EnvFilter::try_from_env("RMQ_AGENT_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Json => registry.with(fmt::layer().json().with_writer(writer)).init(),
        LogFormat::Text => registry.with(fmt::layer().with_ansi(false).with_writer(writer)).init(),
    }
    (guard, LogLevelHandle(handle))
}
