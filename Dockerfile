# rmq-agent node image: the agent plus the iptables/iproute2 tools the node rules need.
# Multi-stage: build with the Rust toolchain, run on a slim Debian.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p rmq-agent \
 && install -D -m 0755 target/release/rmq-agent /out/rmq-agent

FROM debian:bookworm-slim
# iptables ships both backends (iptables-nft and iptables-legacy); the node's choice is used.
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables iproute2 ca-certificates \
 && rm -rf /var/lib/apt/lists/* /usr/share/doc /usr/share/man
COPY --from=build /out/rmq-agent /usr/local/bin/rmq-agent
COPY scripts/capture-rules.sh /usr/local/lib/rmq-agent/capture-rules.sh
# Runs as root with only NET_ADMIN and NET_RAW (see deploy/daemonset.yaml): IP_TRANSPARENT,
# SO_MARK and the node's mangle/nat rules need them, and they are granted per capability.
ENTRYPOINT ["/usr/local/bin/rmq-agent"]
CMD ["run", "--config", "/etc/rmq-agent/agent.toml"]
