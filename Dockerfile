# rmq-agent node image: the agent, the CNI plugin and its installer (`rmq-cni`), and the
# iptables/iproute2 tools for node rules. One image for both containers of the DaemonSet
# (deploy/daemonset.yaml).
#
#   docker build -t rmq-agent:0.1.0 .
#
# Bases are pinned by tag; the only network fetches are cargo (crates.io, exactly what
# Cargo.lock says: --locked) and apt (Debian). No BuildKit-only syntax, no `# syntax=` line
# (that would pull a frontend image).

# --- build: the workspace's toolchain (rustc 1.95), same Debian release as the runtime (glibc).
FROM rust:1.95.0-bookworm AS build
WORKDIR /src
COPY . .
# strip --strip-debug keeps the symbol table (function names in backtraces), drops DWARF.
RUN cargo build --release --locked -p rmq-agent -p rmq-cni \
 && install -D -m 0755 -t /out target/release/rmq-agent target/release/rmq-cni \
 && strip --strip-debug /out/rmq-agent /out/rmq-cni

# --- runtime: Debian slim, only what the node rules need.
FROM debian:bookworm-slim AS runtime
# iptables ships both backends: iptables-nft / ip6tables-nft and iptables-legacy /
# ip6tables-legacy (plain `iptables` is the nft one; use the node's backend explicitly).
# iproute2: `ip rule` / `ip route` for the fwmark policy route (table 133).
# The build-time checks below fail the build if a backend or ip is missing.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends iptables iproute2 \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/cache/debconf/*-old /var/log/* \
           /usr/share/doc/* /usr/share/man/* /usr/share/info/* /usr/share/locale/* /usr/share/lintian \
 && iptables-nft --version && ip6tables-nft --version \
 && iptables-legacy --version && ip6tables-legacy --version \
 && ip -V
COPY --from=build /out/rmq-agent /usr/local/bin/rmq-agent
COPY --from=build /out/rmq-cni /usr/local/bin/rmq-cni
RUN rmq-agent --version

LABEL org.opencontainers.image.title="rmq-agent" \
      org.opencontainers.image.description="Transparent RocketMQ node agent and its CNI plugin" \
      org.opencontainers.image.licenses="Apache-2.0"

# Root, on purpose, and with nothing but NET_ADMIN and NET_RAW (deploy/daemonset.yaml drops
# every other capability and forbids privilege escalation). A non-root user cannot work here:
# - IP_TRANSPARENT on the capture listener and SO_MARK on upstream sockets are checked against
#   the process's capabilities, and file capabilities on the binary are not honoured once
#   `allowPrivilegeEscalation: false` sets no_new_privs; ambient capabilities for non-root
#   users are not settable from a pod spec;
# - the old and the new agent must share one UID during a hand-over (same SO_REUSEPORT group,
#   and the root-only 0600 hand-off/admin sockets on the node), and the installer writes into
#   the node's root-owned /opt/cni/bin and /etc/cni/net.d.
# UID 0 without capabilities is an ordinary user for everything else (no DAC override, no
# chown, no module loading, no mount).
ENTRYPOINT ["/usr/local/bin/rmq-agent"]
CMD ["run", "--config", "/etc/rmq-agent/agent.toml"]
