"""Sample tables of other shapes than the fraud data, to show (and test) that any dataset
trains, serves and predicts by config alone (`configs/survey.yaml`, `configs/segments.yaml`,
`configs/houses.yaml`).

survey (CSV): a binary label written as free text ("Yes", " no ", "YES", plus a few
"maybe" and blanks that ingest must quarantine), no timestamp, no primary key.
segments (parquet): three classes by name, a primary key, no timestamp.
houses (JSONL): a regression target (price), a primary key, a listing date.
Each has a known signal, so tests can assert metric floors.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from jobs.storage import Storage, join

REGIONS = np.array(["north", "south", "east", "west"])
COLORS = np.array(["red", "green", "blue"])
CITIES = np.array(["lisbon", "porto", "braga", "faro"])
SEGMENTS = np.array(["bronze", "silver", "gold"])


def survey(rows: int, seed: int) -> tuple[bytes, dict]:
    """CSV bytes and how many rows have an unusable answer (unknown text or blank)."""
    rng = np.random.default_rng(seed)
    age = rng.integers(18, 80, rows)
    income = np.round(rng.lognormal(10.5, 0.5, rows), 2)
    region = rng.choice(REGIONS, rows)
    tenure = np.round(rng.exponential(4.0, rows), 2)
    logit = -3.0 + 0.05 * (age - 40) + 0.35 * tenure + 1.2 * (region == "south")
    renew = rng.random(rows) < 1 / (1 + np.exp(-logit))
    yes, no = np.array(["Yes", "yes", " YES "]), np.array(["No", "no ", "NO"])
    answer = np.where(renew, rng.choice(yes, rows), rng.choice(no, rows)).astype(object)
    bad = rng.random(rows) < 0.01
    answer[bad] = rng.choice(np.array(["maybe", ""], dtype=object), int(bad.sum()))
    table = pa.table(
        {"Age": age, "Income": income, "Region": region, "Tenure": tenure, "WillRenew": answer}
    )
    sink = io.BytesIO()
    pacsv.write_csv(table, sink)
    return sink.getvalue(), {"unusable_answers": int(bad.sum())}


def segments(rows: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    spend = rng.gamma(2.0, 50.0, rows)
    visits = rng.poisson(6, rows)
    color = rng.choice(COLORS, rows)
    tenure = rng.uniform(0, 10, rows)
    score = 0.02 * spend + 0.25 * visits + 0.3 * tenure + 0.8 * (color == "blue")
    score = score + rng.normal(0, 0.8, rows)
    cuts = np.quantile(score, [0.5, 0.85])
    segment = SEGMENTS[np.searchsorted(cuts, score)]
    return pa.table(
        {
            "customer_ref": [f"C{i:06d}" for i in range(rows)],
            "spend": np.round(spend, 2),
            "visits": visits,
            "favourite_color": color,
            "tenure_years": np.round(tenure, 2),
            "segment": segment,
        }
    )


def houses(rows: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    sqft = rng.integers(400, 3500, rows)
    rooms = np.clip(sqft // 450 + rng.integers(-1, 2, rows), 1, 8)
    age = rng.integers(0, 80, rows)
    city = rng.choice(CITIES, rows)
    premium = np.select([city == "lisbon", city == "porto"], [1.6, 1.3], 1.0)
    price = (120 * sqft + 9000 * rooms - 500 * age + 20000) * premium + rng.normal(0, 15000, rows)
    price = np.maximum(price, 10000.0)
    start = np.datetime64("2025-01-01", "D")
    listed = start + rng.integers(0, 365, rows)
    return [
        {
            "listing": f"L{i:06d}",
            "sqft": int(sqft[i]),
            "rooms": int(rooms[i]),
            "age_years": int(age[i]),
            "city": str(city[i]),
            "listed_on": str(listed[i]),
            "price": round(float(price[i]), 2),
        }
        for i in range(rows)
    ]


def generate_table(kind: str, out: str, rows: int = 3000, seed: int = 5) -> dict:
    """Writes one sample table under `out`; returns what was written."""
    storage = Storage()
    if kind == "survey":
        data, extra = survey(rows, seed)
        storage.write_bytes(join(out, "responses.csv"), data)
        return {"rows": rows, "file": join(out, "responses.csv"), **extra}
    if kind == "segments":
        sink = pa.BufferOutputStream()
        pq.write_table(segments(rows, seed), sink)
        storage.write_bytes(join(out, "part-0.parquet"), sink.getvalue().to_pybytes())
        return {"rows": rows, "file": join(out, "part-0.parquet")}
    if kind == "houses":
        lines = "\n".join(json.dumps(row) for row in houses(rows, seed)) + "\n"
        storage.write_bytes(join(out, "listings.jsonl"), lines.encode())
        return {"rows": rows, "file": join(out, "listings.jsonl")}
    raise ValueError(f"unknown sample table {kind!r}: survey, segments or houses")
