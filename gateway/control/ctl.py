"""``gateway ctl``: the operator CLI, driven by the admin API's own OpenAPI document.

Every endpoint the admin API serves becomes ``gateway ctl <tag> <action> [PATH-PARAMS...]``
without a line of code here, so the CLI cannot fall behind the API. Output is a human table
by default and the raw JSON with ``--json`` (for scripts).

Credentials: a token from the environment variable named by ``--token-env`` (default
``GATEWAY_ADMIN_TOKEN``); it is sent as ``X-Admin-Token`` and never printed.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import httpx

from gateway.config import env_value

OPENAPI_PATH = "/api/v1/openapi.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url", default="http://127.0.0.1:8001", help="admin API base URL (default %(default)s)"
    )
    parser.add_argument("--unix", metavar="PATH", help="admin API unix socket (overrides --url)")
    parser.add_argument(
        "--token-env",
        default="GATEWAY_ADMIN_TOKEN",
        help="environment variable holding the admin token (default %(default)s)",
    )
    parser.add_argument("--json", action="store_true", help="print raw JSON")
    parser.add_argument("--data", help="JSON request body (for add/set/update actions)")
    parser.add_argument(
        "--if-match",
        metavar="ETAG",
        help="only change the resource if it is still at this revision (its ETag); else 412",
    )
    parser.add_argument(
        "words",
        nargs="*",
        metavar="TAG ACTION [PARAM...]",
        help="e.g. `status get`, `instances list`, `commands` to list all",
    )


def _client(args: argparse.Namespace) -> httpx.Client:
    headers = {}
    token = env_value(args.token_env)
    if token:
        headers["X-Admin-Token"] = token
    if args.unix:
        return httpx.Client(
            base_url="http://admin",
            headers=headers,
            transport=httpx.HTTPTransport(uds=args.unix),
            timeout=30,
        )
    return httpx.Client(base_url=args.url, headers=headers, timeout=30)


def _commands(doc: dict[str, Any]) -> dict[tuple[str, str], tuple[str, str, dict[str, Any]]]:
    out: dict[tuple[str, str], tuple[str, str, dict[str, Any]]] = {}
    for path, ops in doc.get("paths", {}).items():
        for method, op in ops.items():
            tag = op.get("tags", ["misc"])[0]
            out[(tag, op.get("x-cli-action", method))] = (method.upper(), path, op)
    return out


def render(data: Any) -> str:
    """A human rendering: tables for lists of objects, aligned keys for objects."""
    if isinstance(data, list) and data and all(isinstance(r, dict) for r in data):
        cols = list(dict.fromkeys(k for row in data for k in row))
        cells = [[_cell(row.get(c)) for c in cols] for row in data]
        widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
        lines = ["  ".join(c.upper().ljust(w) for c, w in zip(cols, widths, strict=True))]
        lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
        return "\n".join(line.rstrip() for line in lines)
    if isinstance(data, dict):
        if not data:
            return "(empty)"
        width = max(len(str(k)) for k in data)
        return "\n".join(f"{str(k).ljust(width)}  {_cell(v)}" for k, v in data.items())
    if isinstance(data, list):
        return "(none)" if not data else "\n".join(_cell(v) for v in data)
    return _cell(data)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def run(args: argparse.Namespace) -> int:
    try:
        with _client(args) as client:
            resp = client.get(OPENAPI_PATH)
            if resp.status_code != 200:
                return _fail(resp)
            commands = _commands(resp.json())
            if not args.words or args.words == ["commands"]:
                for (tag, action), (method, path, op) in sorted(commands.items()):
                    print(f"{tag} {action}".ljust(32), f"{method} {path}  {op.get('summary', '')}")
                return 0
            if len(args.words) < 2 or (args.words[0], args.words[1]) not in commands:
                print(
                    f"error: unknown command {' '.join(args.words[:2])!r}; "
                    "run `gateway ctl commands` to list them",
                    file=sys.stderr,
                )
                return 2
            method, path, op = commands[(args.words[0], args.words[1])]
            params = [p["name"] for p in op.get("parameters", []) if p.get("in") == "path"]
            values = args.words[2:]
            if len(values) != len(params):
                print(
                    f"error: {args.words[0]} {args.words[1]} takes {len(params)} argument(s): "
                    f"{' '.join(p.upper() for p in params) or '(none)'}",
                    file=sys.stderr,
                )
                return 2
            for name, value in zip(params, values, strict=True):
                path = path.replace("{" + name + "}", value)
            body = None
            if args.data is not None:
                try:
                    body = json.loads(args.data)
                except json.JSONDecodeError as exc:
                    print(f"error: --data is not valid JSON: {exc}", file=sys.stderr)
                    return 2
            headers = {"If-Match": args.if_match} if args.if_match else {}
            resp = client.request(method, path, json=body, headers=headers)
    except httpx.HTTPError as exc:
        print(
            f"error: cannot reach the admin API: {exc}; check --url/--unix and that "
            "the gateway runs",
            file=sys.stderr,
        )
        return 1
    if resp.status_code >= 400:
        return _fail(resp)
    data = (
        resp.json()
        if resp.headers.get("content-type", "").startswith("application/json")
        else resp.text
    )
    print(json.dumps(data, indent=2) if args.json else render(data))
    if etag := resp.headers.get("ETag"):
        print(f"etag: {etag}", file=sys.stderr)
    return 0


def _fail(resp: httpx.Response) -> int:
    try:
        detail = resp.json().get("detail", resp.text)
    except ValueError:
        detail = resp.text
    hint = " (set the token with --token-env)" if resp.status_code == 401 else ""
    print(f"error: HTTP {resp.status_code}: {detail}{hint}", file=sys.stderr)
    return 1
