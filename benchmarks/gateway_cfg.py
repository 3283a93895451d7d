"""The gateway's configuration for a benchmark run, and the SNI names every server routes.

Placeholder until the proxy's configuration format lands: the names are final, the TOML is
filled in from ``gateway/proxy/settings.py`` once ``gateway serve`` exists.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.configs import OriginPorts
from benchmarks.tls import CertFiles

DOMAIN = "bench.test"
TERM_HOST = f"app.{DOMAIN}"
PASS_HOST = f"pass.{DOMAIN}"


def config_toml(
    *, data_dir: Path, port: int, origin: OriginPorts, cert: CertFiles, workers: int, tickets: bool
) -> str:
    raise NotImplementedError("the gateway's proxy configuration is not known yet")
