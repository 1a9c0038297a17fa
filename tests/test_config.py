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
        ({"split": {"test_identities": 300}}, "split.test_identities = 300", "fewer than the 300"),
        ({"data": {"layout": "imagenet"}}, "data.layout = 'imagenet'", "market1501"),
        ({"data": {"synthetic": {"identities": "many"}}}, "data.synthetic.identities = 'many'", "integer"),
        ({"degrade": {"width_range": [32, 8]}}, "degrade.width_range = [32, 8]", "lo < hi"),
        ({"ablation": {"variants": ["srgan"]}}, "ablation.variants", "ffsr_rife"),
        ({"ablation": {"variants": ["rife_pri", "rife_pri"]}}, "ablation.variants", "each variant once"),
        ({"degrade": {"scales": [2, 3, 8]}}, "degrade.scales = [2.0, 3.0, 8.0]", "largest of model.scales (4)"),
        ({"split": {"test_identities": 295}}, "split.test_identities = 295", "leaves 5 training identities"),
        ({"train": {"identities_per_batch": 64, "num_workers": 8}}, "split.test_identities = None", "(8)"),
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


def _shipped() -> str:
    return open("params.yaml").read()


def test_load_params_file_errors(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)
    ok = tmp_path / "p.yaml"
    ok.write_text(_shipped().replace("  gamma: 1 ", '  gamma: "1/3" '))
    assert load_params(ok).model.gamma == pytest.approx(1 / 3)


def test_shipped_params_are_the_code_defaults():
    """One source of defaults: a key left out of params.yaml takes the value the shipped file has."""
    from components.config import Params

    assert load_params("params.yaml") == Params()


def test_a_key_left_out_takes_the_shipped_value(tmp_path):
    path = tmp_path / "params.yaml"
    text = _shipped()
    assert "  lr_head: 0.001 " in text and "  last_stride: 2 " in text
    path.write_text(text.replace("  lr_head: 0.001 ", "  ").replace("  last_stride: 2 ", "  "))
    p = load_params(path)
    assert (p.train.lr_head, p.model.last_stride) == (0.001, 2)


@pytest.mark.parametrize("text, fragments", [
    ("", ["holds no params (empty or only comments)"]),
    ("# only a comment\n\n", ["holds no params"]),
    ("- a\n- b\n", ["expected a mapping of sections"]),
    (None, ["line {twice}, column 3", "key 'lr_head' is given twice (first at line {first})"]),
    ("data:\n  layout: synthetic\n  layout: market1501\n", ["line 3, column 3", "'layout' is given twice"]),
    ("data:\n  layout: [synthetic\nsplit: {}\n", ["line 3, column 6", "not valid YAML"]),
    ("data:\n\tlayout: synthetic\n", ["line 2, column 1", "'\\t'"]),
    ("data: {layout: synthetic}\n", ["sections degrade, split", "missing", "git show HEAD:params.yaml"]),
])
def test_params_file_problems_name_the_place(tmp_path, text, fragments):
    if text is None:  # the shipped file with a key given twice
        lines = _shipped().splitlines(keepends=True)
        at = next(i for i, line in enumerate(lines) if line.startswith("  lr_head:"))
        text = "".join(lines[:at + 1] + ["  lr_head: 0.1\n"] + lines[at + 1:])
        fragments = [f.format(first=at + 1, twice=at + 2) for f in fragments]
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError) as err:
        load_params(path)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(str(path))
    for fragment in fragments:
        assert fragment in msg


def test_an_empty_params_file_stops_the_data_stages(tmp_path, monkeypatch, capsys):
    from pipelines.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("# emptied by mistake\n")
    for stage in ("ingest", "degrade", "split"):
        assert main([stage, "--no-progress"]) == 2
        assert "holds no params" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing written


def test_paper_preset_applies_the_papers_sizes():
    p = load_params("params.yaml", preset="paper")
    assert (p.model.backbone, p.model.input_height, p.model.input_width) == ("resnet50", 384, 128)
    assert (p.model.sr.blocks, p.model.sr.convs_per_block, p.model.sr.growth, p.model.sr.channels) == (16, 8, 64, 64)
    assert load_params("params.yaml").model.backbone == "resnet18"  # the default stays the CPU one
    with pytest.raises(ParamsError, match="known presets: claim, paper"):
        load_params("params.yaml", preset="huge")


def test_claim_preset_carries_the_content_lever_and_the_baseline():
    base, p = load_params("params.yaml"), load_params("params.yaml", preset="claim")
    assert base.degrade.lr_noise == [] and len(set(p.degrade.lr_noise)) >= 2 and 0 in p.degrade.lr_noise
    assert "bicubic" in p.ablation.variants  # goal 2's trained baseline
    assert p.train.pretrain_epochs + p.train.epochs > base.train.pretrain_epochs + base.train.epochs
    assert p.data.synthetic.train_identities > base.data.synthetic.train_identities
    # the demo's models, at the HR size where F learns (64x32 is the demo's cost)
    assert p.model.model_copy(update={"input_height": 64, "input_width": 32}) == base.model
    assert (p.degrade.hr_height, p.degrade.hr_width) == (p.model.input_height, p.model.input_width) == (128, 64)


def test_ablation_variants_override_only_their_keys():
    from components.config import VARIANTS

    p = validate_params({"train": {"epochs": 3, "pretrain_epochs": 2}, "model": {"gamma": 3}})
    ffsr = p.for_variant("ffsr_rife")
    assert ffsr.train.model == "ffsr_rife" and ffsr.train.epochs == 3 and ffsr.model == p.model
    rife = p.for_variant("rife_pri")
    assert rife.model.reid == "rife" and rife.model.gamma == 3 and rife.train.epochs == 3
    # RIFE as F pretrains as many epochs as RIFE alone's step 2, whatever PRI's own T1 is
    assert rife.train.pretrain_epochs == p.ffsr_rife.rife.epochs != p.train.pretrain_epochs
    assert rife.train.model_copy(update={"pretrain_epochs": p.train.pretrain_epochs}) == p.train
    assert p.for_variant(None) is p and p.train.model == "pri"  # the main params are not touched
    assert set(load_params("params.yaml").ablation.variants) == set(VARIANTS)  # the default trains both
    with pytest.raises(ParamsError, match="known variants: bicubic, ffsr_rife, rife_pri"):
        p.for_variant("srgan")
