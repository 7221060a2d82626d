//! CNI error results (spec §"Error"): printed on stdout as JSON, exit code 1.
use serde::Serialize;

/// Error codes from the CNI spec, plus our own (>= 100).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    IncompatibleVersion = 1,
    InvalidEnv = 4,
    Io = 5,
    Decode = 6,
    InvalidConfig = 7,
    TryAgainLater = 11,
    CaptureInstall = 100,
    CaptureCheck = 101,
}

#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("{msg}")]
    Plugin { code: Code, msg: String, details: String },
}

impl CniError {
    pub fn new(code: Code, msg: impl Into<String>, details: impl Into<String>) -> Self {
        CniError::Plugin { code, msg: msg.into(), details: details.into() }
    }

    pub fn code(&self) -> Code {
        match self {
            CniError::Plugin { code, .. } => *code,
        }
    }

    /// The JSON object the runtime expects on stdout.
    pub fn to_json(&self, cni_version: &str) -> String {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Out<'a> {
            cni_version: &'a str,
            code: u32,
            msg: &'a str,
            details: &'a str,
        }
        let CniError::Plugin { code, msg, details } = self;
        serde_json::to_string(&Out { cni_version, code: *code as u32, msg, details })
            .unwrap_or_else(|_| format!("{{\"code\":{},\"msg\":\"unprintable error\"}}", *code as u32))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_json_has_code_msg_details() {
        let e = CniError::new(Code::CaptureInstall, "boom", "more");
        let v: serde_json::Value = serde_json::from_str(&e.to_json("1.0.0")).unwrap();
        assert_eq!(v["code"], 100);
        assert_eq!(v["msg"], "boom");
        assert_eq!(v["details"], "more");
        assert_eq!(v["cniVersion"], "1.0.0");
    }
}
