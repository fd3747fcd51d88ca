"""iltm_bench.resampled_share: the share of a run's held-out training tokens below each t."""

from __future__ import annotations

import numpy as np

from iltm.checkpoint import load_checkpoint
from iltm.run import RunFolder
from iltm.transformer import TokenTransformer
from iltm_bench import resampled_share


def test_shares_are_those_of_the_fold_transformers_own_probabilities(run2d, capsys):
    out = resampled_share.shares(run2d, thresholds=(0.5, 0.1, 0.01), quantiles=(0.1, 0.5))
    run = RunFolder(run2d)
    tokens = load_checkpoint(run.tokens_path, "iltm-tokens", 1)["tokens"]
    # Each training scan scored by the fold Transformer fitted without it (scan i is in fold i mod 2).
    p = np.concatenate([TokenTransformer.load(run.fold_transformer_path(0, i % 2)).eval()
                        .token_probabilities(tokens[i:i + 1])[0].double().numpy() for i in range(tokens.shape[0])])
    assert out["probabilities"] == "held-out" and out["tokens"] == p.size
    for t, share in out["below"].items():
        assert abs(share - float((p < t).mean())) < 1e-9
    assert out["below"][0.5] >= out["below"][0.1] >= out["below"][0.01]
    assert abs(out["quantiles"][0.5] - float(np.quantile(p, 0.5))) < 1e-6
    assert resampled_share.main([str(run2d), "--thresholds", "0.1"]) == 0
    assert "| held-out |" in capsys.readouterr().out
