"""What one control node runs, decided from the configuration before anything starts.

There is one control process per gateway (``gateway control``, or ``gateway serve``'s control
child), and it may run three things: the registration RPC with the WireGuard tunnel (with an
attested RA-TLS identity or a certificate file), the certbot (``[acme]``), and the admin API.
``gateway serve`` asks :func:`node_roles` whether to start the child at all (and refuses a bad
configuration with exit 2 before anything binds); the child asks again and runs the answer.

The admin API is fail-closed: it is never served without authentication. When it is enabled
but has no credentials:

* nothing is configured (no token in ``admin.token_env``'s variable, no ``token_file``, no
  ``htpasswd_file``) and the node has other work (the RPC and tunnel, or the certbot): that
  work runs and the admin API stays off, with a warning that says so and how to turn it on.
  A gateway node must keep admitting CVMs when an operator forgot a token; it must not
  open an unauthenticated API to do so;
* ``admin.required = true``: that is a configuration error instead (exit 2), for operators
  who would rather not run at all than run without the API;
* credentials are configured but unusable (unreadable file, short token, bad htpasswd): always
  an error, whatever else the node runs; the operator asked for the API;
* nothing else to run: ``gateway control`` refuses (exit 2); ``gateway serve`` runs the
  proxy only (with the same warning).
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.config import Config, ConfigError, env_value
from gateway.control.settings import AdminSettings

__all__ = ["NodeRoles", "credentials_configured", "node_roles", "rpc_identity_kind"]


def rpc_identity_kind(cfg: Config) -> str:
    """Which server identity the RPC presents: ``"attested"`` (``[rpc_identity] tee``, which
    wins when both are set), ``"files"`` (``rpc.cert_file``), or ``""`` (no RPC, no tunnel:
    neither is set, or ``rpc.enabled = false``)."""
    if not cfg.rpc.enabled:
        return ""
    if cfg.rpc_identity.tee:
        return "attested"
    return "files" if cfg.rpc.cert_file else ""


def credentials_configured(settings: AdminSettings) -> bool:
    """Whether the operator configured any admin credential (or explicitly none)."""
    return bool(
        settings.insecure_no_auth
        or settings.token_file is not None
        or settings.htpasswd_file is not None
        or (settings.token_env and env_value(settings.token_env) is not None)
    )


@dataclass(frozen=True, slots=True)
class NodeRoles:
    """The answer of :func:`node_roles`; ``admin_off`` is the warning to log, if any."""

    rpc: str  # "attested", "files" or "" (see rpc_identity_kind)
    admin: bool
    acme: bool
    admin_off: str = ""

    @property
    def runs_anything(self) -> bool:
        return bool(self.rpc) or self.admin or self.acme


def node_roles(cfg: Config) -> NodeRoles:
    """Decide (see the module doc); ConfigError when the configuration must not run."""
    rpc = rpc_identity_kind(cfg)
    acme = cfg.acme.enabled
    admin = cfg.admin
    if not admin.enabled:
        return NodeRoles(rpc, admin=False, acme=acme)
    if credentials_configured(admin):
        from gateway.control.auth import load_credentials  # aiohttp, bcrypt: only when needed

        load_credentials(admin)  # raises when configured but unusable
        return NodeRoles(rpc, admin=True, acme=acme)
    if admin.required:
        raise ConfigError(
            "admin",
            "the admin API is required (admin.required = true) but has no credentials",
            f"set the {admin.token_env} environment variable, admin.token_file or "
            "admin.htpasswd_file",
        )
    others = [w for w, on in (("registration RPC and tunnel", rpc), ("certbot", acme)) if on]
    running = f"the {' and '.join(others)} without it" if others else "the proxy only"
    warning = (
        f"admin API is OFF: no credentials configured (set the {admin.token_env} environment "
        "variable, admin.token_file or admin.htpasswd_file; admin.required = true refuses to "
        f"start instead); running {running}"
    )
    return NodeRoles(rpc, admin=False, acme=acme, admin_off=warning)
