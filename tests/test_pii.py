"""tuneloop.data.pii: every type found, checksum negatives, no false alarms on ordinary numbers, redaction."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tuneloop.data.pii import PII_TYPES, PLACEHOLDERS, iban_ok, luhn_ok, mask, redact, redact_value, scan

POSITIVES = [
    ("email", "write to jane.doe+work@mail.example.co.uk today", "jane.doe+work@mail.example.co.uk"),
    ("phone", "call +1 (415) 555-0132 now", "+1 (415) 555-0132"),
    ("phone", "call 415-555-0199 now", "415-555-0199"),
    ("phone", "ring +44 20 7946 0958.", "+44 20 7946 0958"),
    ("credit_card", "card 4111 1111 1111 1111 ok", "4111 1111 1111 1111"),
    ("credit_card", "card 5500-0000-0000-0004.", "5500-0000-0000-0004"),
    ("credit_card", "amex 378282246310005", "378282246310005"),
    ("ipv4", "server at 192.168.10.254, port 22", "192.168.10.254"),
    ("ipv6", "host 2001:db8::8a2e:370:7334 is up", "2001:db8::8a2e:370:7334"),
    ("ipv6", "full fe80:0:0:0:202:b3ff:fe1e:8329 here", "fe80:0:0:0:202:b3ff:fe1e:8329"),
    ("iban", "IBAN GB82 WEST 1234 5698 7654 32 please", "GB82 WEST 1234 5698 7654 32"),
    ("iban", "pay DE89370400440532013000 now", "DE89370400440532013000"),
    ("aws_access_key", "key=AKIAIOSFODNN7EXAMPLE;", "AKIAIOSFODNN7EXAMPLE"),
    ("github_token", "token ghp_" + "a1B2" * 9 + " end", "ghp_" + "a1B2" * 9),
    ("github_token", "pat github_pat_11ABCDEFG0123456789_abcdefghij", "github_pat_11ABCDEFG0123456789_abcdefghij"),
    ("openai_key", "OPENAI_API_KEY=sk-proj-abc123def456ghi789jkl012", "sk-proj-abc123def456ghi789jkl012"),
    ("slack_token", "xoxb-123456789012-abcdefABCDEF", "xoxb-123456789012-abcdefABCDEF"),
    (
        "private_key",
        "here:\n-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7x\nabc123==\n-----END RSA PRIVATE KEY-----\nbye",
        "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7x\nabc123==\n-----END RSA PRIVATE KEY-----",
    ),
]


@pytest.mark.parametrize("kind, text, value", POSITIVES)
def test_each_type_found_and_redacted(kind, text, value):
    found = scan(text)
    assert [(f.type, text[f.start : f.end]) for f in found] == [(kind, value)]
    red = redact(text)
    assert value not in red and PLACEHOLDERS[kind] in red
    assert red == text.replace(value, PLACEHOLDERS[kind])
    assert value not in mask(value, kind)


def test_every_type_has_a_positive_case():
    assert {k for k, _, _ in POSITIVES} == set(PII_TYPES)


@pytest.mark.parametrize(
    "text",
    [
        "card 4111 1111 1111 1112 fails Luhn",
        "IBAN GB82 WEST 1234 5698 7654 33 fails mod-97",
        "sum 472547338 + 960397912423686 = 960398385 (not cards)",
        "years 2019 2020 2021 2022 and dates 2023-01-15, 15.01.2023",
        "version 1.2.3 and 10.0.0.256.1 and 999.1.1.1, time 12:30:45",
        "risk-averse, task-oriented; std::vector<int> a::b",
        "id 1234567 and order #47968; pi 3.14159265358979",
        "the word sk-learn and ghp_short and AKIA123",
        "email-like text user@localhost or @handle",
    ],
)
def test_no_false_alarms(text):
    assert scan(text) == [], [(f.type, text[f.start : f.end]) for f in scan(text)]


def test_checksums():
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert luhn_ok("378282246310005")
    assert iban_ok("GB82WEST12345698765432") and iban_ok("DE89 3704 0044 0532 0130 00")
    assert not iban_ok("GB82WEST12345698765433") and not iban_ok("GB82") and not iban_ok("1282WEST12345698765432")


def test_redact_value_nested_and_masks():
    value = {"a": ["mail a.b@example.com", {"k": "AKIAIOSFODNN7EXAMPLE"}], "n": 5, "none": None}
    out = redact_value(value)
    assert out == {"a": ["mail [EMAIL]", {"k": "[AWS_ACCESS_KEY]"}], "n": 5, "none": None}
    assert "example" not in mask("a.b@example.com", "email")
    assert mask("4111 1111 1111 1111", "credit_card") == "******(16 digits)"
    assert mask("GB82WEST12345698765432", "iban").startswith("GB") and "8765432" not in mask(
        "GB82WEST12345698765432", "iban"
    )


def test_several_findings_in_order_without_overlap():
    text = "a@b.io then 10.0.0.1 then 4111111111111111 then +49 30 1234567"
    kinds = [f.type for f in scan(text)]
    assert kinds == ["email", "ipv4", "credit_card", "phone"]
    assert redact(text) == "[EMAIL] then [IPV4] then [CREDIT_CARD] then [PHONE]"


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_scan_and_redact_never_crash_and_remove_all(text):
    found = scan(text)
    assert all(0 <= f.start < f.end <= len(text) for f in found)
    assert all(a.end <= b.start for a, b in zip(found, found[1:], strict=False))
    red = redact(text)
    for f in found:
        assert text[f.start : f.end] not in red or text[f.start : f.end] in json.dumps(PLACEHOLDERS)


@pytest.mark.parametrize(
    "text",
    [
        "-----BEGIN PRIVATE KEY----- " * 5000,  # was quadratic with a lazy scan to END
        "a@" + "b." * 50000,
        "1 " * 200000,
        "a:" * 100000,
        "sk-" * 100000,
    ],
)
def test_hostile_texts_scan_in_linear_time(text):
    import time

    t0 = time.perf_counter()
    scan(text)
    assert time.perf_counter() - t0 < 3.0  # ~0.3 s at most on a loaded machine; quadratic cases take 15 s+
