"""The bad-input corpus for the HTTP API: every case must get the 4xx it names, never a 5xx."""

from __future__ import annotations

import json

LATE = "9999-12-31T23:59:59-05:00"  # valid locally, past year 9999 in UTC


def corpus(record: dict) -> list[tuple[str, object, dict, int, str]]:
    """(case, body (bytes: sent as is), extra headers, status, text the answer must contain)."""

    def rec(**change) -> dict:
        return {"records": [{**record, **change}]}

    def number(literal: str) -> bytes:
        return json.dumps(rec(amount=1)).replace('"amount": 1', f'"amount": {literal}').encode()

    without_amount = {k: v for k, v in record.items() if k != "amount"}
    dup_record = json.dumps({"records": [record]})[:-3] + ', "amount": 5}]}'
    return [
        ("malformed json", b'{"records": [', {}, 400, "malformed JSON"),
        ("not json", b"hello", {}, 400, "malformed JSON"),
        ("empty body", b"", {}, 400, "empty body"),
        ("blank body", b"   \n", {}, 400, "empty body"),
        (
            "text/plain",
            json.dumps(rec()).encode(),
            {"Content-Type": "text/plain"},
            415,
            "Content-Type",
        ),
        (
            "form",
            b"records=1",
            {"Content-Type": "application/x-www-form-urlencoded"},
            415,
            "Content-Type",
        ),
        ("no content type", json.dumps(rec()).encode(), {"Content-Type": ""}, 415, "Content-Type"),
        ("top-level array", [], {}, 422, "body"),
        ("top-level string", "records", {}, 422, "body"),
        ("top-level null", None, {}, 422, "body"),
        ("missing records", {}, {}, 422, "records"),
        ("no records", {"records": []}, {}, 422, "records"),
        ("records null", {"records": None}, {}, 422, "records"),
        ("records object", {"records": {}}, {}, 422, "records"),
        ("records string", {"records": "x"}, {}, 422, "records"),
        ("record is a number", {"records": [1]}, {}, 422, "records"),
        ("record is null", {"records": [None]}, {}, 422, "records"),
        ("extra top-level field", {**rec(), "debug": True}, {}, 422, "debug"),
        ("missing field", {"records": [without_amount]}, {}, 422, "amount"),
        ("extra field", rec(favourite_colour="blue"), {}, 422, "favourite_colour"),
        ("amount string", rec(amount="12.5"), {}, 422, "amount"),
        ("amount bool", rec(amount=True), {}, 422, "amount"),
        ("amount object", rec(amount={"value": 1}), {}, 422, "amount"),
        ("amount NaN", json.dumps(rec(amount=float("nan"))).encode(), {}, 422, "amount"),
        ("amount Infinity", json.dumps(rec(amount=float("inf"))).encode(), {}, 422, "amount"),
        ("amount -Infinity", json.dumps(rec(amount=float("-inf"))).encode(), {}, 422, "amount"),
        (
            "amount 1e400",
            json.dumps(rec(amount=1)).replace('"amount": 1', '"amount": 1e400').encode(),
            {},
            422,
            "amount",
        ),
        ("amount huge", rec(amount=1e30), {}, 422, "amount"),
        ("amount negative", rec(amount=-5.0), {}, 422, "amount"),
        ("amount null", rec(amount=None), {}, 422, "amount"),
        ("customer id list", rec(customer_id=[1, 2]), {}, 422, "customer_id"),
        ("customer id object", rec(customer_id={"id": 1}), {}, 422, "customer_id"),
        ("customer id bool", rec(customer_id=False), {}, 422, "customer_id"),
        ("customer id 10k chars", rec(customer_id="c" * 10_000), {}, 422, "customer_id"),
        ("customer id a float", rec(customer_id=4.5), {}, 422, "customer_id"),
        ("customer id null", rec(customer_id=None), {}, 422, "customer_id"),
        ("timestamp garbage", rec(timestamp="yesterday"), {}, 422, "timestamp"),
        ("timestamp past 9999 in UTC", rec(timestamp=LATE), {}, 422, "timestamp"),
        ("5,000-digit number", number("1" * 5000), {}, 400, "malformed JSON"),
        (
            "timestamp missing",
            {"records": [{k: v for k, v in record.items() if k != "timestamp"}]},
            {},
            422,
            "timestamp",
        ),
        ("unknown currency", rec(currency="XXX"), {}, 422, "currency"),
        ("unicode currency", rec(currency="€€€"), {}, 422, "currency"),
        ("channel not allowed", rec(channel="fax"), {}, 422, "channel"),
        ("1,001 records", {"records": [record] * 1001}, {}, 422, "records"),
        ("over the size limit", {"records": [record] * 10_000}, {}, 413, "larger than"),
        ("duplicate top-level key", b'{"records": [], "records": []}', {}, 400, "duplicate"),
        ("duplicate record key", dup_record.encode(), {}, 400, "duplicate"),
        ("nested too deep", b"[" * 100_000 + b"]" * 100_000, {}, 400, "deep"),
        ("invalid utf-8", b'{"records": [{"channel": "\xff\xfe"}]}', {}, 400, "UTF-8"),
        ("no token", rec(), {"Authorization": ""}, 401, "bearer"),
        ("bad token", rec(), {"Authorization": "Bearer guess-guess-guess"}, 401, "invalid"),
    ]
