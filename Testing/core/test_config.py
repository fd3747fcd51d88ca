"""One config tree, validated once when it is built: presets, files, --set and flags name the bad setting."""

from __future__ import annotations

import pytest
import yaml

from cli_helpers import run_cli
from iltm import config as config_mod
from iltm.errors import InputError


@pytest.mark.parametrize("name", list(config_mod.PRESETS))
def test_every_preset_is_a_valid_tree(name):
    cfg = config_mod.preset(name)
    assert config_mod.validate(cfg) is cfg and cfg.preset == name


@pytest.mark.parametrize("override, message", [
    ("detection.samples=0", r"detection.samples=0 is not allowed \(allowed: a whole number of at least 1\)"),
    ("transformer.learning_rate=fast", r"transformer.learning_rate='fast' is not allowed \(allowed: a number above 0\)"),
    ("data.spatial_size=[64", r"'\[64' is not a valid value"),
    ("data.intensity=pett", r"allowed: one of pet, unit8bit, 8bit, none"),
    ("data.augment=maybe", r"data.augment='maybe' is not allowed \(allowed: true or false\)"),
    ("iltm.spare_shared_uptake={4d: 0.2}", r"iltm.spare_shared_uptake"),
    ("iltm.cross_fit_folds=1", r"must be 0 \(off\) or at least 2"),
    ("transformer.n_head=3", r"must divide transformer.n_embd=64"),
    ("detection.dropout_passes=1.5", r"detection.dropout_passes=1.5 is not allowed"),
    ("vqvae.no_such_setting=1", r"unknown setting 'vqvae.no_such_setting'"),
    ("nosection.key=1", r"unknown section 'nosection'"),
    ("samples=3", r"unknown setting 'samples'"),
])
def test_a_bad_override_is_one_error_naming_the_setting(override, message):
    with pytest.raises(InputError, match=message):
        config_mod.build("tiny", overrides=[override])


def test_flags_are_checked_like_settings_and_values_parse_as_yaml():
    with pytest.raises(InputError, match=r"iltm.max_iterations=-1 is not allowed"):
        config_mod.build("tiny", iltm__max_iterations=-1)
    cfg = config_mod.build("tiny", overrides=["data.spatial_size=[64, 48]", "transformer.learning_rate=1e-3",
                                    "iltm.spare_shared_uptake={2d: null, 3d: 0.5}"], seed=4, iltm__max_iterations=0)
    assert cfg.data.spatial_size == [64, 48] and cfg.transformer.learning_rate == 0.001 and cfg.seed == 4
    assert cfg.iltm.max_iterations == 0 and cfg.iltm.spare_share(3) == 0.5 and cfg.iltm.spare_share(2) is None


def test_a_config_file_with_a_bad_value_names_the_file_and_the_setting(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"data": {"spatial_size": "sixty-four"}}))
    with pytest.raises(InputError, match=r"mine.yaml: data.spatial_size='sixty-four' is not allowed"):
        config_mod.load(path)
    path.write_text("data: [unclosed\n")
    with pytest.raises(InputError, match="not valid YAML"):
        config_mod.load(path)
    path.write_text(yaml.safe_dump({"version": 7}))
    with pytest.raises(InputError, match="config version 7, this iltm reads 1"):
        config_mod.load(path)


def test_a_run_config_of_an_earlier_version_loads_when_its_removed_settings_were_neutral(tmp_path):
    old = config_mod.preset("tiny").to_dict()
    old["vqvae"].update(restart_dead_codes=False, act="relu", init_candidates=1, init_epochs=25,
                        codebook_init="normal", warmup_epochs=0)
    old["detection"]["resampling_dilation"] = 0
    old["iltm"].update(mask_dilation=0, same_transformer_seed=False)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(old))
    assert config_mod.load(path).to_dict() == config_mod.preset("tiny").to_dict()
    old["iltm"]["mask_dilation"] = 1
    path.write_text(yaml.safe_dump(old))
    with pytest.raises(InputError, match=r"iltm.mask_dilation=1: this setting was removed .*run format version 1"):
        config_mod.load(path)


def test_the_cli_refuses_a_bad_setting_before_reading_any_data(tmp_path, capsys):
    out = tmp_path / "run"
    missing = tmp_path / "no_such_data"          # never read: the setting is refused first
    for args in (["--set", "detection.samples=0"], ["--max-iterations", "-1"], ["--set", "data.spatial_size=[64"]):
        assert run_cli("train", "--data", tmp_path, "--out", out, *args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("iltm: error: ") and "no_such_data" not in err[0]
        assert not out.exists()
    assert run_cli("train", "--data", missing, "--out", out, "--set", "transformer.learning_rate=fast") == 2
    assert "transformer.learning_rate='fast'" in capsys.readouterr().err


def test_detection_flags_are_checked_like_settings(run2d, cohort2d, tmp_path, capsys):
    image = sorted((cohort2d / "images").glob("*.nii.gz"))[0]
    assert run_cli("detect", "--run", run2d, "--input", image, "--out", tmp_path / "o", "--samples", "0") == 2
    assert "detection.samples=0 is not allowed" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert run_cli("detect", "--run", run2d, "--input", image, "--out", tmp_path / "o", "--samples", "1",
                   "--dropout-passes", "1") == 2
    assert "the KDE needs at least 2 reconstructions" in capsys.readouterr().err
