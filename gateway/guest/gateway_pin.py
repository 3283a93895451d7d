"""The CVM's optional pin on the gateway's boot chain and OS image (beyond its app id).

Why: the app id a CVM checks comes from the gateway's RTMR3 event log, which the gateway's
own guest OS writes. A modified OS image on real TDX can write the genuine app id (and the
genuine ``os-image-hash`` event) into RTMR3, so an app-id pin alone admits any TD that
*claims* to be the gateway. What such an image cannot forge are the registers measured
before its code runs: MRTD (the TD's initial memory, the firmware) and RTMR0-2 (firmware
configuration, kernel, kernel command line and initrd, which carries the root filesystem's
dm-verity hash in dstack's images). Pinning those (``os_images``) closes the gap.

The vocabulary is the admission policy's (:mod:`gateway.attest.policy_settings`), so an
operator who already writes ``[admission]`` for CVMs can write the gateway's pin the same
way, and the decision is the same pure :func:`gateway.attest.policy.evaluate`:

* ``os_images``: ``[{name, mrtd, rtmr0, rtmr1, rtmr2}]`` (hex, 48 bytes each): the boot
  chains accepted; **the pin that resists a modified OS**;
* ``os_image_hashes``: OS image hashes (32 bytes hex) from the ``os-image-hash`` event;
  useful to keep honest gateways of other images out, but that event is logged by the
  gateway's own OS, so on its own it is a claim (a warning says so);
* ``compose_hashes``: the gateway app's compose hashes (32 bytes hex), optional.

Keys that make no sense for the gateway are refused: its app id is pinned by
``gateway_app_id`` (so ``app_ids``/``allow_any_app`` are not accepted here), a KMS-issued
gateway certificate carries no quote so a pin always refuses it (``allow_kms_cert``), and
TCB statuses are the ``--allow-tcb-status`` floor already applied during verification.
A pin that pins nothing (no ``os_images`` and no ``os_image_hashes``) is an error rather
than a silent no-op.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from gateway.attest.evidence import RejectReason, VerifiedEvidence
from gateway.attest.policy import Verdict, evaluate
from gateway.attest.policy_settings import TCB_STATUSES, AdmissionPolicy, PolicyError

__all__ = ["PIN_KEYS", "GatewayImagePin", "PinError"]

#: The admission-policy keys a gateway pin may use.
PIN_KEYS = ("os_images", "os_image_hashes", "compose_hashes")


class PinError(ValueError):
    """The pin document is invalid; the message names the key."""


@dataclass(frozen=True, slots=True)
class GatewayImagePin:
    """What the gateway's verified evidence must show besides the pinned app id.

    ``policy`` is an :class:`AdmissionPolicy` that admits any app id (the app id is pinned
    separately, in constant time) and every TCB status (the floor is ``TcbPolicy``, applied
    when the quote is verified), so only the image lists decide, plus the debug-TD refusal
    that :func:`evaluate` always applies.
    """

    policy: AdmissionPolicy

    def __post_init__(self) -> None:
        if not (self.policy.os_images or self.policy.os_image_hashes):
            raise PinError(
                "the gateway pin names no os_images and no os_image_hashes: it would pin "
                "nothing (leave it unset to rely on the app id alone)"
            )

    @classmethod
    def from_json(cls, obj: Any) -> GatewayImagePin:
        """From JSON text or a decoded object; raises :class:`PinError` naming the key."""
        if isinstance(obj, str | bytes):
            try:
                obj = json.loads(obj)
            except (ValueError, RecursionError) as exc:
                raise PinError(f"gateway pin: not JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise PinError("gateway pin: expected a JSON object")
        unknown = sorted(set(obj) - set(PIN_KEYS))
        if unknown:
            raise PinError(
                f"gateway pin: keys {unknown} are not accepted here (allowed: "
                f"{', '.join(PIN_KEYS)}; the app id is pinned by gateway_app_id, TCB "
                "statuses by --allow-tcb-status)"
            )
        try:
            policy = AdmissionPolicy.from_json(
                {**obj, "allow_any_app": True, "allowed_tcb_statuses": list(TCB_STATUSES)}
            )
        except PolicyError as exc:
            raise PinError(f"gateway pin: {exc}") from None
        return cls(policy)

    @property
    def hardware_rooted(self) -> bool:
        """True when boot chains (MRTD + RTMR0-2) are pinned, not only claimed hashes."""
        return bool(self.policy.os_images)

    def check(self, evidence: VerifiedEvidence) -> Verdict:
        """The verdict on a gateway whose quote verified and whose app id is pinned."""
        return evaluate(self.policy, evidence)

    def refuses_kms_certificates(self) -> Verdict:
        """A KMS-issued gateway certificate carries no quote: nothing to compare."""
        return Verdict.reject(
            RejectReason.MEASUREMENT_NOT_ALLOWED,
            "the gateway's OS image is pinned, but a KMS-issued certificate carries no "
            "quote to check it against",
        )

    def describe(self) -> str:
        p = self.policy
        parts = []
        if p.os_images:
            parts.append(f"{len(p.os_images)} boot chain(s) (MRTD+RTMR0-2)")
        if p.os_image_hashes:
            parts.append(f"{len(p.os_image_hashes)} OS image hash(es)")
        if p.compose_hashes:
            parts.append(f"{len(p.compose_hashes)} compose hash(es)")
        return ", ".join(parts)
