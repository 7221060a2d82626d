//! rmq-e2e: the end-to-end test harness for rmq-agent.
//!
//! Every test binary runs inside its own isolated network + mount namespace (entered
//! before `main`, see [`sandbox`]); inside it, [`lab::Lab`] builds the pod/node/broker
//! namespace topology, [`peers::Peers`] runs the real RocketMQ name server and broker in
//! the broker netns, [`agent::Agent`] runs rmq-agent with TPROXY capture in the node
//! netns, and [`sdk`] / [`frames`] drive real SDKs and raw hand-built frames from the pod.
//!
//! Each test file starts with [`sandboxed_test_binary!`]`()`.

pub mod agent;
pub mod capture;
pub mod cni;
pub mod frames;
pub mod group;
pub mod lab;
pub mod netns;
pub mod peers;
pub mod sandbox;
pub mod sdk;
pub mod telemetry;

#[doc(hidden)]
pub use ctor::ctor as __ctor;

/// Enters the sandbox before `main` whenever this library is linked in.
#[ctor::ctor]
fn enter_sandbox_before_main() {
    sandbox::enter();
}

/// Put this at the top of every test file: a constructor in the test binary itself
/// that enters the sandbox before `main`. (The library's own constructor only runs if
/// the linker keeps its object file, so each binary carries one too; entering is
/// idempotent.) If the sandbox cannot be entered the binary aborts with the reason,
/// so its tests fail rather than skip.
#[macro_export]
macro_rules! sandboxed_test_binary {
    () => {
        #[$crate::__ctor]
        fn __rmq_e2e_enter_sandbox_before_main() {
            $crate::sandbox::enter();
        }
    };
}
