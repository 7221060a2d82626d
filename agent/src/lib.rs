//! rmq-agent: a transparent RocketMQ node agent.
//!
//! One module per concern; see ARCHITECTURE.md for how they fit together.
#![deny(unsafe_code)]

pub mod addr;
pub mod admin;
pub mod app;
pub mod broker_client;
pub mod codec;
pub mod config;
pub mod convert;
pub mod handoff;
pub mod logging;
pub mod metrics;
pub mod policy;
pub mod pop;
pub mod pop_native;
pub mod relay;
pub mod socket;
pub mod state;
pub mod status;
mod sys;
pub mod wait;
