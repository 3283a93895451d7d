from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from gateway.control.metrics import Family, Histogram, Sample, render


def parse(text: str) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    out: dict[str, list[tuple[str, dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        out[fam.name] = [(s.name, s.labels, s.value) for s in fam.samples]
    return out


def test_counter_gauge_histogram_parse_with_the_reference_parser() -> None:
    text = render(
        [
            Family(
                "gw_connections_total",
                "counter",
                "Accepted connections",
                [Sample({"mode": "terminate"}, 10), Sample({"mode": "passthrough"}, 2)],
            ),
            Family(
                "gw_cert_expiry_seconds",
                "gauge",
                "Seconds until expiry",
                [Sample({"domain": "a.test"}, 86400.5)],
            ),
            Family(
                "gw_verify_seconds",
                "histogram",
                "Quote verification latency",
                [Histogram({}, [(0.001, 3), (0.01, 9)], total=0.05, count=10)],
            ),
        ]
    )
    fams = parse(text)
    assert ("gw_connections_total", {"mode": "terminate"}, 10.0) in fams["gw_connections"]
    assert fams["gw_cert_expiry_seconds"] == [
        ("gw_cert_expiry_seconds", {"domain": "a.test"}, 86400.5)
    ]
    hist = fams["gw_verify_seconds"]
    assert ("gw_verify_seconds_bucket", {"le": "+Inf"}, 10.0) in hist
    assert ("gw_verify_seconds_count", {}, 10.0) in hist


def test_names_are_checked() -> None:
    with pytest.raises(ValueError, match="_total"):
        Family("gw_connections", "counter", "x")
    with pytest.raises(ValueError, match="invalid metric name"):
        Family("gw-bad", "gauge", "x")
    with pytest.raises(ValueError, match="duplicate"):
        render([Family("a", "gauge", "x"), Family("a", "gauge", "y")])
    with pytest.raises(ValueError, match="invalid label"):
        render([Family("a", "gauge", "x", [Sample({"__x": "1"}, 1)])])


@given(
    value=st.text(max_size=40),
    help_text=st.text(max_size=40),
    number=st.floats(allow_nan=True, allow_infinity=True),
)
def test_any_label_value_and_number_round_trip(value: str, help_text: str, number: float) -> None:
    text = render([Family("gw_x", "gauge", help_text, [Sample({"v": value}, number)])])
    ((name, labels, got),) = parse(text)["gw_x"]
    assert labels == {"v": value}
    assert (math.isnan(got) and math.isnan(number)) or got == number
