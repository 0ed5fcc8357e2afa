"""Config errors name the key path and stop the run before any work starts."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from jobs.config import Config, ConfigError, load_config, parse_config
from tests.conftest import ROOT

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "fraud.yaml"


@pytest.fixture(scope="module")
def raw_config() -> dict:
    return yaml.safe_load(CONFIG.read_text())


def test_shipped_config_loads():
    config = load_config(CONFIG)
    assert isinstance(config, Config)
    assert config.fact in config.sources
    assert config.sources["transactions"].primary_key == "transaction_id"


def test_typo_in_key_names_the_dotted_path():
    with pytest.raises(ConfigError) as error:
        load_config(CONFIG, {"train.num_workerz": 4})
    message = str(error.value)
    assert "train.num_workerz" in message
    assert str(CONFIG) in message


def test_typo_in_nested_list_item_names_the_full_path(raw_config):
    data = copy.deepcopy(raw_config)
    data["sources"]["customers"]["rules"][0]["colum"] = "customer_id"
    with pytest.raises(ConfigError) as error:
        parse_config(data, origin="edited.yaml")
    assert "sources.customers.rules.0" in str(error.value)
    assert "colum" in str(error.value)


def test_wrong_type_names_the_path_and_the_value():
    with pytest.raises(ConfigError) as error:
        load_config(CONFIG, {"train.num_boost_round": "many"})
    message = str(error.value)
    assert "train.num_boost_round" in message
    assert "'many'" in message


def test_out_of_range_value_is_an_error():
    with pytest.raises(ConfigError, match=r"train\.num_workers"):
        load_config(CONFIG, {"train.num_workers": 0})


def test_typo_does_not_fall_back_to_a_default():
    # A correctly spelled override takes effect; the misspelled one must not be ignored silently.
    assert load_config(CONFIG, {"train.num_workers": 3}).train.num_workers == 3
    with pytest.raises(ConfigError):
        load_config(CONFIG, {"train.num_worker": 3})


def test_unknown_source_in_references_rule(raw_config):
    data = copy.deepcopy(raw_config)
    data["sources"]["transactions"]["rules"].append(
        {"check": "references", "column": "customer_id", "source": "custmers"}
    )
    with pytest.raises(ConfigError) as error:
        parse_config(data)
    assert "custmers" in str(error.value)
    assert "sources.transactions.rules" in str(error.value)


def test_unknown_join_source_and_fact(raw_config):
    data = copy.deepcopy(raw_config)
    data["joins"].append({"source": "devices", "key": "device_id"})
    with pytest.raises(ConfigError, match="devices"):
        parse_config(data)
    data = copy.deepcopy(raw_config)
    data["fact"] = "payments"
    with pytest.raises(ConfigError, match="payments"):
        parse_config(data)


def test_split_fractions_must_sum_to_one():
    with pytest.raises(ConfigError, match="sum to 1"):
        load_config(CONFIG, {"split.test": 0.3})


def test_missing_config_file_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as error:
        load_config(missing)
    assert "not found" in str(error.value)
    assert str(missing) in str(error.value)


def test_invalid_yaml_is_a_config_error(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: fraud\nsources: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)


def test_digest_tracks_effective_config():
    base = load_config(CONFIG)
    assert base.digest() == load_config(CONFIG).digest()
    assert base.digest() != load_config(CONFIG, {"seed": 7}).digest()


@pytest.mark.parametrize(
    ("key", "value", "path", "column"),
    [
        ("features.history.entity", "custmer_id", "features.history.entity", "custmer_id"),
        ("features.label", "is_fraud", "features.label", "is_fraud"),
        ("joins", [{"source": "customers", "key": "cust"}], "joins[0].key", "cust"),
        ("sources.customers.pii", {"e_mail": "hash"}, "sources.customers", "e_mail"),
    ],
)
def test_undeclared_columns_fail_before_any_work(key, value, path, column):
    with pytest.raises(ConfigError) as raised:
        load_config(ROOT / "configs" / "fraud.yaml", {key: value})
    message = str(raised.value)
    assert path in message and repr(column) in message


def _load(overrides: dict, path: Path = CONFIG):
    return load_config(path, overrides)


@pytest.mark.parametrize(
    ("overrides", "path_in_message"),
    [
        ({"features.numeric": ["amount_usd", "amunt_usd"]}, "features.numeric[1]"),
        ({"features.categorical": ["chanel"]}, "features.categorical[0]"),
        ({"features.log_transform": ["channel"]}, "features.log_transform[0]"),
        (
            {"features.derived.customer_age": {"kind": "years_since_year", "columns": ["x"]}},
            "features.derived.customer_age.columns[0]",
        ),
        ({"features.history.amount": "amount_eur"}, "features.history.amount"),
        ({"evaluate.slices": ["channel", "chanel"]}, "evaluate.slices[1]"),
        ({"evaluate.slices": ["amount_usd"]}, "evaluate.slices[0]"),
        ({"features.categorical": ["channel", "customer_email"]}, "features.categorical[1]"),
        ({"features.timestamp": None}, "needs features.timestamp"),
        ({"split.by": "group"}, "split.group"),
        ({"split.group": "custmer"}, "split.group"),
        ({"evaluate.promotion.metric": "rmse"}, "evaluate.promotion.metric"),
        ({"tune.metric": "mlogloss"}, "tune.metric"),
        ({"task": "multiclass"}, "features.label"),
        ({"features.label": {"column": "label", "positive": "1"}}, "features.label"),
        (
            {
                "features.derived.em": {
                    "kind": "not_equal",
                    "columns": ["customer_email", "channel"],
                }
            },
            "features.derived.em.columns[0]",
        ),
        ({"sources.customers.pii": {"email": "hash", "customer_id": "hash"}}, "joins[0].key"),
        ({"train.params": {"max_dept": 3}}, "train.params"),
        ({"train.params": {"eta": "fast"}}, "train.params.eta"),
        ({"tune.space": {"eta": {"loguniform": [0.3, -1]}}}, "tune.space.eta.loguniform"),
        ({"tune.space": {"eta": {"uniform": [0.3, 0.1]}}}, "tune.space.eta.uniform"),
        ({"serve.port": 99999}, "serve.port"),
    ],
)
def test_every_column_and_metric_named_anywhere_is_checked_before_any_work(
    overrides, path_in_message
):
    """A typo in any feature, slice, derived, history, split or metric key fails at parse time,
    naming the key path (and a PII column can never be a feature)."""
    with pytest.raises(ConfigError) as error:
        _load(overrides)
    assert path_in_message in str(error.value), str(error.value)


def test_pii_column_as_feature_is_refused_by_name():
    with pytest.raises(ConfigError, match="PII column"):
        _load({"features.categorical": ["channel", "customer_email"]})


def test_label_mappings_for_each_task():
    survey = load_config(ROOT / "configs" / "survey.yaml")
    assert survey.features.label == "renews"
    assert survey.features.label_map.mapping() == {"no": 0, "yes": 1}
    rules = {(r.check, r.column) for r in survey.sources["responses"].rules}
    assert ("allowed", "renews") in rules and ("not_null", "renews") in rules
    segments = load_config(ROOT / "configs" / "segments.yaml")
    assert segments.features.label_map.mapping() == {"bronze": 0, "silver": 1, "gold": 2}
    houses = load_config(ROOT / "configs" / "houses.yaml")
    assert houses.task == "regression" and houses.features.label_map is None
    with pytest.raises(ConfigError, match="exactly one of"):
        load_config(
            ROOT / "configs" / "segments.yaml",
            {"features.label": {"column": "segment", "classes": ["a", "b"], "values": {"a": 0}}},
        )
    with pytest.raises(ConfigError, match="multiclass needs"):
        load_config(ROOT / "configs" / "segments.yaml", {"features.label": "segment"})


def test_a_tie_never_promotes_and_direction_follows_the_metric():
    from jobs.metrics import beats

    assert not beats("pr_auc", 0.5, 0.5, 0.0)
    assert beats("pr_auc", 0.51, 0.5, 0.0) and not beats("pr_auc", 0.49, 0.5, 0.0)
    assert beats("rmse", 9.0, 10.0, 0.5) and not beats("rmse", 9.8, 10.0, 0.5)
    assert beats("log_loss", 0.3, 0.2, -0.2)  # a negative margin accepts a slightly worse model
