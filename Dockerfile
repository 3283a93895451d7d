# The gateway as a CVM app: a slim image with the locked environment, wireguard-go and iproute2.
#
#   docker build -t gateway .
#   docker run --cap-add NET_ADMIN --device /dev/net/tun \
#     --sysctl net.ipv4.ip_unprivileged_port_start=0 \
#     -v /path/to/gateway.toml:/etc/gateway/gateway.toml:ro -v gateway-data:/var/lib/gateway \
#     -p 443:443 -p 8000:8000 -p 51820:51820/udp gateway
#
# The process runs as the unprivileged user `gateway`. The only privileged steps are done by
# two helper binaries given file capabilities: wireguard-go (creates the TUN interface) and
# ip (addresses, links, routes) get CAP_NET_ADMIN; the container must be granted NET_ADMIN so
# that those file capabilities fit in its bounding set. Binding 443 as non-root uses the
# unprivileged-port sysctl above instead of giving the Python interpreter a capability.

FROM python:3.11-slim-bookworm AS build
RUN pip install --no-cache-dir uv
WORKDIR /app
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-dev --no-install-project
COPY gateway ./gateway
RUN uv sync --frozen --no-dev --no-editable

FROM python:3.11-slim-bookworm
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      wireguard-go wireguard-tools iproute2 nftables ca-certificates libcap2-bin \
 && setcap cap_net_admin+ep "$(readlink -f "$(command -v wireguard-go)")" \
 && setcap cap_net_admin+ep "$(readlink -f "$(command -v ip)")" \
 && apt-get purge -y libcap2-bin && apt-get autoremove -y && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/gateway --shell /usr/sbin/nologin gateway \
 && mkdir -p /var/lib/gateway /etc/gateway /var/run/wireguard \
 && chown gateway:gateway /var/lib/gateway /var/run/wireguard
COPY --from=build /app/.venv /app/.venv
COPY config/gateway.example.toml /etc/gateway/gateway.toml
ENV PATH=/app/.venv/bin:$PATH PYTHONUNBUFFERED=1
USER gateway
WORKDIR /var/lib/gateway
EXPOSE 443 8000 8001 51820/udp
ENTRYPOINT ["python", "-m", "gateway"]
CMD ["serve", "--config", "/etc/gateway/gateway.toml"]
