"""params.yaml validation: every bad value stops with one line naming key, value and what is allowed."""

import pytest
import yaml

from components.config import ParamsError, load_params, parse_gamma, validate_params


def test_repository_params_are_valid():
    p = load_params("params.yaml")
    assert p.degrade.scales == [2, 3, 4]
    assert p.model.scales == [1, 2, 3, 4]


@pytest.mark.parametrize(
    "raw, key, fragment",
    [
        ({"model": {"gamma": 2}}, "model.gamma = 2", "odd integer"),
        ({"model": {"gamma": "1/2"}}, "model.gamma = '1/2'", "reciprocal"),
        ({"degrade": {"scale": [2, 3]}}, "degrade.scale", "known keys: protocol"),
        ({"nonsense": 1}, "nonsense", "known keys: data"),
        ({"degrade": {"scales": [3, 2]}}, "degrade.scales = [3, 2]", "ascending"),
        ({"model": {"scales": [0.5, 1, 2]}}, "model.scales = [0.5, 1, 2]", ">= 1"),
        ({"train": {"lr_backbone": -0.1}}, "train.lr_backbone = -0.1", "greater than 0"),
        ({"split": {"test_identities": 500}}, "split.test_identities = 500", "fewer than the 500"),
        ({"data": {"layout": "imagenet"}}, "data.layout = 'imagenet'", "market1501"),
        ({"data": {"synthetic": {"identities": "many"}}}, "data.synthetic.identities = 'many'", "integer"),
        ({"degrade": {"width_range": [32, 8]}}, "degrade.width_range = [32, 8]", "lo < hi"),
        ({"ablation": {"variants": ["srgan"]}}, "ablation.variants", "ffsr_rife"),
        ({"ablation": {"variants": ["rife_pri", "rife_pri"]}}, "ablation.variants", "each variant once"),
    ],
)
def test_bad_values_give_one_line(raw, key, fragment):
    with pytest.raises(ParamsError) as err:
        validate_params(raw)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("params.yaml: ")
    assert key in msg and fragment in msg


@pytest.mark.parametrize("value, expected", [(1, 1.0), (3, 3.0), ("1/3", 1 / 3), (1 / 3, 1 / 3), (0, 0.0), ("5", 5.0)])
def test_gamma_allowed(value, expected):
    assert parse_gamma(value) == pytest.approx(expected)


@pytest.mark.parametrize("value", [2, 4, "1/2", -1, 0.5, "x", True, float("nan")])
def test_gamma_rejected(value):
    with pytest.raises(ValueError):
        parse_gamma(value)


def test_load_params_file_errors(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)
    ok = tmp_path / "p.yaml"
    ok.write_text(yaml.safe_dump({"model": {"gamma": "1/3"}}))
    assert load_params(ok).model.gamma == pytest.approx(1 / 3)


def test_paper_preset_applies_the_papers_sizes():
    p = load_params("params.yaml", preset="paper")
    assert (p.model.backbone, p.model.input_height, p.model.input_width) == ("resnet50", 384, 128)
    assert (p.model.sr.blocks, p.model.sr.convs_per_block, p.model.sr.growth, p.model.sr.channels) == (16, 8, 64, 64)
    assert load_params("params.yaml").model.backbone == "resnet18"  # the default stays the CPU one
    with pytest.raises(ParamsError, match="known presets: paper"):
        load_params("params.yaml", preset="huge")


def test_ablation_variants_override_only_their_keys():
    from components.config import VARIANTS

    p = validate_params({"train": {"epochs": 3}, "model": {"gamma": 3}})
    ffsr = p.for_variant("ffsr_rife")
    assert ffsr.train.model == "ffsr_rife" and ffsr.train.epochs == 3 and ffsr.model == p.model
    rife = p.for_variant("rife_pri")
    assert rife.model.reid == "rife" and rife.model.gamma == 3 and rife.train == p.train
    assert p.for_variant(None) is p and p.train.model == "pri"  # the main params are not touched
    assert set(load_params("params.yaml").ablation.variants) == set(VARIANTS)  # the default trains both
    with pytest.raises(ParamsError, match="known variants: ffsr_rife, rife_pri"):
        p.for_variant("srgan")
