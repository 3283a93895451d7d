"""``gateway certs``: operate the certificate plane from a shell (no running gateway needed).

* ``gateway certs -c FILE renew [--domain D] [--force]`` issues missing or due certificates
  (or re-issues with ``--force``) into ``certs_dir``; exit 1 if any domain failed.
* ``gateway certs -c FILE status`` shows what is served and when it expires.
* ``gateway certs -c FILE acme-info`` prints the ``/acme-info`` JSON document.
* ``gateway certs -c FILE resolve DOMAIN`` shows which app a custom domain routes to.

A running gateway does the same work on its own schedule; this command is for the first
certificate, for checks, and for scripts. Output is JSON on stdout; logs go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", type=Path, required=True, help="the gateway TOML file")
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    renew = sub.add_parser("renew", help="issue missing or due certificates now")
    renew.add_argument("--domain", action="append", help="only this base domain (repeatable)")
    renew.add_argument("--force", action="store_true", help="re-issue even if not due")
    sub.add_parser("status", help="served certificates and their expiry")
    sub.add_parser("acme-info", help="the /acme-info JSON document")
    resolve = sub.add_parser("resolve", help="look up a custom domain's app address")
    resolve.add_argument("domain")


async def _renew(args: argparse.Namespace, bot: Any) -> tuple[list[dict[str, Any]], bool]:
    from gateway.certs.errors import CertError, DnsProviderError, IssuanceError

    out: list[dict[str, Any]] = []
    ok = True
    for domain in args.domain or bot.domains:
        try:
            result = await bot.renew_now(domain, force=args.force)
            out.append(dataclasses.asdict(result))
        except CertError as exc:
            ok = False
            entry: dict[str, Any] = {"domain": domain, "error": str(exc)}
            if isinstance(exc, IssuanceError):
                entry["problem"] = exc.problem
            if isinstance(exc, DnsProviderError):
                entry["zone"], entry["rcode"] = exc.zone, exc.rcode
            out.append(entry)
    return out, ok


def run(args: argparse.Namespace) -> int:
    from gateway.certs.certbot import Certbot
    from gateway.certs.custom_domains import AppAddressResolver
    from gateway.certs.errors import CertError
    from gateway.config import ConfigError, load_config
    from gateway.util.logs import setup_logging

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    setup_logging(cfg.core.log_level, cfg.core.log_format)

    if args.action == "resolve":
        resolver = AppAddressResolver(cfg.dns.resolver)
        result = asyncio.run(resolver.resolve(args.domain))
        print(json.dumps({"type": type(result).__name__, **dataclasses.asdict(result)}))
        return 0 if type(result).__name__ == "AppAddress" else 1

    try:
        bot = Certbot.from_config(cfg, on_change=lambda: None)
    except (CertError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.action == "status":
        print(json.dumps([dataclasses.asdict(s) for s in bot.status()], indent=2))
        return 0
    if args.action == "acme-info":
        print(json.dumps(bot.acme_info(), indent=2))
        return 0
    unknown = set(args.domain or ()) - set(bot.domains)
    if unknown:
        print(f"error: not configured in [[acme.domains]]: {sorted(unknown)}", file=sys.stderr)
        return 2

    async def go() -> tuple[list[dict[str, Any]], bool]:
        try:
            return await _renew(args, bot)
        finally:
            await bot.close()

    results, ok = asyncio.run(go())
    print(json.dumps(results, indent=2))
    return 0 if ok else 1
