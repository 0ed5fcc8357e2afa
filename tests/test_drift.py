"""Drift statistics (jobs.drift): PSI behaves as a user reads it (about 0 for the same data,
large for a shift, a known value by hand), the reference covers constants, encoded categories
and missing values, and it travels inside the published bundle."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from jobs import drift

RNG_SEED = 7


@pytest.fixture
def rng():
    return np.random.default_rng(RNG_SEED)


def test_psi_is_about_zero_for_the_same_distribution(rng):
    ref = drift.reference(rng.normal(size=(50_000, 1)), ["x"], None)
    assert ref["features"]["x"]["kind"] == "quantile"
    assert len(ref["features"]["x"]["shares"]) == 10
    assert drift.psi(ref["features"]["x"], rng.normal(size=2000)) < 0.02


def test_psi_is_large_for_a_shifted_distribution(rng):
    ref = drift.reference(rng.normal(size=(50_000, 1)), ["x"], None)["features"]["x"]
    assert 0.1 < drift.psi(ref, rng.normal(0.3, 1, size=2000)) < 0.2  # moderate
    assert drift.psi(ref, rng.normal(1.0, 1, size=2000)) > 0.5
    assert drift.psi(ref, rng.normal(0, 2, size=2000)) > 0.2  # same mean, wider


def test_psi_matches_a_hand_computed_value():
    # Reference: half the rows below 0.5, half above; live: a quarter below.
    # PSI = (0.25 - 0.5) ln(0.25 / 0.5) + (0.75 - 0.5) ln(0.75 / 0.5) = 0.2746530722
    quantile = {"kind": "quantile", "edges": [0.5], "shares": [0.5, 0.5], "missing": 0.0}
    expected = 0.25 * math.log(2) + 0.25 * math.log(1.5)
    assert drift.psi(quantile, np.array([0.0, 1.0, 1.0, 1.0])) == pytest.approx(expected)
    # The same split as two known values; an empty bin counts as EPSILON.
    discrete = {"kind": "discrete", "values": [0.0, 1.0], "shares": [0.5, 0.5], "missing": 0.0}
    assert drift.psi(discrete, np.array([0.0, 1.0, 1.0, 1.0])) == pytest.approx(expected)
    only_ones = (1 - 0.5) * math.log(1 / 0.5) + (drift.EPSILON - 0.5) * math.log(
        drift.EPSILON / 0.5
    )
    assert drift.psi(discrete, np.ones(4)) == pytest.approx(only_ones)
    assert math.isnan(drift.psi(discrete, np.array([])))


def test_constant_and_categorical_features_get_one_bin_per_value(rng):
    rows = 10_000
    matrix = np.column_stack(
        [np.full(rows, 3.0), rng.integers(0, 6, rows), rng.exponential(size=rows)]
    ).astype(np.float32)
    ref = drift.reference(matrix, ["const", "channel", "amount"], None)
    const, channel = ref["features"]["const"], ref["features"]["channel"]
    assert const == {"kind": "discrete", "values": [3.0], "shares": [1.0], "missing": 0.0}
    assert channel["kind"] == "discrete" and channel["values"] == [0, 1, 2, 3, 4, 5]
    assert drift.psi(const, np.full(500, 3.0)) == 0.0
    assert drift.psi(const, np.full(500, 4.0)) > 5  # a new value lands in `other`
    assert drift.psi(channel, rng.integers(0, 6, 2000)) < 0.02
    assert drift.psi(channel, np.full(2000, 6.0)) > 5  # a category code never seen in train
    assert drift.psi(channel, rng.integers(0, 3, 2000)) > 0.5


def test_missing_values_have_their_own_bin(rng):
    values = rng.normal(size=20_000)
    values[rng.random(values.size) < 0.1] = np.nan
    ref = drift.reference(values.reshape(-1, 1), ["x"], None)["features"]["x"]
    assert ref["missing"] == pytest.approx(0.1, abs=0.01)
    assert sum(ref["shares"]) + ref["missing"] == pytest.approx(1.0)
    same = rng.normal(size=2000)
    same[rng.random(same.size) < 0.1] = np.inf  # non-finite counts as missing
    assert drift.psi(ref, same) < 0.03
    more_missing = rng.normal(size=2000)
    more_missing[:1000] = np.nan
    assert drift.psi(ref, more_missing) > 0.5


def test_reference_is_json_with_the_score_distribution(rng):
    matrix = rng.normal(size=(5000, 3)).astype(np.float32)
    probabilities = rng.dirichlet([1, 1, 1], size=5000)
    ref = drift.reference(matrix, ["a", "b", "c"], probabilities)
    again = json.loads(json.dumps(ref, allow_nan=False))
    assert again == ref
    assert list(ref["features"]) == ["a", "b", "c"] and ref["rows"] == 5000
    score = ref["score"]  # multiclass: the first class's probability
    assert len(score["percentiles"]) == 101
    assert score["percentiles"][50] == pytest.approx(np.median(probabilities[:, 0]))
    ranks = drift.score_rank(score, rng.dirichlet([1, 1, 1], size=4000))
    assert np.histogram(ranks, bins=4, range=(0, 1))[0] / 4000 == pytest.approx(
        [0.25] * 4, abs=0.04
    )  # scores that did not drift are spread evenly over the reference's quantiles
    assert drift.reference(matrix, ["a", "b", "c"], None)["score"] is None
    with pytest.raises(ValueError, match="3 features"):
        drift.reference(matrix[:, :2], ["a", "b", "c"], None)


def test_feature_psi_names_every_feature(rng):
    matrix = rng.normal(size=(20_000, 2))
    ref = drift.reference(matrix, ["stable", "shifted"], None)
    live = np.column_stack([rng.normal(size=2000), rng.normal(2, 1, size=2000)])
    result = drift.feature_psi(ref, live, ["stable", "shifted"])
    assert result["stable"] < 0.05 and result["shifted"] > 1


@pytest.mark.slow
def test_published_bundle_carries_the_train_reference(pipeline_run):
    from jobs.registry import load_bundle
    from jobs.storage import Storage, join

    config, result = pipeline_run
    storage = Storage(config.s3)
    bundle = load_bundle(storage, join(config.storage, "registry"), config.name, result.version)
    ref = bundle.reference
    assert ref is not None and ref["format"] == drift.FORMAT
    assert list(ref["features"]) == bundle.spec.feature_names
    train_rows = storage.read_json(join(result.run_uri, "features", "_report.json"))["rows"]
    assert ref["rows"] == pytest.approx(min(train_rows["train"], drift.MAX_SAMPLE_ROWS), rel=0.05)
    assert "reference" in bundle.lineage["stage_seconds"]
    # Binary: the reference scores are the calibrated probabilities serving answers with.
    assert 0.0 <= ref["score"]["percentiles"][0] <= ref["score"]["percentiles"][-1] <= 1.0
    assert ref["features"]["channel"]["kind"] == "discrete"  # an encoded category
    assert ref["features"]["amount_usd"]["kind"] == "quantile"

    # The train split itself shows no drift against its reference; the sample is deterministic.
    sample = drift.train_sample(storage, result.run_uri, bundle.spec.feature_names, 5_000)
    again = drift.train_sample(storage, result.run_uri, bundle.spec.feature_names, 5_000)
    assert np.array_equal(sample, again)
    psi = drift.feature_psi(ref, sample, bundle.spec.feature_names)
    assert set(psi) == set(bundle.spec.feature_names)
    assert max(psi.values()) < 0.1, psi
