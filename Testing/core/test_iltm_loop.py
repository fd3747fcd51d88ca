"""The ILTM loop's training-scan masks: cross-fitting (each scan masked by a Transformer that never saw it) and
the separate mask threshold."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cli_helpers import FAST, cli_subprocess, run_cli
from iltm import config as config_mod
from iltm import train as train_mod
from iltm.errors import InputError
from iltm.progress import Reporter
from iltm.layout import FORMAT_VERSION as RUN_VERSION
from iltm.run import RunFolder


def test_each_fold_transformer_is_fitted_without_its_fold(tmp_path, monkeypatch):
    cfg = config_mod.preset("tiny")
    cfg.iltm.cross_fit_folds = 3
    tokens = torch.arange(7)[:, None].repeat(1, 4)               # row i is all i: which scans a fit saw
    masks = torch.zeros(7, 4, dtype=torch.bool)
    masks[:, 0] = True
    seen = {}

    def fake_fit(run, cfg, k, tokens, token_masks, num_codes, device, reporter, units, fold=None):
        seen[fold] = (sorted(tokens[:, 0].tolist()), token_masks.shape[0])
        run.fold_transformer_path(k, fold).parent.mkdir(parents=True, exist_ok=True)
        run.fold_transformer_path(k, fold).write_bytes(b"x")
        return {}

    monkeypatch.setattr(train_mod, "train_transformer_stage", fake_fit)
    run = RunFolder(tmp_path / "run")
    train_mod.cross_fit_stage(run, cfg, 0, tokens, masks, torch.device("cpu"), Reporter("none"), 1.0)
    assert seen == {0: ([1, 2, 4, 5], 4), 1: ([0, 2, 3, 5, 6], 5), 2: ([0, 1, 3, 4, 6], 5)}
    # A rerun (resume) refits nothing that is on disk.
    seen.clear()
    train_mod.cross_fit_stage(run, cfg, 0, tokens, masks, torch.device("cpu"), Reporter("none"), 1.0)
    assert seen == {}


def test_each_iterations_transformer_starts_from_its_own_seed(tmp_path):
    cfg = config_mod.preset("tiny")
    cfg.transformer.n_layer, cfg.transformer.n_embd, cfg.transformer.epochs = 1, 16, 2
    tokens = torch.randint(0, 8, (6, 12), generator=torch.Generator().manual_seed(0))
    run = RunFolder(tmp_path / "run")

    def fitted(k, masks=None, fold=None):
        train_mod.train_transformer_stage(run, cfg, k, tokens, masks, 8, torch.device("cpu"), Reporter("none"), 1.0,
                                          fold=fold)
        path = run.transformer_path(k) if fold is None else run.fold_transformer_path(k, fold)
        return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]

    def same(a, b):
        return all(torch.equal(a[name], b[name]) for name in a)

    first = fitted(0)
    assert same(first, fitted(0))                       # the same iteration is fitted the same way again
    assert not same(first, fitted(1))                   # without masks, iteration 1 still differs by its seed


class _RecordingDetector:
    """Stands in for a Detector: remembers which scans it scored; flags everything or nothing."""

    device = torch.device("cpu")

    def __init__(self):
        self.scored = []

    def detect_array(self, image, threshold, generator):
        self.scored.append(float(image.flatten()[0]))
        return type("R", (), {"log_density": torch.zeros(image.shape[1:])})()

    def binary_map(self, log_density, tau=None):
        return log_density < np.log(tau)

    def maps_on_input_grid(self, result, info, tau=None):
        import SimpleITK as sitk
        return None, sitk.GetImageFromArray((result.log_density.numpy() < np.log(tau)).astype(np.uint8))

    def token_mask(self, binary):
        return binary[::4, ::4]


class _Scans:
    """Stands in for a TrainingSet: scan i is a constant image of value i."""

    def __init__(self, n: int):
        self.records = [type("Rec", (), {"id": f"s{i}"})() for i in range(n)]
        self.arrays = [np.full((1, 8, 8), float(i), np.float32) for i in range(n)]
        self.infos = [None] * n

    def __len__(self) -> int:
        return len(self.records)


def test_each_training_scan_is_masked_by_the_detector_of_its_fold(tmp_path):
    cfg = config_mod.preset("tiny")
    cfg.iltm.mask_density_threshold = 2.0                           # log f = 0 < log 2: every voxel masked
    cfg.iltm.spare_shared_uptake = None                             # (the tiny preset spares shared bright tokens)
    detectors = [_RecordingDetector(), _RecordingDetector()]
    masks, _ = train_mod.detect_stage(RunFolder(tmp_path / "run"), cfg, 0, _Scans(5), detectors, 0.02,
                                      Reporter("none"), 1.0)
    assert detectors[0].scored == [0.0, 2.0, 4.0] and detectors[1].scored == [1.0, 3.0]
    assert masks.shape == (5, 4) and bool(masks.all())


def test_shared_uptake_counts_the_other_scans_at_least_80_percent_as_bright():
    uptake = torch.tensor([[10.0, 10.0, 1.0],
                           [9.0, 1.0, 1.0],
                           [8.5, 1.0, 1.0],
                           [1.0, 1.0, 0.7]])
    # Scan 0: position 0 is as bright in 2 of 3 others (9 and 8.5 >= 8), position 1 in none, position 2 in 2 of 3
    # (1.0 and 1.0 >= 0.8; 0.7 is not). Scan 3 is the dimmest everywhere: all 3 others count.
    assert train_mod.shared_uptake(uptake, 0, 0.5).tolist() == [True, False, True]
    assert train_mod.shared_uptake(uptake, 0, 0.7).tolist() == [False, False, False]
    assert train_mod.shared_uptake(uptake, 3, 1.0).tolist() == [True, True, True]


def test_tokens_bright_in_most_scans_are_spared_from_the_masks(tmp_path):
    cfg = config_mod.preset("tiny")
    cfg.iltm.mask_density_threshold = 2.0                           # every voxel flagged
    cfg.iltm.spare_shared_uptake = 0.5
    run = RunFolder(tmp_path / "run")
    # Scan i is a constant image of value i: at least 2 of the 4 others reach 80 % of it for i = 0, 1, 2 only.
    masks, _ = train_mod.detect_stage(run, cfg, 0, _Scans(5), [_RecordingDetector()], 0.02, Reporter("none"), 1.0)
    assert masks.all(dim=1).tolist() == [False, False, False, True, True]
    assert not masks[:3].any()
    import SimpleITK as sitk
    voxels = [int(sitk.GetArrayFromImage(sitk.ReadImage(str(run.mask_path(0, f"s{i}")))).sum()) for i in range(5)]
    assert voxels == [0, 0, 0, 64, 64]                              # the written masks agree with the token masks


def test_sparing_may_differ_per_dimension_and_bad_values_are_clear_errors():
    cfg = config_mod.preset("tiny").iltm
    assert cfg.spare_share(2) is None and cfg.spare_share(3) == 0.25   # the tiny preset spares in 3D only
    cfg.spare_shared_uptake = 0.4
    assert cfg.spare_share(2) == cfg.spare_share(3) == 0.4
    for bad in ({"4d": 0.2}, {"3d": 2.0}, -0.1, True):
        cfg.spare_shared_uptake = bad
        with pytest.raises(InputError, match="spare_shared_uptake"):
            config_mod.validate(cfg)
    cfg.spare_shared_uptake = {"2d": None, "3d": 0.3}
    config_mod.validate(cfg)


def test_sparing_acts_only_on_pet_intensities(tmp_path):
    cfg = config_mod.preset("tiny")
    cfg.iltm.mask_density_threshold, cfg.iltm.spare_shared_uptake = 2.0, 0.5
    cfg.data.intensity = "unit8bit"                                 # dark anomalies possible: nothing is spared
    masks, _ = train_mod.detect_stage(RunFolder(tmp_path / "run"), cfg, 0, _Scans(5), [_RecordingDetector()], 0.02,
                                      Reporter("none"), 1.0)
    assert bool(masks.all())


class _OneVoxelDetector(_RecordingDetector):
    """Flags voxel (4, 8) of every scan alone: token (1, 2) of the 4 x 4 latent grid."""

    def detect_array(self, image, threshold, generator):
        log_density = torch.zeros(image.shape[1:])
        log_density[4, 8] = -10.0
        return type("R", (), {"log_density": log_density})()


def test_cross_fitted_run_keeps_fold_transformers_and_uses_the_mask_threshold(cohort2d, tmp_path):
    run = tmp_path / "run"
    assert run_cli("train", "--data", cohort2d, "--out", run, "--preset", "tiny", "--max-iterations", "1",
                   "--set", "iltm.stop_change=0", "--set", "iltm.cross_fit_folds=2",
                   "--set", "iltm.mask_density_threshold=1e9", "--set", "iltm.spare_shared_uptake=null", *FAST) == 0
    history = json.loads((run / "history.json").read_text(encoding="utf-8"))
    assert [r["iteration"] for r in history["iterations"]] == [0, 1]
    # The masks flag every token, so no token is left to judge the iterations by: detection keeps iteration 0.
    assert history["detection_iteration"] == history["best_iteration"] == 0
    for rec in history["iterations"]:
        k = rec["iteration"]
        # tiny fits the full-cohort Transformer only for the iteration detection uses
        assert (run / f"iteration_{k:03d}" / "transformer.pt").is_file() == (k == 0)
        assert sorted(p.name for p in (run / f"iteration_{k:03d}" / "folds").iterdir()) == \
            ["transformer_fold0.pt", "transformer_fold1.pt"]
        assert rec["fold_train_seconds"] > 0
        # Every KDE density is below 1e9, so the training masks cover every token.
        assert rec["masked_fraction"] == 1.0
    assert not list(run.rglob("*_checkpoint.pt"))


def _fold_epochs(run, k=0):
    return [len(torch.load(run / f"iteration_{k:03d}" / "folds" / f"transformer_fold{j}.pt", map_location="cpu",
                           weights_only=False)["extra"]["losses"]) for j in (0, 1)]


def test_a_run_trains_with_the_transformer_schedule_that_predicts_held_out_tokens_better(cohort2d, tmp_path):
    run = tmp_path / "run"
    assert run_cli("train", "--data", cohort2d, "--out", run, "--preset", "tiny", "--max-iterations", "1",
                   "--set", "iltm.stop_change=0", *FAST, "--set", "transformer.epochs=4",
                   "--set", "transformer.shorter_epochs={2d: 2, 3d: 3}") == 0
    history = json.loads((run / "history.json").read_text(encoding="utf-8"))
    choice = history["transformer_epochs"]
    nll = {int(e): v for e, v in choice["held_out_nll"].items()}
    assert choice["candidates"] == [4, 2] and choice["epochs"] == min(nll, key=nll.get)
    recorded = config_mod.load(run / "config.yaml").transformer
    assert (recorded.epochs, recorded.shorter_epochs) == (choice["epochs"], 2)      # the 2D value, and the choice
    for k in (0, 1):                                                                # every fit of the run uses it
        assert _fold_epochs(run, k) == [choice["epochs"]] * 2
    assert not (run / train_mod.SHORTER_SCHEDULE_DIR).exists()
    # The recorded NLL is the held-out NLL of the kept fold Transformers.
    tokens = torch.load(run / "tokens.pt", weights_only=False)["tokens"]
    assert train_mod.held_out_nll(RunFolder(run), tokens, 2, torch.device("cpu")) == pytest.approx(
        nll[choice["epochs"]], rel=1e-6)


@pytest.mark.parametrize("shorter_wins", [True, False])
def test_the_schedule_with_the_lower_held_out_nll_is_kept(cohort2d, tmp_path, monkeypatch, shorter_wins):
    def fake_nll(run, tokens, folds, device):
        shorter = run.root.name == train_mod.SHORTER_SCHEDULE_DIR
        return 1.0 if shorter == shorter_wins else 2.0

    monkeypatch.setattr(train_mod, "held_out_nll", fake_nll)
    run = tmp_path / "run"
    assert run_cli("train", "--data", cohort2d, "--out", run, "--preset", "tiny", "--max-iterations", "0",
                   *FAST, "--set", "transformer.epochs=3", "--set", "transformer.shorter_epochs=1") == 0
    chosen = 1 if shorter_wins else 3
    assert json.loads((run / "history.json").read_text(encoding="utf-8"))["transformer_epochs"]["epochs"] == chosen
    assert _fold_epochs(run) == [chosen, chosen]
    assert config_mod.load(run / "config.yaml").transformer.epochs == chosen
    # The full-cohort Transformer, fitted after the choice, follows it too.
    full = torch.load(run / "iteration_000" / "transformer.pt", map_location="cpu", weights_only=False)
    assert len(full["extra"]["losses"]) == chosen


def test_a_run_stopped_after_choosing_the_shorter_schedule_moves_its_fold_fits_on_resume(tmp_path):
    cfg = config_mod.preset("tiny")
    cfg.data.spatial_dims = 2
    run, side = RunFolder(tmp_path / "run"), RunFolder(tmp_path / "run" / train_mod.SHORTER_SCHEDULE_DIR)
    for j in (0, 1):                       # both schedules' fold fits on disk, the choice made and recorded
        for folder, text in ((run, b"80 epochs"), (side, b"40 epochs")):
            folder.fold_transformer_path(0, j).parent.mkdir(parents=True, exist_ok=True)
            folder.fold_transformer_path(0, j).write_bytes(text)
    history = {"iterations": [], "transformer_epochs": {"epochs": 40, "candidates": [80, 40], "held_out_nll": {}}}
    train_mod.choose_epochs_stage(run, cfg, torch.zeros(4, 6, dtype=torch.long), history, torch.device("cpu"),
                                  Reporter("none"))
    assert [run.fold_transformer_path(0, j).read_bytes() for j in (0, 1)] == [b"40 epochs"] * 2
    assert not side.root.exists()


def test_shorter_epochs_are_off_unless_below_epochs_and_without_folds(cohort2d, tmp_path):
    tiny = config_mod.preset("tiny").transformer
    assert tiny.shorter_for(2) == 40 and tiny.shorter_for(3) == 0
    tiny.epochs = 40                                  # --set transformer.epochs=40 (or less) asks for that schedule
    assert tiny.shorter_for(2) == 0
    run = tmp_path / "run"
    assert run_cli("train", "--data", cohort2d, "--out", run, "--preset", "tiny", "--max-iterations", "0", *FAST,
                   "--set", "transformer.epochs=3", "--set", "transformer.shorter_epochs=1",
                   "--set", "iltm.cross_fit_folds=0") == 0
    assert "transformer_epochs" not in json.loads((run / "history.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("setting, message", [("iltm.cross_fit_folds=1", "cross_fit_folds"),
                                              ("iltm.cross_fit_folds=99", "at least 99 training scans"),
                                              ("iltm.mask_density_threshold=-1", "mask_density_threshold"),
                                              ("iltm.spare_shared_uptake=1.5", "spare_shared_uptake")])
def test_bad_cross_fit_settings_are_clear_errors(cohort2d, tmp_path, setting, message):
    proc = cli_subprocess("train", "--data", cohort2d, "--out", tmp_path / "r", "--preset", "tiny", "--set", setting)
    assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()


def test_check_accepts_off_and_sensible_values():
    cfg = config_mod.preset("tiny").iltm
    cfg.check_cohort(5)
    cfg.cross_fit_folds, cfg.mask_density_threshold = 5, 0.05
    cfg.check_cohort(5)
    with pytest.raises(InputError, match="cross_fit_folds=5 needs at least 5"):
        cfg.check_cohort(4)


def test_set_reads_exponents_without_a_dot_as_numbers():
    cfg = config_mod.preset("tiny")
    config_mod.set_dotted(cfg, "iltm.mask_density_threshold", "1e-3")
    config_mod.set_dotted(cfg, "data.intensity", "8bit")
    assert cfg.iltm.mask_density_threshold == 0.001 and cfg.data.intensity == "8bit"


def test_self_scoring_run_as_in_the_paper_fits_no_fold_transformers(cohort2d, tmp_path):
    run = tmp_path / "run"
    assert run_cli("train", "--data", cohort2d, "--out", run, "--preset", "tiny", "--max-iterations", "0",
                   "--set", "iltm.cross_fit_folds=0", "--set", "iltm.mask_density_threshold=null", *FAST) == 0
    record = json.loads((run / "history.json").read_text(encoding="utf-8"))["iterations"][0]
    assert "fold_train_seconds" not in record and not (run / "iteration_000" / "folds").exists()
    assert len(list((run / "iteration_000" / "masks").glob("*_mask.nii.gz"))) == 8
    # The tiny preset's per-dimension settings are resolved for these 2D scans and recorded as such.
    recorded = config_mod.load(run / "config.yaml")
    assert recorded.iltm.spare_shared_uptake is None and recorded.vqvae.min_steps == 0
    assert (recorded.vqvae.batch_size, recorded.vqvae.max_steps) == (8, 0)
    assert json.loads((run / "history.json").read_text(encoding="utf-8"))["vqvae"]["batch_size"] == 8


def test_max_iterations_per_dimension_sets_the_loops_length_and_is_recorded(cohort2d, tmp_path):
    tiny = config_mod.preset("tiny").iltm
    assert (tiny.iterations_for(2), tiny.iterations_for(3), config_mod.preset("paper").iltm.iterations_for(3)) == \
        (3, 1, 5)
    run = tmp_path / "run"
    # stop_change 0: only the count ends the loop, after iteration 1 for these 2D scans (0 would be 3D's count).
    assert run_cli("train", "--data", cohort2d, "--out", run, "--preset", "tiny", "--set",
                   "iltm.max_iterations={2d: 1, 3d: 0}", "--set", "iltm.stop_change=0", *FAST) == 0
    history = json.loads((run / "history.json").read_text(encoding="utf-8"))
    assert [r["iteration"] for r in history["iterations"]] == [0, 1]
    assert history["stop_reason"] == "reached --max-iterations (1)"
    assert config_mod.load(run / "config.yaml").iltm.max_iterations == 1
    for bad in (-1, {"3d": -2}, {"4d": 1}):
        with pytest.raises(InputError, match="iltm.max_iterations"):
            config_mod.build("tiny", iltm__max_iterations=bad)


def test_a_run_sparing_every_shared_token_masks_nothing(cohort2d, tmp_path):
    run = tmp_path / "run"
    # Every voxel falls below tau = 1e9, but a share of 0 spares every token: the real detector's path end to end.
    assert run_cli("train", "--data", cohort2d, "--out", run, "--preset", "tiny", "--max-iterations", "0",
                   "--set", "iltm.mask_density_threshold=1e9", "--set", "iltm.spare_shared_uptake=0", *FAST) == 0
    assert json.loads((run / "history.json").read_text(encoding="utf-8"))["iterations"][0]["masked_fraction"] == 0.0


def test_same_seed_same_map_whatever_ran_before():
    from iltm.detect import Detector
    from iltm.transformer import TokenTransformer
    from iltm.vqvae import build_vqvae

    torch.manual_seed(0)
    cfg = config_mod.preset("tiny")
    cfg.data.spatial_size = [16, 16]
    vqvae = build_vqvae(cfg.vqvae, 2)                                   # untrained: dropout visibly matters
    transformer = TokenTransformer(cfg.transformer, num_codes=cfg.vqvae.num_embeddings, seq_len=16)
    detector = Detector(cfg, vqvae, transformer, (4, 4), torch.device("cpu"))
    image = torch.rand(1, 16, 16)

    def detect(seed: int) -> torch.Tensor:
        return detector.detect_array(image, generator=torch.Generator().manual_seed(seed)).log_density

    first = detect(5)
    torch.rand(1000)  # other work in between draws from the global RNG
    assert torch.equal(detect(5), first)
    assert not torch.equal(detect(6), first)


def test_encoding_keeps_the_decoders_dropout_on_in_detection_mode():
    from iltm.vqvae import build_vqvae, decode_tokens, encode_tokens, set_detection_mode

    torch.manual_seed(0)
    vqvae = build_vqvae(config_mod.preset("tiny").vqvae, 2)
    set_detection_mode(vqvae)
    tokens = encode_tokens(vqvae, torch.rand(1, 1, 16, 16))
    assert vqvae.decoder.training and not vqvae.encoder.training and not vqvae.training
    assert not torch.equal(decode_tokens(vqvae, tokens), decode_tokens(vqvae, tokens))


def test_a_collapsed_codebook_is_recorded_and_warned_about(cohort2d, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert run_cli("train", "--data", cohort2d, "--out", run, "--preset", "tiny", "--max-iterations", "0",
                   "--set", "vqvae.num_embeddings=1", *FAST) == 0
    assert json.loads((run / "history.json").read_text(encoding="utf-8"))["vqvae"]["codes_used"] == 1
    assert "codebook collapsed" in capsys.readouterr().err
    healthy = tmp_path / "healthy"
    assert run_cli("train", "--data", cohort2d, "--out", healthy, "--preset", "tiny", "--max-iterations", "0",
                   "--set", "vqvae.epochs=40", *FAST[2:]) == 0
    assert json.loads((healthy / "history.json").read_text(encoding="utf-8"))["vqvae"]["codes_used"] >= 2
    assert "codebook collapsed" not in capsys.readouterr().err
    real = train_mod.tokenize_stage

    def four_codes(*args, **kwargs):  # a codebook that collapsed onto 4 of its 128 codes
        tokens = real(*args, **kwargs)
        return torch.arange(tokens.numel()).reshape(tokens.shape) % 4

    monkeypatch.setattr(train_mod, "tokenize_stage", four_codes)
    partly = tmp_path / "partly"
    assert run_cli("train", "--data", cohort2d, "--out", partly, "--preset", "tiny", "--max-iterations", "0",
                   *FAST) == 0
    assert json.loads((partly / "history.json").read_text(encoding="utf-8"))["vqvae"]["codes_used"] == 4
    err = capsys.readouterr().err
    assert "uses only 4 of its 128 codes" in err and "every position" not in err


def test_the_tiny_vqvae_learns_3d_pet(tmp_path):
    """At the tiny preset's learning rate the 3D VQ-VAE beats the all-zero reconstruction with several codes.

    At the former 2e-3 its ReLUs died within a few steps: every scan was one code and the output all but zero.
    """
    import torch.nn.functional as F

    from iltm.io import list_images, read_image
    from iltm.preprocess import Preprocessor
    from iltm.synth import SUV_CLIP, make_cohort
    from iltm.vqvae import build_vqvae, encode_tokens

    make_cohort(tmp_path / "c", dims=3, n=8, anomalous_fraction=0.0, seed=0, size=(32, 24, 40))
    cfg = config_mod.preset("tiny")
    cfg.data.spatial_dims, cfg.data.clip_value = 3, SUV_CLIP
    pre = Preprocessor(cfg.data, cfg.vqvae.downsample_factor)
    x = torch.stack([torch.from_numpy(pre.forward(read_image(r.image))[0])
                     for r in list_images(tmp_path / "c" / "images")]).float()
    torch.manual_seed(0)
    model = build_vqvae(cfg.vqvae, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.vqvae.learning_rate)
    for step in range(200):
        batch = x[[(2 * step) % 8, (2 * step + 1) % 8]]
        recon, quantization_loss = model(batch)
        loss = F.l1_loss(recon, batch) + quantization_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        error = float(F.l1_loss(model(x)[0], x))
    trivial = float(x.abs().mean())  # the error of reconstructing every scan as zeros
    assert error < 0.7 * trivial
    assert torch.unique(encode_tokens(model, x)).numel() >= 2


def test_the_learning_rate_follows_a_cosine_down_to_a_tenth():
    factors = [train_mod.lr_factor(e, 10) for e in range(11)]
    assert factors[0] == 1.0 and abs(factors[10] - 0.1) < 1e-12 and abs(factors[5] - 0.55) < 1e-12
    assert all(a > b for a, b in zip(factors, factors[1:]))
    assert train_mod.lr_factor(15, 10) == factors[10]             # past the schedule it stays at the floor


def test_a_small_cohort_trains_the_vqvae_in_smaller_batches_to_make_min_steps(tmp_path, monkeypatch):
    size = train_mod.stage_batch_size
    assert size(24, 8, 200, 0) == 8                   # off: the configured batch
    assert size(24, 8, 200, 2400) == 2                # 24 / 2 x 200 = 2400 steps
    assert size(48, 8, 200, 1200) == 8                # already enough steps
    assert size(5, 8, 10, 20) == 4                    # ceil(5 / 4) x 10 = 20; a batch of 5 makes only 10
    assert size(24, 8, 200, 10 ** 6) == 1             # never below one scan
    cfg = config_mod.preset("tiny")
    cfg.data.spatial_dims, cfg.data.augment = 2, False
    cfg.vqvae.channels, cfg.vqvae.num_res_channels, cfg.vqvae.embedding_dim = [8, 8], 8, 4
    cfg.vqvae.epochs, cfg.vqvae.batch_size = 3, 4
    data = _Scans(4)
    data.arrays = [np.random.default_rng(i).random((1, 16, 16), dtype=np.float32) for i in range(4)]
    batches = []
    loss = train_mod.vqvae_loss
    monkeypatch.setattr(train_mod, "vqvae_loss", lambda model, x: batches.append(x.shape[0]) or loss(model, x))
    cases = ((0, [4] * 3), (6, [3, 1] * 3),      # 2 batches an epoch of at most 3 scans
             ({"3d": 6}, [4] * 3), ({"2d": 6}, [3, 1] * 3))   # one per dimension: these scans are 2D
    for case, (min_steps, expected) in enumerate(cases):
        cfg.vqvae.min_steps = min_steps
        batches.clear()
        run = RunFolder(tmp_path / f"case{case}")
        run.root.mkdir()
        summary = train_mod.train_vqvae_stage(run, cfg, data, torch.device("cpu"), Reporter("none"), 1.0)
        assert batches == expected and summary["batch_size"] == expected[0]
    for bad in (-1, {"4d": 10}, {"3d": 1.5}):
        cfg.vqvae.min_steps = bad
        with pytest.raises(InputError, match="vqvae.min_steps"):
            config_mod.validate(cfg)


def test_vqvae_max_steps_cut_the_epochs_so_that_a_larger_cohort_costs_no_more(tmp_path, monkeypatch):
    tiny = config_mod.preset("tiny").vqvae
    assert (tiny.batch_for(2), tiny.min_steps_for(2), tiny.max_steps_for(2)) == (8, 0, 0)
    # 3D: 2400 steps of at most 2 volumes, whatever the cohort: 24 volumes train exactly as before the cap.
    assert [train_mod.vqvae_schedule(n, tiny, 3) for n in (12, 24, 40, 96)] == [(1, 200), (2, 200), (2, 120),
                                                                                (2, 50)]
    assert train_mod.vqvae_schedule(40, tiny, 2) == (8, 200)
    vq = config_mod.preset("paper").vqvae
    schedule = train_mod.vqvae_schedule
    vq.epochs, vq.max_steps, vq.batch_size = 200, {"3d": 2400}, {"2d": 8, "3d": 1}
    assert schedule(24, vq, 3) == (1, 100)            # 24 steps an epoch
    assert schedule(40, vq, 3) == (1, 60)             # the steps stay 2400 whatever the cohort
    assert schedule(7, vq, 3) == (1, 200)             # 200 epochs make only 1400: not cut
    assert schedule(13, vq, 3) == (1, 185)            # whole epochs: 185 x 13 = 2405
    assert schedule(40, vq, 2) == (8, 200)            # no cap and batches of 8 for 2D scans
    vq.epochs = 10
    assert schedule(40, vq, 3) == (1, 10)             # fewer epochs asked: fewer steps
    vq.epochs, vq.batch_size, vq.min_steps = 200, 8, 2400
    assert schedule(24, vq, 3) == (2, 200)            # min_steps shrink the batch first: 12 steps x 200 = 2400
    # Through the training stage: 4 scans in batches of 3 make 2 steps an epoch; 5 steps take 3 of the 50 epochs.
    cfg = config_mod.preset("tiny")
    cfg.data.spatial_dims, cfg.data.augment = 2, False
    cfg.vqvae.channels, cfg.vqvae.num_res_channels, cfg.vqvae.embedding_dim = [8, 8], 8, 4
    cfg.vqvae.epochs, cfg.vqvae.batch_size, cfg.vqvae.max_steps = 50, {"2d": 3, "3d": 1}, {"2d": 5}
    cfg.vqvae.min_steps = 0
    data = _Scans(4)
    data.arrays = [np.random.default_rng(i).random((1, 16, 16), dtype=np.float32) for i in range(4)]
    batches = []
    loss = train_mod.vqvae_loss
    monkeypatch.setattr(train_mod, "vqvae_loss", lambda model, x: batches.append(x.shape[0]) or loss(model, x))
    run = RunFolder(tmp_path / "run")
    run.root.mkdir()
    summary = train_mod.train_vqvae_stage(run, cfg, data, torch.device("cpu"), Reporter("none"), 1.0)
    assert batches == [3, 1] * 3 and (summary["epochs"], summary["batch_size"]) == (3, 3)
    for name, bad in (("max_steps", -5), ("max_steps", {"3d": 0.5}), ("batch_size", 0), ("batch_size", {"5d": 2})):
        cfg.vqvae.max_steps, cfg.vqvae.batch_size = 0, 8
        setattr(cfg.vqvae, name, bad)
        with pytest.raises(InputError, match=f"vqvae.{name}"):
            config_mod.validate(cfg)


@pytest.mark.parametrize("codes, retries, kept, set_aside", [
    ([10, 50], 1, 1, [0]),              # the retry uses enough codes: kept
    ([10, 5], 1, 0, [1]),               # the retry is worse: the first one is put back
    ([10, 20, 50, 90], 2, 2, [0, 1]),   # up to two retries; a third is never trained
    ([10, 20], 0, 0, []),               # off: a partly collapsed VQ-VAE is kept as it is
    ([60, 90], 3, 0, []),               # 60 of 128 codes is not a collapse (a quarter is 32)
])
def test_a_partly_collapsed_vqvae_is_trained_again_and_the_one_using_most_codes_kept(tmp_path, monkeypatch, codes,
                                                                                       retries, kept, set_aside):
    run = RunFolder(tmp_path / "run")
    run.root.mkdir()
    trained = []

    def fake_trained_vqvae(run, cfg, data, history, device, reporter, units):
        if not run.vqvae_path.is_file():                             # train attempt n: its file holds n
            n = len(trained)
            run.vqvae_path.write_text(str(n))
            history["vqvae"] = {"attempt": n, "codes_used": codes[n]}
            trained.append(n)
        current = int(run.vqvae_path.read_text())
        return current, {}, None, codes[current]

    monkeypatch.setattr(train_mod, "_trained_vqvae", fake_trained_vqvae)
    cfg = config_mod.preset("tiny")
    cfg.vqvae.collapse_retries = retries
    history = {"iterations": []}
    model, _, _, used = train_mod.vqvae_stage(run, cfg, None, history, torch.device("cpu"), Reporter("none"))
    assert trained == sorted([kept, *set_aside]) and model == kept and used == codes[kept]
    assert history["vqvae"] == {"attempt": kept, "codes_used": codes[kept]}
    assert [a["attempt"] for a in history.get("vqvae_attempts", [])] == set_aside
    for a in history.get("vqvae_attempts", []):                      # each set-aside model is where its record says
        assert int((run.root / a["file"]).read_text()) == a["attempt"]
    if set_aside:                                                    # what was set aside is on disk at once
        assert json.loads(run.history_path.read_text(encoding="utf-8"))["vqvae_attempts"] == history["vqvae_attempts"]


def test_a_run_retrains_its_collapsed_vqvae_from_another_initialisation(cohort2d, tmp_path):
    run = tmp_path / "run"
    # Four epochs leave the tiny codebook collapsed on these scans: one retry, then the run goes on as usual.
    assert run_cli("train", "--data", cohort2d, "--out", run, "--preset", "tiny", "--max-iterations", "0",
                   "--set", "vqvae.collapse_retries=1", *FAST) == 0
    history = json.loads((run / "history.json").read_text(encoding="utf-8"))
    assert len(history["vqvae_attempts"]) == 1 and history["vqvae_attempts"][0]["codes_used"] < 32
    kept, aside = history["vqvae"], history["vqvae_attempts"][0]
    assert {kept.get("attempt", 0), aside.get("attempt", 0)} == {0, 1}
    assert (run / aside["file"]).is_file() and (run / "vqvae.pt").is_file() and (run / "tokens.pt").is_file()
    assert kept["codes_used"] >= aside["codes_used"]
    assert not list(run.glob("vqvae_swap.pt")) and not list(run.glob("*_checkpoint.pt"))
    assert history["iterations"][0]["iteration"] == 0


def test_collapse_retries_may_differ_per_dimension_and_bad_values_are_clear_errors():
    vq = config_mod.preset("tiny").vqvae
    assert vq.retries_for(3) == 1 and vq.retries_for(2) == 0       # the 2D tiny VQ-VAE never collapsed
    for bad in (-1, 0.5, {"3d": -1}, {"1d": 1}):
        vq.collapse_retries = bad
        with pytest.raises(InputError, match="collapse_retries"):
            config_mod.validate(vq, prefix="vqvae.")
    vq.collapse_retries = 2
    config_mod.validate(vq, prefix="vqvae.")
    assert vq.retries_for(2) == vq.retries_for(3) == 2


def test_an_interrupted_vqvae_retry_resumes_with_the_retry(tmp_path, monkeypatch):
    run = RunFolder(tmp_path / "run")
    run.root.mkdir()
    codes, trained = [10, 50], []

    def fake_trained_vqvae(run, cfg, data, history, device, reporter, units):
        if not run.vqvae_path.is_file():
            n = len(history.get("vqvae_attempts", []))              # as the real one numbers its attempts
            if n == 1 and not trained[1:]:
                trained.append("interrupted")
                raise KeyboardInterrupt
            run.vqvae_path.write_text(str(n))
            history["vqvae"] = {"attempt": n, "codes_used": codes[n]}
            run.write_json(run.history_path, history)
            trained.append(n)
        current = int(run.vqvae_path.read_text())
        return current, {}, None, codes[current]

    monkeypatch.setattr(train_mod, "_trained_vqvae", fake_trained_vqvae)
    cfg = config_mod.preset("tiny")
    cfg.vqvae.collapse_retries = 1
    with pytest.raises(KeyboardInterrupt):
        train_mod.vqvae_stage(run, cfg, None, {"version": RUN_VERSION, "iterations": []}, torch.device("cpu"),
                              Reporter("none"))
    history = run.history()                                          # what a resumed run reads back
    model, _, _, used = train_mod.vqvae_stage(run, cfg, None, history, torch.device("cpu"), Reporter("none"))
    assert trained == [0, "interrupted", 1] and model == 1 and used == 50
    assert [a["attempt"] for a in history["vqvae_attempts"]] == [0]


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def test_a_run_fitting_only_the_used_full_transformer_keeps_the_same_models(cohort2d, tmp_path, capsys):
    """iltm.full_transformers=used (tiny) leaves out the full-cohort fits of the iterations detection does not use;
    the models it keeps are those a run fitting every one has, and --full-fit K fits K's later."""
    # detection with the last iteration, whatever these few-epoch models predict: the full fits left out are the test
    common = ["--data", cohort2d, "--preset", "tiny", "--max-iterations", "2", "--set", "iltm.stop_change=0",
              "--set", "iltm.mask_density_threshold=0.5", "--set", "iltm.select_iteration=last", *FAST]
    every, used = tmp_path / "every", tmp_path / "used"
    assert run_cli("train", "--out", every, *common, "--set", "iltm.full_transformers=every") == 0
    assert run_cli("train", "--out", used, *common) == 0
    history = json.loads((used / "history.json").read_text(encoding="utf-8"))
    assert [r["iteration"] for r in history["iterations"]] == [0, 1, 2] and history["detection_iteration"] == 2
    assert [k for k in range(3) if RunFolder(used).transformer_path(k).is_file()] == [2]
    assert [r.get("train_seconds") is not None for r in history["iterations"]] == [False, False, True]
    masked = [r["masked_fraction"] for r in history["iterations"]]
    assert masked[1] > 0  # iterations 1 and 2 were trained with masks, so the check below is not trivial
    assert masked == [r["masked_fraction"] for r in
                      json.loads((every / "history.json").read_text(encoding="utf-8"))["iterations"]]
    for k in range(3):
        for j in range(2):
            a, b = (_weights(RunFolder(r).fold_transformer_path(k, j)) for r in (every, used))
            assert all(torch.equal(a[n], b[n]) for n in a)
    a, b = (_weights(RunFolder(r).transformer_path(2)) for r in (every, used))
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert RunFolder(used).check_for_detection() == 2
    # Detection with an iteration whose full model was left out: one line that says how to fit it.
    capsys.readouterr()
    assert run_cli("detect", "--run", used, "--input", cohort2d / "images", "--out", tmp_path / "d",
                   "--iteration", "1") != 0
    err = capsys.readouterr().err
    assert "iteration 1 has no full-cohort Transformer" in err and "--full-fit 1" in err and "Traceback" not in err
    assert not (tmp_path / "d").exists()
    assert run_cli("train", "--resume", used, "--full-fit", "1") == 0
    a, b = (_weights(RunFolder(r).transformer_path(1)) for r in (every, used))
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert RunFolder(used).check_for_detection() == 2 and RunFolder(used).check_for_detection(1) == 1
    assert run_cli("train", "--resume", used, "--full-fit", "7") != 0
    assert "iteration 7" in capsys.readouterr().err


def test_resuming_a_run_that_lost_its_used_full_transformer_fits_it_again(cohort2d, tmp_path):
    run = tmp_path / "run"
    assert run_cli("train", "--data", cohort2d, "--out", run, "--preset", "tiny", "--max-iterations", "1",
                   "--set", "iltm.select_iteration=last", *FAST) == 0
    path = RunFolder(run).transformer_path(1)
    before = _weights(path)
    path.unlink()
    assert run_cli("train", "--resume", run) == 0
    after = _weights(path)
    assert all(torch.equal(before[n], after[n]) for n in before)
    # Nothing else was redone: iteration 0 still has no full model, and its masks were kept.
    assert not RunFolder(run).transformer_path(0).is_file()
