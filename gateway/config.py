"""One TOML file -> frozen dataclasses, validated before anything binds a port.

Each subsystem declares its own section as a frozen dataclass in ``gateway/<pkg>/settings.py``;
this module owns only the generic decoder and the top-level :class:`Config` that composes them.
Decoding is driven by the dataclasses' type hints, so a section is declared once and its
defaults are the documented defaults (``config/gateway.example.toml`` mirrors them).

Errors name the key path (``proxy.listen[1].port``), say what was expected and, where it
helps, give a hint ("did you mean ``timeouts``?"). A ``__post_init__`` that raises
``ValueError`` is reported the same way, at the path of the section that raised it.

This is also the only module that reads the process environment (see :func:`env_value`).
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import ipaddress
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["Config", "ConfigError", "decode", "env_value", "load_config", "parse_config"]


class ConfigError(Exception):
    """A configuration problem, with the key path where it was found and a hint to fix it."""

    def __init__(self, path: str, message: str, hint: str | None = None) -> None:
        self.path = path
        self.message = message
        self.hint = hint
        text = f"{path}: {message}" if path else message
        if hint:
            text += f" (hint: {hint})"
        super().__init__(text)


def env_value(name: str) -> str | None:
    """The one sanctioned read of the process environment (for secrets such as admin tokens)."""
    return os.environ.get(name)


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _decode_value(tp: Any, value: Any, path: str) -> Any:  # noqa: C901 - one dispatch table
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors: list[ConfigError] = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _decode_value(arg, value, path)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(path, f"expected {_type_name(tp)}, got {type(value).__name__}")
    if origin is typing.Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(path, f"{value!r} is not one of {choices}")
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(path, f"expected a list, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_decode_value(args[0], v, _join(path, i)) for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(path, f"expected a list of {len(args)} items, got {len(value)}")
        return tuple(
            _decode_value(a, v, _join(path, i))
            for i, (a, v) in enumerate(zip(args, value, strict=True))
        )
    if origin in (dict, Mapping, typing.Mapping):
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a table, got {type(value).__name__}")
        key_tp, val_tp = args or (str, Any)
        return types.MappingProxyType(
            {
                _decode_value(key_tp, k, path): _decode_value(val_tp, v, _join(path, str(k)))
                for k, v in value.items()
            }
        )
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return decode(tp, value, path)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            choices = ", ".join(repr(m.value) for m in tp)
            raise ConfigError(path, f"{value!r} is not one of {choices}") from None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(path, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(path, f"expected a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, str):
            raise ConfigError(path, f"expected a file path string, got {value!r}")
        return Path(value)
    if tp in (ipaddress.IPv4Network, ipaddress.IPv6Network):
        try:
            return tp(value)
        except (ValueError, TypeError) as exc:
            raise ConfigError(path, f"invalid network {value!r}: {exc}") from None
    if tp in (ipaddress.IPv4Address, ipaddress.IPv6Address):
        try:
            return tp(value)
        except (ValueError, TypeError) as exc:
            raise ConfigError(path, f"invalid address {value!r}: {exc}") from None
    raise ConfigError(path, f"unsupported type {_type_name(tp)} in the config model (a bug)")


def decode(cls: type[T], data: Any, path: str = "") -> T:
    """Build the dataclass ``cls`` from a parsed TOML table, checking keys and types.

    Raises :class:`ConfigError` naming the first bad key path.
    """
    if not isinstance(data, dict):
        raise ConfigError(path, f"expected a table, got {type(data).__name__}")
    assert dataclasses.is_dataclass(cls)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    known = {name.replace("_", "-"): name for name in fields} | {name: name for name in fields}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        name = known.get(key)
        if name is None:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(fields)}"
            raise ConfigError(_join(path, key), "unknown key", hint)
        kwargs[name] = _decode_value(hints[name], value, _join(path, key))
    for name, f in fields.items():
        if (
            name not in kwargs
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ):
            raise ConfigError(_join(path, name), "required key is missing")
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise ConfigError(path, str(exc)) from None


# --- the top-level model -------------------------------------------------------------------
# Sections are imported from their packages; each package owns its settings module.

from gateway.attest.policy_settings import AdmissionPolicy  # noqa: E402
from gateway.attest.settings import AttestSettings  # noqa: E402
from gateway.certs.settings import AcmeSettings, DnsSettings, resolve_certs_dir  # noqa: E402
from gateway.control.auth_webhook_settings import AuthWebhookSettings  # noqa: E402
from gateway.control.registration_settings import RpcSettings  # noqa: E402
from gateway.control.rpc_identity_settings import RpcIdentitySettings  # noqa: E402
from gateway.control.settings import AdminSettings  # noqa: E402
from gateway.proxy.settings import ProxySettings  # noqa: E402
from gateway.registry.settings import RegistrySettings  # noqa: E402
from gateway.settings import CoreSettings  # noqa: E402
from gateway.tunnel.settings import WgSettings  # noqa: E402


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    """The whole gateway configuration. Every section has defaults: an empty file is valid."""

    core: CoreSettings = dataclasses.field(default_factory=CoreSettings)
    admin: AdminSettings = dataclasses.field(default_factory=AdminSettings)
    acme: AcmeSettings = dataclasses.field(default_factory=AcmeSettings)
    dns: DnsSettings = dataclasses.field(default_factory=DnsSettings)
    wg: WgSettings = dataclasses.field(default_factory=WgSettings)
    registry: RegistrySettings = dataclasses.field(default_factory=RegistrySettings)
    rpc: RpcSettings = dataclasses.field(default_factory=RpcSettings)
    rpc_identity: RpcIdentitySettings = dataclasses.field(default_factory=RpcIdentitySettings)
    attest: AttestSettings = dataclasses.field(default_factory=AttestSettings)
    admission: AdmissionPolicy = dataclasses.field(default_factory=AdmissionPolicy)
    auth_webhook: AuthWebhookSettings = dataclasses.field(default_factory=AuthWebhookSettings)
    proxy: ProxySettings = dataclasses.field(default_factory=ProxySettings)

    def __post_init__(self) -> None:
        # An empty proxy.certs_dir follows core.data_dir (where the certbot writes). Resolved
        # once here, so every holder of ``config.proxy`` (the supervisor) has the real path;
        # a later ``replace(config, core=...)`` keeps it (set proxy.certs_dir explicitly then).
        certs = resolve_certs_dir(self.proxy.certs_dir, self.core.data_dir)
        if certs != self.proxy.certs_dir:
            object.__setattr__(self, "proxy", dataclasses.replace(self.proxy, certs_dir=certs))


def parse_config(text: str, source: str = "<string>") -> Config:
    """Parse TOML text into a :class:`Config`; raises :class:`ConfigError`."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            "", f"{source} is not valid TOML: {exc}", "check quoting and brackets"
        ) from None
    return decode(Config, data)


def load_config(path: Path | None) -> Config:
    """Load the configuration file at ``path`` (``None``: embedded defaults)."""
    if path is None:
        return Config()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            "", f"config file {path} does not exist", "copy config/gateway.example.toml and edit it"
        ) from None
    except OSError as exc:
        raise ConfigError("", f"cannot read config file {path}: {exc.strerror}") from None
    return parse_config(text, str(path))
