"""Build DNS providers from ``[dns.credentials.<name>]``, reading secrets only here.

Secrets come from an environment variable (through ``gateway.config.env_value``, the one
sanctioned read of the environment) or from a file; they are never logged or echoed, and an
error names the variable or file to fix, not the value.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from gateway.certs.dns.base import DnsProvider, parse_server
from gateway.certs.dns.cloudflare import CloudflareProvider
from gateway.certs.dns.rfc2136 import Rfc2136Provider
from gateway.certs.errors import CertError
from gateway.certs.settings import DnsCredential
from gateway.config import env_value

__all__ = ["build_provider", "build_providers", "read_secret"]


def read_secret(
    env_name: str, file_name: str, what: str, env: Callable[[str], str | None] = env_value
) -> str:
    """The secret from ``env_name`` or ``file_name`` (whitespace stripped); CertError if absent."""
    if env_name:
        value = env(env_name)
        if not value:
            raise CertError(f"environment variable {env_name} ({what}) is not set or empty")
        return value.strip()
    try:
        value = Path(file_name).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise CertError(f"cannot read {what} from {file_name}: {exc.strerror}") from None
    if not value:
        raise CertError(f"{file_name} ({what}) is empty")
    return value


def build_provider(
    name: str, cred: DnsCredential, env: Callable[[str], str | None] = env_value
) -> DnsProvider:
    """One provider for the credential called ``name``."""
    checks = tuple(parse_server(s, cred.check_port) for s in cred.check_servers)
    what = f"dns.credentials.{name}"
    if cred.kind == "rfc2136":
        secret = read_secret(
            cred.tsig_secret_env, cred.tsig_secret_file, f"{what} TSIG secret", env
        )
        try:
            return Rfc2136Provider(
                server=cred.server,
                port=cred.port,
                zone=cred.zone,
                key_name=cred.tsig_key_name,
                secret_b64=secret,
                algorithm=cred.tsig_algorithm,
                ttl=cred.ttl,
                check_port=cred.check_port,
                check_servers=checks,
                label=name,
            )
        except (ValueError, TypeError) as exc:  # e.g. the secret is not base64
            raise CertError(f"{what}: unusable TSIG key ({type(exc).__name__})") from None
    token = read_secret(cred.token_env, cred.token_file, f"{what} API token", env)
    return CloudflareProvider(
        api_url=cred.api_url, token=token, ttl=cred.ttl, check_servers=checks, label=name
    )


def build_providers(
    creds: Mapping[str, DnsCredential], env: Callable[[str], str | None] = env_value
) -> dict[str, DnsProvider]:
    return {name: build_provider(name, cred, env) for name, cred in creds.items()}
