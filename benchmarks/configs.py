"""Configuration text for every server in a benchmark run (pure functions, no I/O).

Every proxy gets the same job: on one port, terminate TLS for ``<term_host>`` with the
wildcard certificate and relay HTTP/1.1 to the origin's plain-HTTP port; on another port (or
the same, for the gateway, which decides by SNI), pass TLS for ``<pass_host>`` through to the
origin's TLS port after reading the SNI from the ClientHello. Unknown names are refused.
Access logs are off everywhere; worker counts are equal; idle timeouts are long enough
(300 s) for the idle-connection memory cell.

``tickets=False`` turns TLS session tickets and session caches off (S2 "full": every
reconnect is a full handshake because the server gives the client nothing to resume).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from benchmarks.tls import CertFiles

SMALL_BODY = b"x" * 100  # the small response body
LARGE_SIZE = 1 << 20  # 1 MiB
SMALL_PATH = "/small"
LARGE_PATH = "/1m"


HAPROXY_PIPES = 256


def connection_limit(nofile: int) -> int:
    """Connections a server may hold with ``nofile`` descriptors (each may need an upstream)."""
    return max(1024, nofile - 256)


@dataclass(frozen=True, slots=True)
class Names:
    """The SNI names a run uses. Both are under the wildcard certificate's domain."""

    domain: str
    term_host: str
    pass_host: str


@dataclass(frozen=True, slots=True)
class OriginPorts:
    http: int  # plain HTTP, the terminate upstream
    tls: int  # TLS (own certificate), the passthrough upstream and the direct baseline
    tls_no_tickets: int  # the same TLS server without tickets or session cache (direct, S2f)


def origin_nginx(
    prefix: Path, ports: OriginPorts, cert: CertFiles, www: Path, *, nofile: int, workers: int = 1
) -> str:
    """The origin: one nginx serving /small (100 B) and /1m (1 MiB file) on HTTP and TLS."""
    body = SMALL_BODY.decode()
    locations = f"""
        location = {SMALL_PATH} {{ return 200 "{body}"; }}
        location = {LARGE_PATH} {{ root {www}; }}
        location / {{ return 404; }}"""
    return f"""\
worker_processes {workers};
daemon off;
master_process on;
pid {prefix}/origin.pid;
error_log {prefix}/origin-error.log warn;
worker_rlimit_nofile {nofile};
events {{ worker_connections {connection_limit(nofile)}; }}
http {{
    access_log off;
    {_nginx_temp_paths(prefix, "origin")}
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    client_header_timeout 300s;
    server {{
        listen 127.0.0.1:{ports.http} backlog=4096;
        {locations}
    }}
    server {{
        listen 127.0.0.1:{ports.tls} ssl backlog=4096;
        ssl_certificate {cert.cert};
        ssl_certificate_key {cert.key};
        ssl_protocols TLSv1.2 TLSv1.3;
        {locations}
    }}
    server {{
        listen 127.0.0.1:{ports.tls_no_tickets} ssl backlog=4096;
        ssl_certificate {cert.cert};
        ssl_certificate_key {cert.key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_tickets off;
        ssl_session_cache off;
        {locations}
    }}
}}
"""


def _nginx_temp_paths(prefix: Path, name: str) -> str:
    # keep every instance's files in the run's temp dir, away from /var/lib/nginx
    return " ".join(
        f"{kind}_temp_path {prefix}/{name}-{kind}-temp;"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )


def nginx_proxy(
    prefix: Path,
    *,
    names: Names,
    term_port: int,
    pass_port: int,
    origin: OriginPorts,
    cert: CertFiles,
    stream_module: Path,
    workers: int,
    tickets: bool,
    nofile: int,
) -> str:
    """nginx as the comparator: http{} terminates, stream{} with ssl_preread passes through.

    Terminate: upstream keep-alive to the origin, route chosen from ``$ssl_server_name``
    (421 for any other name). Responses are buffered in memory only (1 MiB of buffers,
    ``proxy_max_temp_file_size 0``), so 1 MiB bodies never touch the disk.
    Passthrough: ``$ssl_preread_server_name`` picks the origin's TLS port; other names go to
    a closed port and the connection is dropped.
    """
    session = (
        "ssl_session_tickets on;" if tickets else "ssl_session_tickets off; ssl_session_cache off;"
    )
    return f"""\
load_module {stream_module};
worker_processes {workers};
daemon off;
master_process on;
pid {prefix}/nginx.pid;
error_log {prefix}/nginx-error.log warn;
worker_rlimit_nofile {nofile};
events {{ worker_connections {connection_limit(nofile)}; }}
http {{
    access_log off;
    {_nginx_temp_paths(prefix, "nginx")}
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    client_header_timeout 300s;
    upstream origin_http {{
        server 127.0.0.1:{origin.http};
        keepalive 128;
        keepalive_requests 10000000;
    }}
    map $ssl_server_name $bench_route {{
        {names.term_host} origin_http;
        default "";
    }}
    server {{
        listen 127.0.0.1:{term_port} ssl backlog=4096;
        server_name *.{names.domain};
        ssl_certificate {cert.cert};
        ssl_certificate_key {cert.key};
        ssl_protocols TLSv1.2 TLSv1.3;
        {session}
        location / {{
            if ($bench_route = "") {{ return 421; }}
            proxy_pass http://$bench_route;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffers 16 64k;
            proxy_busy_buffers_size 128k;
            proxy_max_temp_file_size 0;
        }}
    }}
}}
stream {{
    map $ssl_preread_server_name $bench_pass {{
        {names.pass_host} 127.0.0.1:{origin.tls};
        default 127.0.0.1:9;
    }}
    server {{
        listen 127.0.0.1:{pass_port} backlog=4096;
        ssl_preread on;
        proxy_pass $bench_pass;
        proxy_connect_timeout 5s;
        proxy_timeout 300s;
    }}
}}
"""


def haproxy(
    *,
    names: Names,
    term_port: int,
    pass_port: int,
    origin: OriginPorts,
    cert: CertFiles,
    workers: int,
    tickets: bool,
    nofile: int,
) -> str:
    """HAProxy 2.6: ``mode http`` TLS termination and ``req.ssl_sni`` passthrough.

    Workers are threads (``nbthread``), HAProxy's model. Upstream connections are reused
    (``http-reuse always``). Passthrough uses ``option splice-auto`` (HAProxy's own kernel
    splicing), the closest analogue of the gateway's splice relay. HAProxy sizes its fd
    table as 2 x ``maxconn`` + 2 x ``maxpipes`` (pipes for splicing), so both are derived
    from the descriptor limit.
    """
    no_tickets = " no-tls-tickets" if not tickets else ""
    cache = "" if tickets else "    tune.ssl.cachesize 0\n"
    return f"""\
global
    nbthread {workers}
    maxpipes {HAPROXY_PIPES}
    maxconn {(connection_limit(nofile) - 2 * HAPROXY_PIPES) // 2}
{cache}
defaults
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    timeout http-request 300s
    timeout http-keep-alive 300s
    timeout client-fin 5s
    timeout server-fin 5s

frontend terminate
    mode http
    bind 127.0.0.1:{term_port} ssl crt {cert.combined} ssl-min-ver TLSv1.2{no_tickets}
    http-request return status 421 unless {{ ssl_fc_sni -i {names.term_host} }}
    use_backend origin_http if {{ ssl_fc_sni -i {names.term_host} }}

backend origin_http
    mode http
    http-reuse always
    server origin 127.0.0.1:{origin.http}

frontend passthrough
    mode tcp
    bind 127.0.0.1:{pass_port}
    tcp-request inspect-delay 5s
    tcp-request content accept if {{ req.ssl_hello_type 1 }}
    use_backend origin_tls if {{ req.ssl_sni -i {names.pass_host} }}

backend origin_tls
    mode tcp
    option splice-auto
    server origin 127.0.0.1:{origin.tls}
"""
