"""Dense AE / VAE baselines (Baur et al.): shapes in 2D and 3D, the VAE's KL and reparameterisation, the residual
score on the input's own grid, checkpoints and a short real training."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch import nn

from iltm_bench import baselines
from iltm_bench.baselines import Baseline, DenseAutoencoder, kl_divergence, loss_terms
from iltm.config import DataConfig, preset
from iltm.errors import InputError
from iltm.io import list_images, read_image, write_image
from iltm.synth import make_cohort

torch.set_num_threads(1)


def make(dims: int, variational: bool, latent: int = 12) -> DenseAutoencoder:
    torch.manual_seed(0)
    shape = (16, 24) if dims == 2 else (8, 16, 12)
    return DenseAutoencoder(dims, shape, channels=[4, 8], latent_size=latent, variational=variational,
                            kernel_size=3)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("variational", [False, True])
def test_shapes_and_dense_bottleneck(dims, variational):
    model = make(dims, variational).eval()
    x = torch.rand(3, 1, *model.in_shape)
    recon, mu, logvar = model(x)
    assert recon.shape == x.shape
    assert mu.shape == (3, 12)
    assert (logvar is not None) == variational
    if variational:
        assert logvar.shape == (3, 12)
    # The bottleneck is a vector: flatten -> linear -> z -> linear -> unflatten, 2 stride-2 convolutions deep.
    flat = 8 * int(np.prod([s // 4 for s in model.in_shape]))
    assert isinstance(model.to_latent, nn.Linear) and model.to_latent.in_features == flat
    assert model.from_latent.out_features == flat and model.from_latent.in_features == 12


def test_input_shape_must_fit_the_downsampling():
    with pytest.raises(ValueError):
        DenseAutoencoder(2, (18, 24), channels=[4, 8], latent_size=4)
    with pytest.raises(ValueError):
        DenseAutoencoder(3, (16, 24), channels=[4, 8], latent_size=4)


def test_kl_divergence_known_values_and_positive():
    zero = torch.zeros(2, 5)
    assert torch.allclose(kl_divergence(zero, zero), torch.zeros(2))
    # KL(N(1, 1) || N(0, 1)) = 0.5 per dimension.
    assert torch.allclose(kl_divergence(torch.ones(1, 4), torch.zeros(1, 4)), torch.tensor([2.0]))
    model = make(2, True).train()
    x = torch.rand(4, 1, *model.in_shape)
    terms = loss_terms(model, x, beta=0.5)
    assert float(terms["kl"].detach()) > 0
    assert torch.isclose(terms["total"], terms["l1"] + 0.5 * terms["kl"])
    ae_terms = loss_terms(make(2, False), x, beta=0.5)
    assert "kl" not in ae_terms and torch.equal(ae_terms["total"], ae_terms["l1"])


def test_reparameterisation_stochastic_in_train_deterministic_in_eval():
    model = make(2, True)
    mu, logvar = torch.zeros(2, 12), torch.zeros(2, 12)
    model.train()
    a, b = model.reparameterize(mu, logvar), model.reparameterize(mu, logvar)
    assert not torch.allclose(a, b)
    assert float(a.std()) > 0.5  # sigma = exp(0.5 * 0) = 1
    model.eval()
    assert torch.equal(model.reparameterize(mu, logvar), mu)
    x = torch.rand(2, 1, *model.in_shape)
    assert torch.equal(model(x)[0], model(x)[0])


class ConstantReconstruction(nn.Module):
    """Stands in for a trained network: reconstructs every image as ``x + offset`` (or as zeros)."""

    spatial_dims, in_shape = 2, (16, 16)

    def __init__(self, offset: float | None):
        super().__init__()
        self.offset = offset

    def forward(self, x):
        recon = torch.zeros_like(x) if self.offset is None else x + self.offset
        return recon, None, None


def geometry_image(size=(30, 27)) -> sitk.Image:
    rng = np.random.default_rng(0)
    img = sitk.GetImageFromArray(rng.uniform(0, 4, size=size[::-1]).astype(np.float32))
    img.SetSpacing((1.5, 2.5))
    img.SetOrigin((-12.0, 40.0))
    img.SetDirection((0.0, 1.0, 1.0, 0.0))
    return img


def test_residual_modes_and_score_on_the_input_grid():
    data_cfg = DataConfig(spatial_dims=2, intensity="pet", clip_value=4.0, spatial_size=[32, 32], augment=False)
    cfg = baselines.BaselineConfig(channels=[4, 8], median_size=0)
    x = np.random.default_rng(1).uniform(0, 1, size=(1, 32, 32)).astype(np.float32)

    zero = Baseline("ae", ConstantReconstruction(None), cfg, data_cfg, torch.device("cpu"))
    score, recon = zero.residual_array(x)
    assert np.allclose(score, x[0]) and np.allclose(recon, 0)
    darker = Baseline("ae", ConstantReconstruction(0.25), cfg, data_cfg, torch.device("cpu"))
    assert np.allclose(darker.residual_array(x)[0], 0.0)       # a brighter reconstruction is not a hot lesion
    cfg_abs = baselines.BaselineConfig(channels=[4, 8], median_size=0, residual="absolute")
    absolute = Baseline("ae", ConstantReconstruction(0.25), cfg_abs, data_cfg, torch.device("cpu"))
    assert np.allclose(absolute.residual_array(x)[0], 0.25)
    smoothed = Baseline("ae", ConstantReconstruction(None), baselines.BaselineConfig(median_size=3), data_cfg,
                        torch.device("cpu"))
    assert not np.allclose(smoothed.residual_array(x)[0], x[0])

    img = geometry_image()
    score_img = zero.score_image(img)
    assert score_img.GetSize() == img.GetSize()
    assert np.allclose(score_img.GetSpacing(), img.GetSpacing())
    assert np.allclose(score_img.GetOrigin(), img.GetOrigin())
    assert np.allclose(score_img.GetDirection(), img.GetDirection())
    # With a zero reconstruction the score is the normalised input itself, voxel for voxel on the input grid.
    expected = np.clip(sitk.GetArrayFromImage(img), 0, 4) / 4
    assert np.allclose(sitk.GetArrayFromImage(score_img), expected, atol=1e-5)


def test_config_presets_and_overrides_are_one_validated_tree():
    for name in ("tiny", "small", "paper"):
        tree = baselines.build_config(name)
        assert tree.baselines.epochs > 0 and tree.baselines.latent_size > 0
        assert tree.core().to_dict() == preset(name).to_dict()           # the core's part is the core's preset
    assert baselines.build_config("tiny").baselines.latent_size < baselines.build_config("paper").baselines.latent_size
    tree = baselines.build_config("tiny", ["baselines.channels=[8, 16]", "baselines.beta=0.5", "vqvae.epochs=3",
                                           "baselines.cutpaste_variant=3way", "baselines.nsa_resize=true",
                                           "baselines.nsa_gradients=mixed"])
    cfg = tree.baselines
    assert cfg.channels == [8, 16] and cfg.beta == 0.5 and cfg.downsample_factor == 4 and tree.vqvae.epochs == 3
    assert cfg.cutpaste_variant == "3way" and cfg.nsa_resize is True and cfg.nsa_gradients == "mixed"
    assert "baselines" not in tree.core().to_dict()
    for bad, message in (("baselines.no_such_setting=1", "unknown setting 'baselines.no_such_setting'"),
                         ("baselines.residual=negative", "baselines.residual='negative' is not allowed"),
                         ("baselines.cutpaste_variant=scars", "allowed: one of binary, scar, 3way"),
                         ("baselines.nsa_resize=0.7", "baselines.nsa_resize=0.7 is not allowed .allowed: true or false"),
                         ("baselines.nsa_gradients=max", "allowed: one of source, mixed"),
                         ("baselines.epochs=-1", "baselines.epochs=-1 is not allowed")):
        with pytest.raises(InputError, match=message):
            baselines.build_config("tiny", [bad])
    with pytest.raises(InputError, match="unknown preset 'huge'"):
        baselines.build_config("huge")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("baseline_cohort")
    make_cohort(out, dims=2, n=6, anomalous_fraction=0.5, seed=5, size=(32, 24))
    return out


@pytest.mark.parametrize("method, setting", [
    ("ae", None), ("vae", None), ("nsa", None), ("nsa", ("nsa_resize", True)), ("nsa", ("nsa_gradients", "mixed")),
    ("cutpaste", None), ("cutpaste", ("cutpaste_variant", "3way"))])
def test_training_saves_loads_and_scores(cohort, tmp_path, method, setting):
    cfg = preset("tiny")
    cfg.device = "cpu"
    cfg.data.augment = False
    bcfg = baselines.build_config("tiny").baselines
    bcfg.epochs = bcfg.nsa_epochs = bcfg.cutpaste_epochs = 6
    if setting:
        setattr(bcfg, *setting)
    path = tmp_path / f"{method}.pt"
    model = baselines.train_baseline(method, path, cfg, bcfg, cohort)
    losses = model.extra["losses"]
    assert len(losses) == 6 and (setting or losses[-1] < losses[0])  # (a 3-way task needs more than 6 epochs)
    assert getattr(model.model, "variational", None) == {"ae": False, "vae": True}.get(method)
    if setting:  # the setting is stored with the weights (a 3-way head has three outputs)
        assert getattr(Baseline.load(path).cfg, setting[0]) == setting[1]
    assert not path.with_name(path.name + ".fit.pt").exists()
    # A finished model is loaded, not retrained.
    stamp = path.stat().st_mtime_ns
    again = baselines.train_baseline(method, path, cfg, bcfg, cohort)
    assert path.stat().st_mtime_ns == stamp
    x = torch.rand(1, 1, *model.model.in_shape)
    assert torch.allclose(again.model(x)[0], model.model(x)[0])

    written = baselines.score_folder(path, cohort, tmp_path / "scores", device="cpu")
    records = list_images(cohort)
    assert sorted(p.name for p in written) == sorted(f"{r.id}_score.nii.gz" for r in records)
    score, image = read_image(written[0]), read_image(records[0].image)
    assert score.GetSize() == image.GetSize() == (32, 24)
    assert np.allclose(score.GetOrigin(), image.GetOrigin()) and np.allclose(score.GetSpacing(), image.GetSpacing())
    values = sitk.GetArrayFromImage(score)
    assert values.min() >= 0 and values.max() > 0
    if method == "nsa":  # a probability
        assert values.max() <= 1
    if method == "cutpaste":  # a checkpoint that lost its Gaussian is a clear error, not a KeyError when scoring
        payload = torch.load(path, weights_only=False)
        del payload["gde_precision"]
        torch.save(payload, tmp_path / "no_density.pt")
        with pytest.raises(InputError, match="no_density.pt.*Gaussian of training patches"):
            Baseline.load(tmp_path / "no_density.pt")


def test_loading_a_foreign_or_damaged_file_names_it(tmp_path):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="model.pt"):
        Baseline.load(bad)
    torch.save({"format": "iltm-vqvae", "version": 1}, bad)
    with pytest.raises(InputError, match="not an iltm-dense-autoencoder"):
        Baseline.load(bad)
    img = geometry_image()
    write_image(img, tmp_path / "x.nii.gz")
    with pytest.raises(InputError):
        baselines.score_folder(tmp_path / "missing.pt", tmp_path / "x.nii.gz", tmp_path / "out", device="cpu")
