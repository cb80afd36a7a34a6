"""The registry's record: its hash, the record transitions decide on and the operator's view
are one definition (services/registry/record.py)."""

from __future__ import annotations

import dataclasses
import types
from datetime import UTC, datetime
from typing import Any, Union, get_args, get_origin, get_type_hints

import pytest

from common.requests.registry import CellView
from common.scripts import encode
from services.registry.record import CellField, CellFields, CellRecord

HASH = get_type_hints(CellFields)
# What the view shows that follows from the record rather than being one of its fields.
DERIVED = {"credentials_pending", "refused_registrations"}


def _without_none(annotation: Any) -> set[Any]:
    union = get_origin(annotation) in (Union, types.UnionType)
    parts = get_args(annotation) if union else (annotation,)
    return {part for part in parts if part is not type(None)}


def test_the_field_names_are_the_fields() -> None:
    assert set(get_args(CellField)) == set(HASH)


def test_every_field_the_transitions_read_is_a_field_of_the_hash_of_the_same_type() -> None:
    record = get_type_hints(CellRecord)
    for field in dataclasses.fields(CellRecord):
        assert field.name in HASH, field.name
        assert _without_none(record[field.name]) == _without_none(HASH[field.name]), field.name


def test_every_field_the_operator_sees_is_a_field_of_the_hash_of_the_same_type() -> None:
    for name, info in CellView.model_fields.items():
        if name in DERIVED:
            continue
        assert name in HASH, name
        assert _without_none(info.annotation) == _without_none(HASH[name]), name


def test_a_record_reads_back_what_was_written() -> None:
    at = datetime(2026, 12, 1, tzinfo=UTC)
    written: CellFields = {
        "status": "offline", "stage": "saas", "region": "eu-west-1", "org": "acme",
        "aws_account_id": "123456789012", "rotation_key": "k" * 43, "last_seq": 7,
        "incarnation": "i",
        "registered_at": at, "last_heartbeat_at": at, "pending_credential_id": "c2",
        "maintenance_since": at, "last_maintenance_seq": 6, "infra_template_version": "2",
        "compliance_at": 1.5,
    }  # fmt: skip
    stored = {name: encode(value) for name, value in written.items()}
    assert dataclasses.asdict(CellRecord.from_fields(stored)) == written


def test_a_field_holding_a_word_the_vocabulary_lacks_is_an_error_not_a_guess() -> None:
    with pytest.raises(ValueError, match="status holds 'onlien'"):
        CellRecord.from_fields({"status": "onlien"})
