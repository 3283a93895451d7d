from __future__ import annotations

import json

import pytest

from gateway.attest.eventlog import AppIdentity
from gateway.attest.evidence import EvidenceMethod, Measurements, RejectReason, VerifiedEvidence
from gateway.attest.policy import Verdict, evaluate
from gateway.attest.policy_settings import AdmissionPolicy, OsImage, PolicyError

APP = "5bb4ff9a3837357f19dc176407a5709c62eb6c56"
COMPOSE = "c143116fef3940e7f776bfc0919c256232ae5338a6e948c96b711e0b2383483a"
OS_HASH = "e61be43dd1cc6a6f5edefd7c51b608983780839b0000ce60dd99737dcffe09b9"
MRTD, R0, R1, R2 = (bytes([i]) * 48 for i in (1, 2, 3, 4))
IMAGE = OsImage(mrtd=MRTD.hex(), rtmr0=R0.hex(), rtmr1=R1.hex(), rtmr2=R2.hex(), name="img")


def evidence(
    *,
    method: EvidenceMethod = EvidenceMethod.RATLS,
    tcb: str | None = "UpToDate",
    debug: bool = False,
    app: str = APP,
    mrtd: bytes = MRTD,
) -> VerifiedEvidence:
    ident = AppIdentity(
        app_id=bytes.fromhex(app),
        compose_hash=bytes.fromhex(COMPOSE),
        instance_id=b"\x16" * 20,
        os_image_hash=bytes.fromhex(OS_HASH),
        key_provider=None,
        key_provider_payload=b"",
        boot_rtmr3=b"",
        rtmr3=b"",
    )
    m = Measurements(
        mrtd,
        R0,
        R1,
        R2,
        bytes(48),
        bytes(48),
        bytes(48),
        bytes(48),
        bytes([1 if debug else 0, 0, 0, 0x10, 0, 0, 0, 0]),
        bytes(64),
    )
    kms = method is EvidenceMethod.KMS_CERT
    return VerifiedEvidence(method, ident, None if kms else m, None if kms else tcb, (), b"", b"")


ALLOW_APP = AdmissionPolicy(app_ids=(APP,))


@pytest.mark.parametrize(
    ("policy", "ev", "reason"),
    [
        (ALLOW_APP, evidence(), None),
        (AdmissionPolicy(), evidence(), RejectReason.APP_NOT_ALLOWED),
        (AdmissionPolicy(allow_any_app=True), evidence(app="11" * 20), None),
        (ALLOW_APP, evidence(app="11" * 20), RejectReason.APP_NOT_ALLOWED),
        (ALLOW_APP, evidence(debug=True), RejectReason.DEBUG_TD),
        (ALLOW_APP, evidence(tcb="OutOfDate"), RejectReason.TCB_STATUS),
        (
            AdmissionPolicy(app_ids=(APP,), allowed_tcb_statuses=("UpToDate", "OutOfDate")),
            evidence(tcb="OutOfDate"),
            None,
        ),
        (AdmissionPolicy(app_ids=(APP,), compose_hashes=(COMPOSE,)), evidence(), None),
        (
            AdmissionPolicy(app_ids=(APP,), compose_hashes=("00" * 32,)),
            evidence(),
            RejectReason.COMPOSE_NOT_ALLOWED,
        ),
        (
            AdmissionPolicy(allow_any_app=True, os_image_hashes=("00" * 32,)),
            evidence(),
            RejectReason.OS_IMAGE_NOT_ALLOWED,
        ),
        (AdmissionPolicy(app_ids=(APP,), os_images=(IMAGE,)), evidence(), None),
        (
            AdmissionPolicy(app_ids=(APP,), os_images=(IMAGE,)),
            evidence(mrtd=bytes(48)),
            RejectReason.MEASUREMENT_NOT_ALLOWED,
        ),
        (ALLOW_APP, evidence(method=EvidenceMethod.KMS_CERT), RejectReason.KMS_CERT_NOT_ALLOWED),
        (
            AdmissionPolicy(app_ids=(APP,), allow_kms_cert=True),
            evidence(method=EvidenceMethod.KMS_CERT),
            None,
        ),
        (
            AdmissionPolicy(app_ids=(APP,), allow_kms_cert=True, os_images=(IMAGE,)),
            evidence(method=EvidenceMethod.KMS_CERT),
            RejectReason.MEASUREMENT_NOT_ALLOWED,
        ),
    ],
)
def test_evaluate(
    policy: AdmissionPolicy, ev: VerifiedEvidence, reason: RejectReason | None
) -> None:
    verdict = evaluate(policy, ev)
    assert verdict.accepted is (reason is None)
    assert verdict.reason is reason
    assert verdict.detail  # always a sentence


def test_debug_is_refused_even_under_the_loosest_policy() -> None:
    loose = AdmissionPolicy(
        allow_any_app=True,
        allowed_tcb_statuses=tuple(
            "UpToDate SWHardeningNeeded ConfigurationNeeded OutOfDate".split()
        ),
    )
    assert evaluate(loose, evidence(debug=True)).reason is RejectReason.DEBUG_TD


def test_policy_json_round_trip_and_normalisation() -> None:
    p = AdmissionPolicy(
        app_ids=(APP.upper(), APP),
        compose_hashes=("0x" + COMPOSE,),
        os_images=(IMAGE,),
        allowed_tcb_statuses=("UpToDate", "SWHardeningNeeded"),
    )
    assert p.app_ids == (APP,) and p.compose_hashes == (COMPOSE,)
    doc = json.loads(json.dumps(p.to_json()))
    assert AdmissionPolicy.from_json(doc) == p
    assert AdmissionPolicy.from_json(json.dumps(doc)) == p


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        ({"app_id": []}, "unknown keys"),
        ({"app_ids": ["zz"]}, "not hex"),
        ({"app_ids": ["00" * 19]}, "19 bytes"),
        ({"allow_any_app": "yes"}, "true or false"),
        ({"allowed_tcb_statuses": ["Revoked"]}, "not one of"),
        ({"os_images": [{"mrtd": "00"}]}, "os_images"),
        (
            {"os_images": [{"mrtd": "00" * 48, "rtmr0": "", "rtmr1": "", "rtmr2": "", "x": 1}]},
            "os_images",
        ),
        ([], "JSON object"),
        ("{", "not JSON"),
    ],
)
def test_bad_policy_documents(doc: object, match: str) -> None:
    with pytest.raises(PolicyError, match=match):
        AdmissionPolicy.from_json(doc)


def test_verdict_json() -> None:
    v = Verdict.reject(RejectReason.DEBUG_TD, "no")
    assert v.to_json() == {
        "accepted": False,
        "reason": "debug_td",
        "detail": "no",
        "quote_reason": None,
    }
