"""Deterministic sample data: a card-fraud use case spread over three sources and formats.

transactions (parquet, one file per day), customers (CSV, with PII) and merchants (JSONL).
The label depends non-linearly on features that need the join and per-customer history, and
about 1% of the rows are dirty on purpose, so the pipeline's validation has work to do.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from jobs.storage import Storage, join

START = np.datetime64("2026-01-01T00:00:00", "s")
COUNTRIES = np.array(["US", "GB", "DE", "FR", "ES", "CA"])
COUNTRY_PROBS = np.array([0.45, 0.15, 0.12, 0.1, 0.08, 0.1])
CURRENCY_OF_COUNTRY = {"US": "USD", "GB": "GBP", "DE": "EUR", "FR": "EUR", "ES": "EUR", "CA": "CAD"}
RATES_TO_USD = {"USD": 1.0, "EUR": 1.08, "GBP": 1.27, "CAD": 0.73}
CATEGORIES = np.array(
    ["grocery", "restaurants", "fuel", "fashion", "travel", "electronics", "jewelry", "gaming"]
)
RISKY_CATEGORIES = ["electronics", "jewelry", "gaming"]
CHANNELS = np.array(["pos", "web", "app"])


@dataclass(frozen=True)
class GeneratedData:
    transactions: int
    customers: int
    merchants: int
    fraud_rate: float
    uri: str


def _customers(rng: np.random.Generator, count: int) -> dict[str, np.ndarray]:
    ids = np.arange(1, count + 1)
    signup_days = rng.integers(-5 * 365, 25, size=count)  # some sign up during the window
    return {
        "customer_id": ids,
        "signup_date": (START.astype("datetime64[D]") + signup_days).astype(str),
        "country": rng.choice(COUNTRIES, size=count, p=COUNTRY_PROBS),
        "birth_year": rng.integers(1945, 2008, size=count).astype(object),
        "email": np.array([f"user{i}@example.com" for i in ids], dtype=object),
        "spend_scale": rng.lognormal(3.4, 0.7, size=count),
    }


def _history(customer: np.ndarray, seconds: np.ndarray, amount: np.ndarray):
    """Prior mean amount and seconds since the previous event, per customer, in time order."""
    order = np.lexsort((seconds, customer))
    cust, secs, amt = customer[order], seconds[order], amount[order]
    starts = np.r_[True, cust[1:] != cust[:-1]]
    group_start = np.maximum.accumulate(np.where(starts, np.arange(len(cust)), 0))
    position = np.arange(len(cust)) - group_start
    cumulative = np.cumsum(amt) - amt
    prior_sum = cumulative - cumulative[group_start]
    prior_mean = np.where(position > 0, prior_sum / np.maximum(position, 1), np.nan)
    gap = np.where(starts, np.nan, np.r_[np.nan, np.diff(secs)])
    result_mean, result_gap = np.empty_like(prior_mean), np.empty_like(gap)
    result_mean[order], result_gap[order] = prior_mean, gap
    return result_mean, result_gap


def _calibrated_labels(rng: np.random.Generator, logit: np.ndarray, rate: float) -> np.ndarray:
    low, high = -20.0, 5.0
    for _ in range(50):
        middle = (low + high) / 2
        if (1 / (1 + np.exp(-(logit + middle)))).mean() > rate:
            high = middle
        else:
            low = middle
    probability = 1 / (1 + np.exp(-(logit + low)))
    return (rng.random(len(logit)) < probability).astype(np.int8)


def generate(
    uri: str,
    rows: int = 100_000,
    days: int = 30,
    seed: int = 7,
    fraud_rate: float = 0.015,
    dirty_fraction: float = 0.01,
    storage: Storage | None = None,
) -> GeneratedData:
    """Writes the three sources under `uri` and returns what was written."""
    storage = storage or Storage()
    rng = np.random.default_rng(seed)
    n_customers = max(100, rows // 25)
    n_merchants = int(np.clip(rows // 200, 40, 5000))
    customers = _customers(rng, n_customers)
    merchant_ids = np.array([f"M{i:05d}" for i in range(n_merchants)], dtype=object)
    merchant_category = rng.choice(CATEGORIES, size=n_merchants)
    merchant_country = rng.choice(COUNTRIES, size=n_merchants, p=COUNTRY_PROBS)

    # Transactions: busy customers transact more; hours mostly daytime; some bursts.
    weights = rng.gamma(1.0, 1.0, size=n_customers)
    cust_index = rng.choice(n_customers, size=rows, p=weights / weights.sum())
    hour = np.where(rng.random(rows) < 0.88, rng.normal(14, 3.5, rows), rng.uniform(0, 24, rows))
    seconds = (rng.integers(0, days, rows) * 86400 + np.clip(hour, 0, 23.99) * 3600).astype(
        np.int64
    )
    burst = rng.random(rows) < 0.03
    partner = rng.integers(0, rows, rows)
    same_customer = cust_index[partner] == cust_index
    seconds = np.where(burst, seconds[partner] + rng.integers(5, 240, rows), seconds)
    cust_index = np.where(burst & ~same_customer, cust_index[partner], cust_index)
    seconds = np.clip(seconds, 0, days * 86400 - 1)
    merch_index = rng.integers(0, n_merchants, rows)
    channel = rng.choice(CHANNELS, size=rows, p=[0.5, 0.3, 0.2])
    amount_usd = customers["spend_scale"][cust_index] * rng.lognormal(0, 0.6, rows)

    prior_mean, gap = _history(cust_index, seconds, amount_usd)
    ratio = np.where(
        np.isnan(prior_mean), 1.0, amount_usd / np.where(np.isnan(prior_mean), 1, prior_mean)
    )
    event_hour = (seconds % 86400) // 3600
    category = merchant_category[merch_index]
    age = 2026 - customers["birth_year"][cust_index].astype(np.int64)
    signup = customers["signup_date"][cust_index].astype("datetime64[s]")
    account_age_days = ((START + seconds) - signup).astype(np.int64) / 86400
    mismatch = customers["country"][cust_index] != merchant_country[merch_index]
    logit = (
        3.5 * ((event_hour < 5) & np.isin(category, RISKY_CATEGORIES))
        + 3.0 * (ratio > 3.5)
        + 2.2 * ((age < 25) & (channel == "web"))
        + 1.5 * mismatch
        + 2.8 * (np.nan_to_num(gap, nan=1e9) < 300)
        + 1.4 * (account_age_days < 30)
        + 0.8 * np.isin(category, RISKY_CATEGORIES)
    )
    label = _calibrated_labels(rng, logit, fraud_rate)
    amount_usd = np.where(label == 1, amount_usd * rng.uniform(1.0, 2.5, rows), amount_usd)

    currency = np.vectorize(CURRENCY_OF_COUNTRY.get)(merchant_country[merch_index]).astype(object)
    rate = np.vectorize(RATES_TO_USD.get)(currency)
    amount = np.round(amount_usd / rate, 2)
    timestamps = (START + seconds).astype(str).astype(object)
    use_space = rng.random(rows) < 0.2
    timestamps[use_space] = np.char.replace(timestamps[use_space].astype(str), "T", " ")
    txn_id = np.array([f"T{i:09d}" for i in range(rows)], dtype=object)
    cust_id = customers["customer_id"][cust_index].astype(np.int64)
    channel = channel.astype(object)
    upper = rng.random(rows) < 0.1
    channel[upper] = np.char.upper(channel[upper].astype(str))
    currency_raw = currency.copy()
    lower = rng.random(rows) < 0.05
    currency_raw[lower] = np.char.lower(currency[lower].astype(str))
    amount = amount.astype(object)

    # Dirty rows, about `dirty_fraction` of the transactions in all.
    share = dirty_fraction / 7

    def pick() -> np.ndarray:
        return rng.random(rows) < share

    amount[pick()] = None
    neg = pick()
    amount[neg] = -np.abs(amount_usd[neg]).round(2)
    amount[pick()] = 1e9
    currency_raw[pick()] = "XXX"
    timestamps[pick()] = "not-a-time"
    cust_id[pick()] = 10_000_000 + rng.integers(0, 1000)  # orphans: unknown customers
    duplicates = np.flatnonzero(pick())

    table = pa.table(
        {
            "txn_id": pa.array(txn_id, pa.string()),
            "cust_id": pa.array(cust_id, pa.int64()),
            "merchant": pa.array(merchant_ids[merch_index], pa.string()),
            "amount": pa.array(amount, pa.float64()),
            "ccy": pa.array(currency_raw, pa.string()),
            "event_time": pa.array(timestamps, pa.string()),
            "channel": pa.array(channel, pa.string()),
            "is_fraud": pa.array(label, pa.int8()),
        }
    )
    table = pa.concat_tables([table, table.take(duplicates)])
    day = pa.array((seconds // 86400).astype(np.int64))
    day = pa.concat_arrays([day, day.take(pa.array(duplicates))]).to_numpy()
    for index in range(days):
        rows_of_day = np.flatnonzero(day == index)
        name = str(START.astype("datetime64[D]") + index)
        storage.write_table(
            join(uri, "transactions", f"day={name}", "part-0.parquet"), table.take(rows_of_day)
        )

    # Customers (CSV): extra rows with wrong types, and duplicate ids.
    country = customers["country"].astype(object)
    lower_country = rng.random(n_customers) < 0.1
    country[lower_country] = np.char.lower(country[lower_country].astype(str))
    customer_table = pa.table(
        {
            "customer_id": customers["customer_id"].astype(str),
            "signup_date": customers["signup_date"],
            "country": pa.array(country, pa.string()),
            "birth_year": pa.array([str(v) for v in customers["birth_year"]], pa.string()),
            "email": pa.array(customers["email"], pa.string()),
        }
    )
    extra = max(2, n_customers // 400)
    broken = customer_table.slice(0, extra).to_pydict()
    broken["customer_id"] = [str(n_customers + 1 + i) for i in range(extra)]
    broken["birth_year"] = ["unknown"] * extra
    dup_customers = rng.choice(n_customers, size=max(1, n_customers // 500), replace=False)
    customer_table = pa.concat_tables(
        [
            customer_table,
            pa.table(broken, schema=customer_table.schema),
            customer_table.take(dup_customers),
        ]
    )
    buffer = io.BytesIO()
    pacsv.write_csv(customer_table, buffer)
    storage.write_bytes(join(uri, "customers", "customers.csv"), buffer.getvalue())

    # Merchants (JSONL): extra records with a wrong type, a missing field, a line that is not JSON.
    lines = [
        json.dumps(
            {
                "id": merchant_id,
                "category": str(merchant_category[index]),
                "country": str(merchant_country[index]),
            }
        )
        for index, merchant_id in enumerate(merchant_ids)
    ]
    lines += [json.dumps({"id": f"X{i:05d}", "category": 42, "country": "US"}) for i in range(3)]
    lines += [json.dumps({"id": f"Y{i:05d}", "country": "US"}) for i in range(3)]
    lines.insert(len(lines) // 2, '{"id": "M99999", "category": ')
    storage.write_bytes(
        join(uri, "merchants", "merchants.jsonl"), ("\n".join(lines) + "\n").encode()
    )

    return GeneratedData(
        transactions=table.num_rows,
        customers=customer_table.num_rows,
        merchants=len(lines),
        fraud_rate=float(label.mean()),
        uri=uri,
    )
