"""LoraConfig validation, scaling policies, and per-path rank/alpha resolution."""

import math
from decimal import ROUND_HALF_UP, Decimal

import numpy as np
import pytest

import jlora
from jlora import scaling


@pytest.mark.parametrize(
    "rank, standard, rslora",
    [(4, 0.250, 0.500), (8, 0.125, 0.354), (16, 0.063, 0.250), (64, 0.016, 0.125),
     (128, 0.008, 0.088)],
)
def test_scaling_table(rank, standard, rslora):
    # The rsLoRA paper's table at alpha = 1, rounded half-up to the three decimals it prints.
    three = lambda x: float(Decimal(x).quantize(Decimal("0.001"), ROUND_HALF_UP))
    assert three(scaling.standard(rank, 1.0)) == standard
    assert three(scaling.rslora(rank, 1.0)) == rslora
    config_std = jlora.LoraConfig(rank=rank, alpha=1.0)
    config_rs = jlora.LoraConfig(rank=rank, alpha=1.0, scaling="rslora")
    assert config_std.scale_for("x/kernel") == pytest.approx(1.0 / rank)
    assert config_rs.scale_for("x/kernel") == pytest.approx(1.0 / math.sqrt(rank))


def test_policy_lookup_and_custom_callable():
    assert scaling.get("standard") is scaling.standard
    assert scaling.get("rslora") is scaling.rslora
    custom = lambda r, a: 2 * a / r
    config = jlora.LoraConfig(rank=4, alpha=3.0, scaling=custom)
    assert config.scale_for("k") == pytest.approx(1.5)
    assert config.policy_name == "custom"
    with pytest.raises(ValueError, match="Unknown scaling policy 'bogus'"):
        scaling.get("bogus")


def test_use_rslora_alias():
    config = jlora.LoraConfig(rank=16, alpha=1.0, use_rslora=True)
    assert config.scaling == "rslora" and config.use_rslora is True
    assert jlora.LoraConfig().scaling == "standard"
    assert jlora.LoraConfig().use_rslora is False


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rank=0), r"`rank` must be a positive int, got 0"),
        (dict(rank=2.5), r"`rank` must be a positive int, got 2.5"),
        (dict(rank=True), r"`rank` must be a positive int, got True"),
        (dict(alpha=-1.0), r"`alpha` must be a positive, finite number, got -1.0"),
        (dict(alpha=float("inf")), r"`alpha` must be a positive, finite number, got inf"),
        (dict(scaling="sqrt"), r"`scaling` must be one of \['rslora', 'standard'\].*got 'sqrt'"),
        (dict(scaling=3), r"`scaling` must be one of .* got 3"),
        (dict(scaling="standard", use_rslora=True), r"`use_rslora=True` contradicts"),
        (dict(scaling="rslora", use_rslora=False), r"`use_rslora=False` contradicts"),
        (dict(targets="(unclosed"), r"`targets` pattern '\(unclosed' is not a valid regular"),
        (dict(exclude="*bad"), r"`exclude` pattern '\*bad' is not a valid regular"),
        (dict(rank_pattern={"[": 4}), r"`rank_pattern\['\['\]` pattern '\[' is not a valid"),
        (dict(rank_pattern={".*": 0}), r"`rank_pattern\['\.\*'\]` must be a positive int, got 0"),
        (dict(alpha_pattern={".*": float("nan")}), r"`alpha_pattern\['\.\*'\]` must be a positive"),
        (dict(rank_pattern=[4]), r"`rank_pattern` must be a mapping"),
        (dict(layouts={".*": "xyz"}), r"`layouts\['\.\*'\]` must be a layout string"),
        (dict(init="kaiming"), r"`init` must be one of .*got 'kaiming'"),
        (dict(variant="vera"), r"`variant` must be one of \['lora', 'dora'\], got 'vera'"),
        (dict(dropout=1.0), r"`dropout` must be a float in \[0, 1\), got 1.0"),
        (dict(dropout=-0.1), r"`dropout` must be a float in \[0, 1\), got -0.1"),
        (dict(dtype=np.int32), r"`dtype` must be a floating dtype"),
    ],
)
def test_validation_errors_name_field_value_and_allowed(kwargs, match):
    with pytest.raises(ValueError, match=match):
        jlora.LoraConfig(**kwargs)


def test_pattern_precedence_first_match_wins():
    config = jlora.LoraConfig(
        rank=8,
        alpha=8.0,
        rank_pattern={r".*/attn/query/kernel": 2, r".*/attn/.*": 4},
        alpha_pattern={r".*/attn/.*": 1.0, r".*/attn/query/kernel": 32.0},
    )
    # rank: the specific key comes first, so it wins for query; the general one for value.
    assert config.rank_for("block/attn/query/kernel") == 2
    assert config.rank_for("block/attn/value/kernel") == 4
    assert config.rank_for("block/mlp/kernel") == 8
    # alpha: the general key comes first, so it shadows the specific one.
    assert config.alpha_for("block/attn/query/kernel") == 1.0
    assert config.alpha_for("block/mlp/kernel") == 8.0
    assert config.scale_for("block/attn/query/kernel") == pytest.approx(1.0 / 2)


def test_targets_and_exclude_match_in_full():
    config = jlora.LoraConfig(targets=r".*/kernel", exclude=r"head/.*")
    assert config.is_target("enc/dense/kernel")
    assert not config.is_target("enc/dense/kernel_scale")  # full match, not search
    assert not config.is_target("head/kernel")


def test_config_is_frozen_hashable_and_copies_mappings():
    pattern = {r".*": 2}
    config = jlora.LoraConfig(rank_pattern=pattern)
    pattern[r".*"] = 99
    assert config.rank_for("a/kernel") == 2
    assert hash(config) == hash(jlora.LoraConfig(rank_pattern={r".*": 2}))
    with pytest.raises(AttributeError):
        config.rank = 3  # type: ignore[misc]
