"""The admission policy as data: the ``[admission]`` config section and the admin API's JSON.

A policy is an immutable value. The gateway holds the current one in a single reference and
replaces it whole (from the config at start, from the admin API later); verifications in
flight keep the object they started with. Hex values are normalised to lowercase at
construction and checked for length, so a typo fails at load time, not at admission.

Semantics (see :func:`gateway.attest.policy.evaluate`): an app is admitted when
``allow_any_app`` or its app id is listed, **and** every non-empty list it is checked
against (compose hashes, OS image hashes, OS images) contains its value, **and** its TCB
status is allowed. Debug TDs are never admitted (dcap-qvl refuses them, and so does the
policy, whatever it says). With the defaults
nothing is admitted: naming apps (or ``allow_any_app = true``) is an explicit decision.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

__all__ = ["TCB_STATUSES", "AdmissionPolicy", "OsImage", "PolicyError"]

#: The TCB statuses dcap-qvl reports (``Revoked`` never reaches a policy: it fails).
TCB_STATUSES = (
    "UpToDate",
    "SWHardeningNeeded",
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    "OutOfDate",
    "OutOfDateConfigurationNeeded",
)


class PolicyError(ValueError):
    """A policy document is invalid; the message names the field."""


def _hex_list(values: tuple[str, ...], what: str, sizes: tuple[int, ...]) -> tuple[str, ...]:
    out = []
    for i, v in enumerate(values):
        out.append(_hex_value(v, f"{what}[{i}]", sizes))
    return tuple(dict.fromkeys(out))


def _hex_value(value: str, what: str, sizes: tuple[int, ...]) -> str:
    if not isinstance(value, str):
        raise PolicyError(f"{what}: expected a hex string")
    v = value.lower().removeprefix("0x")
    try:
        raw = bytes.fromhex(v)
    except ValueError:
        raise PolicyError(f"{what}: {value!r} is not hex") from None
    if len(raw) not in sizes or raw.hex() != v:
        want = " or ".join(str(s) for s in sizes)
        raise PolicyError(f"{what}: {value!r} is {len(raw)} bytes, expected {want}")
    return v


@dataclass(frozen=True, slots=True)
class OsImage:
    """One acceptable boot chain: MRTD and RTMR0-2 (hex, 48 bytes each)."""

    mrtd: str
    rtmr0: str
    rtmr1: str
    rtmr2: str
    name: str = ""

    def __post_init__(self) -> None:
        for f in ("mrtd", "rtmr0", "rtmr1", "rtmr2"):
            object.__setattr__(self, f, _hex_value(getattr(self, f), f, (48,)))

    def matches(self, mr_td: bytes, rtmr0: bytes, rtmr1: bytes, rtmr2: bytes) -> bool:
        return (self.mrtd, self.rtmr0, self.rtmr1, self.rtmr2) == (
            mr_td.hex(),
            rtmr0.hex(),
            rtmr1.hex(),
            rtmr2.hex(),
        )


@dataclass(frozen=True, slots=True)
class AdmissionPolicy:
    """Which CVMs may join the tunnel network (the ``[admission]`` section)."""

    # Admit any app id (the other lists still apply). Off: only app_ids are admitted.
    allow_any_app: bool = False
    # App ids (20 bytes, hex).
    app_ids: tuple[str, ...] = ()
    # Compose hashes (32 bytes, hex); empty: any.
    compose_hashes: tuple[str, ...] = ()
    # OS image hashes (32 bytes, hex) as measured by the KMS key provider; empty: any.
    os_image_hashes: tuple[str, ...] = ()
    # Boot chains (MRTD + RTMR0-2); empty: any.
    os_images: tuple[OsImage, ...] = ()
    # TCB statuses accepted from DCAP verification.
    allowed_tcb_statuses: tuple[str, ...] = ("UpToDate",)
    # Admit CVMs that present only a KMS-signed certificate with app info (no quote).
    allow_kms_cert: bool = False

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "app_ids", _hex_list(tuple(self.app_ids), "app_ids", (20,)))
        set_(self, "compose_hashes", _hex_list(tuple(self.compose_hashes), "compose_hashes", (32,)))
        set_(
            self,
            "os_image_hashes",
            _hex_list(tuple(self.os_image_hashes), "os_image_hashes", (32,)),
        )
        set_(self, "os_images", tuple(self.os_images))
        statuses = tuple(dict.fromkeys(self.allowed_tcb_statuses))
        for s in statuses:
            if s not in TCB_STATUSES:
                raise PolicyError(
                    f"allowed_tcb_statuses: {s!r} is not one of {', '.join(TCB_STATUSES)}"
                )
        set_(self, "allowed_tcb_statuses", statuses)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the admin API's representation)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "os_images":
                value = [
                    {
                        "name": i.name,
                        "mrtd": i.mrtd,
                        "rtmr0": i.rtmr0,
                        "rtmr1": i.rtmr1,
                        "rtmr2": i.rtmr2,
                    }
                    for i in value
                ]
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_json(cls, obj: Any) -> AdmissionPolicy:
        """Build from the admin API's JSON (unknown keys refused); raises PolicyError."""
        if isinstance(obj, str | bytes):
            try:
                obj = json.loads(obj)
            except ValueError as exc:
                raise PolicyError(f"policy: not JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise PolicyError("policy: expected a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = set(obj) - known
        if unknown:
            raise PolicyError(f"policy: unknown keys {sorted(unknown)}")
        kwargs: dict[str, Any] = {}
        for name, value in obj.items():
            if name in ("allow_any_app", "allow_kms_cert"):
                if not isinstance(value, bool):
                    raise PolicyError(f"{name}: expected true or false")
                kwargs[name] = value
            elif name == "os_images":
                if not isinstance(value, list):
                    raise PolicyError("os_images: expected a list")
                images = []
                for i, item in enumerate(value):
                    if not isinstance(item, dict) or set(item) - {
                        "name",
                        "mrtd",
                        "rtmr0",
                        "rtmr1",
                        "rtmr2",
                    }:
                        raise PolicyError(f"os_images[{i}]: expected {{name, mrtd, rtmr0-2}}")
                    try:
                        images.append(OsImage(**item))
                    except TypeError as exc:
                        raise PolicyError(f"os_images[{i}]: {exc}") from None
                    except PolicyError as exc:
                        raise PolicyError(f"os_images[{i}].{exc}") from None
                kwargs[name] = tuple(images)
            else:
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise PolicyError(f"{name}: expected a list of strings")
                kwargs[name] = tuple(value)
        return cls(**kwargs)
