//! `rmq-agent`: run the node agent, or print the shared constants.
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use rmq_agent::config::RunArgs;

#[derive(Parser)]
#[command(name = "rmq-agent", version, about = "Transparent RocketMQ node agent")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent (captured-connection listener and relay).
    Run(RunArgs),
    /// Show what the node's agent is doing (reads its admin socket).
    Status(rmq_agent::status::StatusArgs),
    /// Print the constants shared with the CNI plugin and scripts.
    Constants {
        /// KEY=VALUE lines for `eval` in shell scripts.
        #[arg(long)]
        shell: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches)?;
    match cli.cmd {
        Cmd::Run(_) => {
            let sub = matches.subcommand_matches("run").expect("clap routed to run");
            let cfg = RunArgs::resolve(sub)?;
            let (_log, level) = rmq_agent::logging::init(cfg.log_format);
            rmq_agent::app::run(cfg, Some(level))
        }
        Cmd::Status(args) => rmq_agent::status::run(args),
        Cmd::Constants { shell } => {
            print_constants(shell);
            Ok(())
        }
    }
}

fn print_constants(shell: bool) {
    use rmq_common::*;
    let ports = DEFAULT_ROCKETMQ_PORTS.map(|p| p.to_string()).join(",");
    let kv: [(&str, String); 15] = [
        ("AGENT_PORT", AGENT_PORT.to_string()),
        ("ADMIN_PORT", ADMIN_PORT.to_string()),
        ("ROCKETMQ_PORTS", ports),
        ("CAPTURE_MARK", format!("{CAPTURE_MARK:#x}")),
        ("CAPTURE_MASK", format!("{CAPTURE_MASK:#x}")),
        ("UPSTREAM_MARK", format!("{UPSTREAM_MARK:#x}")),
        ("UPSTREAM_MASK", format!("{UPSTREAM_MASK:#x}")),
        ("ROUTE_TABLE", ROUTE_TABLE.to_string()),
        ("RULE_PRIORITY", RULE_PRIORITY.to_string()),
        ("CHAIN_TPROXY", CHAIN_TPROXY.to_string()),
        ("CHAIN_DIVERT", CHAIN_DIVERT.to_string()),
        ("CHAIN_REDIRECT", CHAIN_REDIRECT.to_string()),
        ("RULE_COMMENT_PREFIX", RULE_COMMENT_PREFIX.to_string()),
        ("ADMIN_SOCKET", ADMIN_SOCKET.to_string()),
        ("HANDOFF_SOCKET", HANDOFF_SOCKET.to_string()),
    ];
    for (k, v) in kv {
        if shell {
            println!("{k}='{v}'");
        } else {
            println!("{k} = {v}");
        }
    }
}
