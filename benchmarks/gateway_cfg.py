"""The gateway's configuration for a benchmark run, and the SNI names every server routes.

The gateway routes ``<app_id>-<port>.<base>`` (terminate) and ``<app_id>-<port>s.<base>``
(passthrough) to the app's backends at that port; one static route ``bench`` -> 127.0.0.1
makes both names reach the origin. nginx and HAProxy are configured with the very same
names, so every server matches the same SNI.

``access_log = false`` (and ``log_level = "warning"``) turn the gateway's per-connection
access line off, as ``access_log off`` does for nginx and no ``log`` line does for HAProxy.
``max_connections_per_app = 0`` lifts the per-app cap
(default 2 000) for the idle-connection cell. ``session_tickets`` stays at the default
(2, OpenSSL's) for every cell but S2 "full", where it is 0.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from benchmarks.configs import Names, OriginPorts
from benchmarks.tls import CertFiles

DOMAIN = "bench.test"
APP_ID = "bench"


def names_for(origin: OriginPorts) -> Names:
    """The terminate and passthrough SNI names, which carry the origin's ports."""
    return Names(
        domain=DOMAIN,
        term_host=f"{APP_ID}-{origin.http}.{DOMAIN}",
        pass_host=f"{APP_ID}-{origin.tls}s.{DOMAIN}",
    )


def install_cert(certs_dir: Path, cert: CertFiles) -> Path:
    """The gateway's layout: ``certs_dir/<name>/fullchain.pem`` and ``privkey.pem``."""
    target = certs_dir / DOMAIN
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(cert.cert, target / "fullchain.pem")
    shutil.copyfile(cert.key, target / "privkey.pem")
    (target / "privkey.pem").chmod(0o600)
    return certs_dir


def config_toml(
    *, data_dir: Path, certs_dir: Path, port: int, workers: int, tickets: bool, splice: bool = True
) -> str:
    """``tickets=False`` sets ``session_tickets = 0``: no TLS 1.3 tickets, no resumption.

    ``splice=False`` sets ``splice_after = -1`` (passthrough relays stay on recv/send), for
    the optional ``gateway-nosplice`` column; otherwise the gateway's default applies.
    """
    q = json.dumps
    return "\n".join(
        [
            "[core]",
            f"data_dir = {q(str(data_dir))}",
            'log_level = "warning"',
            "[proxy]",
            f"listen = [{q(f'127.0.0.1:{port}')}]",
            f"workers = {workers}",
            f"base_domains = [{q(DOMAIN)}]",
            f"certs_dir = {q(str(certs_dir))}",
            "max_connections_per_app = 0",
            "access_log = false",
            f"session_tickets = {2 if tickets else 0}",
            *([] if splice else ["splice_after = -1"]),
            "[[proxy.routes]]",
            f"app_id = {q(APP_ID)}",
            'backends = ["127.0.0.1"]',
            "",
        ]
    )
