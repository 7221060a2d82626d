//! rmq-cni: a chained CNI plugin that installs the node-level RocketMQ capture for each pod.
#![forbid(unsafe_code)]

pub mod backend;
pub mod capture;
pub mod conf;
pub mod error;
pub mod exec;
pub mod install;
pub mod lock;
pub mod log;
pub mod plugin;
pub mod route;
pub mod rules;
