"""Decoder-only Transformer over VQ-VAE token rasters: p(s_i | s_<i) with latent token masking (DESIGN.md, 2-4).

Read top to bottom: attention, MLP, block, then the model (embeddings, mask, forward, loss, likelihoods, healing,
saving). Shapes in comments use B batch, L sequence length, T tokens processed in this call, K keys attended
(cached ones included), C = n_embd, H = n_head, V = num_codes.

The sequence fed to the network is [BOS, s_0, ..., s_{L-2}] and position i predicts s_i, so input position j >= 1
carries the token s_{j-1}. Masking a token therefore hides the *key* at position j = i + 1 from every query and
drops the *target* i from the loss.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import warnings
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import TransformerConfig
from .checkpoint import load_checkpoint, save_checkpoint
from .errors import InputError

# The attention mask of a pass from position 0 with no masked key: scaled_dot_product_attention's own causal mask,
# whose fused CPU kernel skips the blocks above the diagonal instead of reading a (T, K) mask.
CAUSAL = "causal"


@dataclasses.dataclass
class CausalKeyBias:
    """The mask of a pass from position 0 with masked keys, where the fused CPU kernel can take it: its own causal
    mask plus ``bias`` (B, 1, 1, K), 0 = may attend, -inf = masked key. Read once per key instead of a (B, 1, T, K)
    mask per query and key: the masked training step then costs about what an unmasked one does
    (``iltm_bench.cpu_profile``)."""

    bias: torch.Tensor

CHECKPOINT_FORMAT = "iltm-transformer"
CHECKPOINT_VERSION = 1
# Most tokens healing teacher-forces in one call: bounds a call's attention mask (piece x keys) and activations.
TEACHER_FORCED_PIECE = 1024
# How healing runs its model calls (``TokenTransformer.heal``): "eager" at each call's own shapes; "static" at
# fixed shapes (see :class:`StaticSteps`); "graphs" the static calls captured once as CUDA graphs and replayed.
HEAL_STEPS = ("eager", "static", "graphs")
# The piece lengths of the static calls: a call of T tokens runs at the smallest bucket >= T. Longer pieces are
# compute-bound rather than launch-bound, so they stay eager.
STATIC_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


@functools.lru_cache(maxsize=None)
def fused_key_bias_on_cpu() -> bool:
    """Whether this torch's fused CPU attention takes a per-key bias together with its own causal mask (torch 2.3
    and later; its unfused path refuses the pair), checked once on a tiny input against the dense mask."""
    q = torch.randn(1, 1, 3, 4, generator=torch.Generator().manual_seed(0))
    bias = torch.tensor([0.0, float("-inf"), 0.0]).reshape(1, 1, 1, 3)
    dense = torch.tensor([[0.0, float("-inf"), float("-inf")], [0.0, float("-inf"), float("-inf")],
                          [0.0, float("-inf"), 0.0]])
    try:
        fused = F.scaled_dot_product_attention(q, q, q, attn_mask=bias, is_causal=True)
    except RuntimeError:
        return False
    return bool(torch.allclose(fused, F.scaled_dot_product_attention(q, q, q, attn_mask=dense), atol=1e-6))


def masked_cross_entropy(logits, tokens, token_mask=None):
    """The training loss: mean cross-entropy over the targets that are not masked.

    Args:
        logits: (B, L, V) from ``TokenTransformer.forward`` (called through DDP's wrapper when there is one).
        tokens: (B, L) the targets.
        token_mask: (B, L) bool, True = masked target (ignored).
    Returns:
        a scalar; 0 with a graph on an all-masked batch, which keeps DDP's gradient hooks alive.
    """
    if token_mask is not None and bool(token_mask.all()):
        return logits.sum() * 0.0
    targets = tokens if token_mask is None else tokens.masked_fill(token_mask, -100)
    logits = logits.float()  # the loss in float32 under autocast too
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


class CausalSelfAttention(nn.Module):

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0, "n_embd must be divisible by n_head"
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)  # q, k, v in one matmul
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, attn_mask, kv=None, start=0):
        # x (B, T, C); attn_mask from TokenTransformer._attention_mask; kv: this layer's cache buffers
        # (B, H, L, C/H) each, into which positions [start, start + T) are written.
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, C/H)
        if isinstance(start, torch.Tensor):  # a static call (StaticSteps): write at these (T,) positions and
            k_cache, v_cache = kv             # attend over the whole cache, the mask hiding what lies ahead
            k_cache.index_copy_(2, start, k)
            v_cache.index_copy_(2, start, v)
            k, v = k_cache, v_cache
        elif kv is not None:
            k_cache, v_cache = kv
            k_cache[:, :, start:start + T] = k
            v_cache[:, :, start:start + T] = v
            k, v = k_cache[:, :, :start + T], v_cache[:, :, :start + T]  # (B, H, K, C/H), K = start + T
        if isinstance(attn_mask, CausalKeyBias):
            mask, causal = attn_mask.bias, True
        else:
            mask, causal = (None, True) if attn_mask is CAUSAL else (attn_mask, False)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm: the residual stream itself is never normalised, which keeps deep stacks trainable."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x, attn_mask, kv=None, start=0):
        x = x + self.attn(self.ln_1(x), attn_mask, kv, start)
        return x + self.mlp(self.ln_2(x))


class TokenTransformer(nn.Module):
    """Autoregressive model of a token raster: ``forward`` scores every token given BOS and its prefix.

    Args:
        cfg: layer count, heads, width, dropout.
        num_codes: VQ-VAE codebook size V; the vocabulary adds one BOS id (= ``num_codes``).
        seq_len: tokens per image L (product of the latent grid's shape).
    """

    def __init__(self, cfg: TransformerConfig, num_codes: int, seq_len: int):
        super().__init__()
        self.cfg = cfg
        self.num_codes = int(num_codes)
        self.seq_len = int(seq_len)
        self.extra: dict = {}  # what ``save`` stored alongside the weights (filled by ``load``)
        self.wte = nn.Embedding(self.num_codes + 1, cfg.n_embd)
        self.wpe = nn.Embedding(self.seq_len, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        # Untied: the head never predicts BOS, so it has V outputs while the embedding has V + 1 rows. Its bias
        # carries the codes' marginal frequencies.
        self.head = nn.Linear(cfg.n_embd, self.num_codes)

        self.apply(self._init_weights)
        # GPT-2: every block adds two projections to the residual stream, so scale them to keep its variance
        # independent of depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def bos(self) -> int:
        return self.num_codes

    # ---- the network ------------------------------------------------------------------------------------------

    def _decode(self, inputs, start=0, cache=None, key_masked=None):
        """Run input ids at positions [start, start + T); with a cache, earlier positions come from it.

        Args:
            inputs: (B, T) long, ids in [0, num_codes] (BOS included).
            start: position of ``inputs[:, 0]``; positions before it must already be in ``cache``.
            cache: from ``_new_cache``; filled in place at [start, start + T).
            key_masked: (B, start + T) bool, True = no query may attend to that key.
        Returns:
            logits (B, T, V).
        """
        B, T = inputs.shape
        if start + T > self.seq_len:
            raise ValueError(f"sequence of {start + T} tokens is longer than the model's {self.seq_len}")
        q_pos = torch.arange(start, start + T, device=inputs.device)
        dropout = self.training and self.cfg.dropout > 0  # attention dropout takes the unfused path
        key_bias = inputs.device.type == "cpu" and not dropout and fused_key_bias_on_cpu()
        attn_mask = self._attention_mask(start, T, key_masked, inputs.device, key_bias=key_bias)
        if isinstance(attn_mask, CausalKeyBias):
            attn_mask = CausalKeyBias(attn_mask.bias.to(self._cache_dtype()))
        elif isinstance(attn_mask, torch.Tensor) and attn_mask.is_floating_point():
            # In the queries' dtype (bfloat16 under autocast), which the fused CUDA kernels need; once per pass.
            attn_mask = attn_mask.to(self._cache_dtype())
        x = self.drop(self.wte(inputs) + self.wpe(q_pos))  # (B, T, C)
        for layer, block in enumerate(self.blocks):
            x = block(x, attn_mask, None if cache is None else cache[layer], start)
        return self.head(self.ln_f(x))  # (B, T, V)

    @staticmethod
    def _attention_mask(start, T, key_masked=None, device=None, key_bias=False):
        """The mask every layer and head of one pass shares, for the queries at positions [start, start + T) over the
        keys [0, K), K = start + T: ``CAUSAL`` from position 0 with no masked key, a :class:`CausalKeyBias` from
        position 0 with masked keys when ``key_bias`` (the kernel takes both), None for one query that sees every
        key (a cached step), else a (B or 1, 1, T, K) float mask, 0 = may attend, -inf = may not, built once per
        pass in the form attention would otherwise make from a bool mask in every layer, forward and backward.

        Args:
            key_masked: (B, K) bool, True = no query may attend to that key. The BOS key (position 0) is never
                masked by construction, so no row is all -inf and softmax stays finite.
            key_bias: whether attention may combine its own causal mask with a per-key bias
                (:func:`fused_key_bias_on_cpu`).
        """
        if key_masked is None and start == 0:
            return CAUSAL
        if key_masked is None and T == 1:
            return None
        if key_bias and start == 0:
            bias = torch.zeros(key_masked.shape, device=device).masked_fill_(key_masked, float("-inf"))
            return CausalKeyBias(bias[:, None, None, :])
        q_pos = torch.arange(start, start + T, device=device)
        k_pos = torch.arange(start + T, device=device)
        allowed = (k_pos[None, :] <= q_pos[:, None])[None, None]  # (1, 1, T, K) causal
        if key_masked is not None:
            allowed = allowed & ~key_masked[:, None, None, :]  # (B, 1, T, K)
        return torch.zeros(allowed.shape, device=device).masked_fill_(~allowed, float("-inf"))

    def _new_cache(self, batch: int, length: int):
        """Per layer, key and value buffers (B, H, length, C/H), preallocated so a step writes in place rather
        than concatenating (which would copy the whole cache at every position)."""
        p = self.head.weight
        shape = (batch, self.cfg.n_head, length, self.cfg.n_embd // self.cfg.n_head)
        dtype = self._cache_dtype()
        return [(p.new_empty(shape, dtype=dtype), p.new_empty(shape, dtype=dtype)) for _ in self.blocks]

    def _cache_dtype(self) -> torch.dtype:
        # The dtype the layers' keys come out in here (bfloat16 under autocast), so attention reads what was written.
        return self.blocks[0].attn.c_attn(self.head.weight.new_zeros(1, self.cfg.n_embd)).dtype

    def heal_bytes(self, flagged, steps: str | None = None) -> int:
        """Memory of one sequence in :meth:`heal` of ``flagged`` (L,) bool with ``steps`` (None: the default on the
        model's device), what its ``batch`` multiplies: the KV cache in the dtype of the current context, that
        sequence's exponential noise (float32, flagged count x V), and the float32 activations of one teacher-forced
        piece (a few (P, C) tensors, the MLP's (P, 4C) and the logits (P, V)). Eager steps count the cache up to the
        last flagged token; static ones count the worst case of any scan (the whole sequence and a bucket more, every
        token flagged), so that every scan gets the same batch and the kept steps serve them all. 0 when nothing is
        flagged."""
        positions = torch.nonzero(flagged.reshape(-1)).flatten()
        if positions.numel() == 0:
            return 0
        length, count = int(positions[-1]) + 1, positions.numel()
        if self.heal_steps(steps) != "eager":
            length, count = static_cache_length(self.seq_len), self.seq_len
        cache = 2 * self.cfg.n_layer * length * self.cfg.n_embd * self._cache_dtype().itemsize
        noise = 4 * count * self.num_codes
        return cache + noise + 4 * min(length, TEACHER_FORCED_PIECE) * (8 * self.cfg.n_embd + self.num_codes)

    def heal_steps(self, steps: str | None = None) -> str:
        """``steps`` checked, or the default on the model's device: CUDA graphs on CUDA (unless capturing them failed
        on this model), eager elsewhere."""
        if steps is None or (steps == "graphs" and self._graphs_failed):
            steps = "graphs" if self.head.weight.device.type == "cuda" and not self._graphs_failed else "eager"
        if steps not in HEAL_STEPS:
            raise ValueError(f"steps={steps!r}: one of {', '.join(HEAL_STEPS)}")
        return steps

    _graphs_failed = False  # set on the instance when capturing healing's CUDA graphs raised

    def _inputs(self, tokens):
        # tokens (B, L) -> (B, L) [BOS, s_0, ..., s_{L-2}]: the shift that makes position i predict s_i.
        bos = torch.full_like(tokens[:, :1], self.bos)
        return torch.cat([bos, tokens[:, :-1]], dim=1)

    def forward(self, tokens, token_mask=None):
        """Scores of every token given BOS and its prefix.

        Args:
            tokens: (B, L) long codes in [0, num_codes).
            token_mask: (B, L) bool, True = token s_i is anomalous: no position may attend to it.
        Returns:
            logits (B, L, num_codes); ``logits[:, i]`` scores s_i.
        """
        key_masked = None
        if token_mask is not None:
            # Input position j carries s_{j-1}; position 0 is BOS and stays visible.
            key_masked = F.pad(token_mask.bool()[:, :-1], (1, 0), value=False)  # (B, L)
        return self._decode(self._inputs(tokens), key_masked=key_masked)

    @torch.no_grad()
    def token_probabilities(self, tokens, token_mask=None):
        """p(s_i | s_<i) for every token, (B, L) float. Call ``eval()`` first: dropout follows ``training``."""
        probs = F.softmax(self(tokens, token_mask).float(), dim=-1)  # (B, L, V)
        return probs.gather(-1, tokens[..., None]).squeeze(-1)

    @torch.no_grad()
    def heal(self, tokens, flagged, samples, generator=None, temperature=1.0, batch=None, steps=None):
        """Draw ``samples`` healed versions of one image's tokens, ``batch`` sequences at a time.

        Walking the raster in order, each flagged token is resampled from p(. | healed prefix); the others are kept.
        Between two flagged positions every token is known, so each such run is teacher-forced into the KV cache in
        parallel calls of at most ``TEACHER_FORCED_PIECE`` tokens (the first run, up to the first flagged token, is
        the prefill). That is about one model call per flagged token, every position processed at most once, and
        nothing after the last flagged token. Memory is ``batch`` x :meth:`heal_bytes`, whatever ``samples``.

        Reproducibility: ``generator`` gives each sequence j a seed, ``torch.randint(0, 2**62, (samples,))[j]``; a
        generator on the model's device seeded with it draws that sequence's noise ``E`` ~ Exp(1), (flagged count, V)
        in one call, and its k-th flagged token is ``argmax(p(. | healed prefix) / E[k])`` (what ``torch.multinomial``
        does for one sample, with its own noise). So the same generator state gives the same sequences whatever
        ``batch``, and (on a CPU, where a test checks it) sequence j is the same for any ``samples`` above j.

        Args:
            tokens: (L,) long codes.
            flagged: (L,) bool, True = resample this token.
            samples: number of healed sequences S.
            generator: ``torch.Generator`` (None: torch's global one) that seeds the sequences' noise.
            temperature: divides the logits before the softmax.
            batch: sequences healed at once; None = all S.
            steps: how the model calls run (:data:`HEAL_STEPS`); None = CUDA graphs on CUDA, eager elsewhere. The
                draws are the same up to float rounding of the probabilities (a test checks equality on a CPU).
        Returns:
            (S, L) long.
        """
        healed = tokens.reshape(1, -1).repeat(samples, 1)  # (S, L)
        positions = torch.nonzero(flagged.reshape(-1)).flatten().tolist()
        if not positions:
            return healed
        seeds = torch.randint(0, 2 ** 62, (samples,), generator=generator,
                              device=generator.device if generator is not None else "cpu").tolist()
        shape, device = (len(positions), self.num_codes), healed.device
        batch = samples if batch is None else min(batch, samples)
        steps = self.heal_steps(steps)
        static = None if steps == "eager" else self._static_steps(batch, temperature, steps)  # None: capture failed
        for first in range(0, samples, batch):
            noise = torch.stack([torch.empty(shape, device=device).exponential_(
                generator=torch.Generator(device=device).manual_seed(seed)) for seed in seeds[first:first + batch]])
            self._heal_batch(healed[first:first + batch], positions, noise, temperature, static)  # noise (b, F, V)
        return healed

    def _heal_batch(self, healed, positions, noise, temperature, static=None):
        # healed (b, L), resampled in place at ``positions``; noise (b, F, V) Exp(1), a row per flagged position.
        # With ``static`` (StaticSteps of at least b sequences), a run's last piece of at most STATIC_BUCKETS[-1]
        # tokens is its static call, and the eager pieces write into the first b rows of its cache.
        inputs = self._inputs(healed)  # (b, L); column i + 1 is updated once s_i has been drawn
        b = healed.shape[0]
        cache = (self._new_cache(b, positions[-1] + 1) if static is None
                 else [(k[:b], v[:b]) for k, v in static.cache])
        done = 0  # positions [0, done) are in the cache
        for k, i in enumerate(positions):
            # A long run in pieces: its attention mask (piece x keys) and activations stay small next to the cache.
            starts = range(done, i + 1, TEACHER_FORCED_PIECE)
            last = starts[-1]
            for a in starts[:-1]:
                self._decode(inputs[:, a:a + TEACHER_FORCED_PIECE], start=a, cache=cache)
            if static is not None and i + 1 - last <= STATIC_BUCKETS[-1]:
                healed[:, i] = static.draw(self, inputs[:, last:i + 1], last, noise[:, k])
            else:
                logits = self._decode(inputs[:, last:i + 1], start=last, cache=cache)
                probs = F.softmax(logits[:, -1].float() / temperature, dim=-1)  # (b, V) for s_i
                healed[:, i] = (probs / noise[:, k]).argmax(-1)
            if i + 1 < inputs.shape[1]:
                inputs[:, i + 1] = healed[:, i]
            done = i + 1

    def _static_draw(self, inputs, start, last, cache, noise, temperature):
        """One static call (:class:`StaticSteps`): run ``inputs`` (B, P) at positions ``start`` + [0, P) into
        ``cache`` (key and value buffers longer than ``start`` + P), every query attending over the whole cache up to
        its own position, and draw the token after row ``last`` (0-d tensors both): argmax of its probabilities over
        ``noise`` (B, V). Returns (B,) long. Rows after ``last`` are padding: their keys land beyond the last real
        position, hidden from the real queries and overwritten before any real query reaches them."""
        P = inputs.shape[1]
        positions = start + torch.arange(P, device=inputs.device)                 # (P,)
        keys = torch.arange(cache[0][0].shape[2], device=inputs.device)           # (K,)
        bias = torch.zeros(P, keys.numel(), device=inputs.device, dtype=cache[0][0].dtype)
        bias = bias.masked_fill_(keys[None, :] > positions[:, None], float("-inf"))[None, None]  # (1, 1, P, K)
        x = self.wte(inputs) + self.wpe(positions.clamp(max=self.seq_len - 1))    # (B, P, C)
        for layer, block in enumerate(self.blocks):
            x = block(x, bias, cache[layer], positions)
        logits = self.head(self.ln_f(x.index_select(1, last.reshape(1))))[:, 0]  # (B, V)
        probs = F.softmax(logits.float() / temperature, dim=-1)
        return (probs / noise).argmax(-1)

    def _static_steps(self, batch: int, temperature: float, steps: str) -> "StaticSteps | None":
        """The :class:`StaticSteps` of ``batch`` sequences (a smaller last batch runs in its first rows), kept on the
        model for the next scans: its cache and graphs stay allocated, one set at a time. With "graphs", captured on
        first use; where capturing fails or a replay does not repeat the call it captured, None (healing runs
        eagerly from then on) and a warning."""
        key = (batch, float(temperature), steps, self._cache_dtype(), self.head.weight.data_ptr())
        kept = self.__dict__.setdefault("_static_kept", {})
        if key not in kept:
            kept.clear()  # free the previous set before allocating this one
            try:
                kept[key] = StaticSteps(self, batch, temperature, graphs=steps == "graphs")
            except (RuntimeError, TypeError, ValueError) as exc:  # CUDA's errors, an older torch's graph API
                if steps != "graphs":
                    raise
                warnings.warn(f"healing runs eagerly: CUDA graphs of its model calls failed "
                              f"({str(exc).splitlines()[0]})")
                self._graphs_failed = True
                return None
        return kept[key]

    # ---- checkpoints ------------------------------------------------------------------------------------------

    def checkpoint_payload(self, extra: dict | None = None) -> dict:
        """Config, shapes, weights and ``extra`` (plain Python values only): what a checkpoint holds."""
        return {
            "config": dataclasses.asdict(self.cfg),
            "num_codes": self.num_codes,
            "seq_len": self.seq_len,
            "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()},
            "extra": dict(extra or {}),
        }

    def save(self, path, extra: dict | None = None) -> None:
        """Write :meth:`checkpoint_payload` atomically to ``path``."""
        save_checkpoint(path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, self.checkpoint_payload(extra))

    @classmethod
    def load(cls, path, map_location="cpu", data: bytes | None = None) -> "TokenTransformer":
        """Rebuild a saved model (from ``data`` when given: a bundle member named ``path``); what was saved as
        ``extra`` is on ``model.extra``. Bad files raise InputError."""
        ckpt = load_checkpoint(path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, map_location, what="Transformer checkpoint",
                               data=data, required=("config", "num_codes", "seq_len", "state_dict"))
        try:
            model = cls(TransformerConfig(**ckpt["config"]), ckpt["num_codes"], ckpt["seq_len"])
            model.load_state_dict(ckpt["state_dict"])
        except (KeyError, TypeError, ValueError, RuntimeError, AssertionError) as exc:
            raise InputError(path, f"Transformer checkpoint is damaged ({exc.__class__.__name__}: "
                                   f"{str(exc).splitlines()[0][:200]})") from None
        model.extra = dict(ckpt.get("extra") or {}) if isinstance(ckpt.get("extra") or {}, dict) else {}
        # load_state_dict copies into the freshly built (CPU) parameters, so move the model where it was asked.
        if isinstance(map_location, (str, torch.device)):
            model.to(map_location)
        return model


class StaticSteps:
    """Healing's model calls at fixed shapes, so that a CUDA graph can replay them (issue 23, item 3).

    One healed token is about one model call, each a few dozen small kernels per layer: on a GPU the launches, not
    the arithmetic, bound healing. Here the last teacher-forced piece of each run (the call that draws the next
    flagged token, at most ``STATIC_BUCKETS[-1]`` tokens) is padded to a bucket length and attends over the whole
    cache, a mask hiding each query's future, with its position, row and noise read from buffers; the draw is made
    in the same call. Every call of a bucket then has the same shapes and addresses. With ``graphs`` each bucket is
    captured once as a CUDA graph (after warm-up runs on a side stream, all buckets in one memory pool) and a call is
    a few copies and one replay; without, the same function runs directly (the path tests compare with eager healing
    on a CPU).

    The model keeps its steps (:meth:`TokenTransformer._static_steps`), so the steps do not keep the model: it is
    handed to each call, and the graphs and buffers go with the model.

    Args:
        model: the Transformer (in eval mode, on its device).
        batch: sequences per call.
        temperature: divides the logits before the softmax.
        graphs: capture CUDA graphs (the model must be on CUDA).
    """

    def __init__(self, model: TokenTransformer, batch: int, temperature: float, graphs: bool):
        device = model.head.weight.device
        width = STATIC_BUCKETS[-1]
        self.temperature = float(temperature)
        # Zeros, not empty memory: a key the mask hides still enters attention's sums (times a zero weight), so it
        # must be finite.
        self.cache = [tuple(t.zero_() for t in kv)
                      for kv in model._new_cache(batch, static_cache_length(model.seq_len))]
        self.inputs = torch.zeros(batch, width, dtype=torch.long, device=device)
        self.start = torch.zeros((), dtype=torch.long, device=device)
        self.last = torch.zeros((), dtype=torch.long, device=device)
        self.noise = torch.ones(batch, model.num_codes, device=device)
        self.graphs: dict[int, tuple[Any, torch.Tensor]] | None = None
        if graphs:
            self._capture(model)

    def _run(self, model: TokenTransformer, width: int) -> torch.Tensor:
        return model._static_draw(self.inputs[:, :width], self.start, self.last, self.cache, self.noise,
                                  self.temperature)

    def _capture(self, model: TokenTransformer) -> None:
        with torch.cuda.device(self.inputs.device):  # streams and graphs on the model's GPU, whichever is current
            self._capture_here(model)

    def _capture_here(self, model: TokenTransformer) -> None:
        # Autocast must cast the weights inside each graph rather than hand it a cast cached outside (which the
        # context's end would free): capture under the caller's autocast dtype with its cache off.
        dtype = _cuda_autocast_dtype()
        cast = (torch.autocast("cuda", dtype=dtype, cache_enabled=False) if dtype is not None
                else contextlib.nullcontext())
        # Warm-up and capture on one side stream: kernels are chosen and the BLAS handles and workspaces (kept per
        # stream) are made outside the capture, and every capture shares the first one's memory pool.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), cast:
            for width in STATIC_BUCKETS:
                for _ in range(2):
                    self._run(model, width)
        graphs, pool = {}, None
        for width in STATIC_BUCKETS:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=side, capture_error_mode="thread_local"), cast:
                out = self._run(model, width)
            pool = graph.pool()
            graphs[width] = (graph, out)
        torch.cuda.current_stream().wait_stream(side)
        # Each replay must repeat its call: the same buffers in, the same draw out (and the same keys written).
        check = torch.Generator(device=self.inputs.device).manual_seed(0)  # leaves the global generators alone
        for width, (graph, out) in graphs.items():
            self.inputs.random_(0, model.num_codes, generator=check)
            self.start.fill_(3)
            self.last.fill_(width - 1)
            self.noise.exponential_(generator=check)
            with cast:
                direct = self._run(model, width).clone()
            graph.replay()
            if not torch.equal(out, direct):
                raise RuntimeError(f"the replay of the {width}-token call drew other tokens than the call itself")
        self.graphs = graphs

    def draw(self, model: TokenTransformer, piece: torch.Tensor, start: int, noise: torch.Tensor) -> torch.Tensor:
        """Teacher-force ``piece`` (b, T), b <= batch, at positions [start, start + T) into the first b rows of the
        cache and draw the token after it with ``noise`` (b, V); returns (b,) long (a view of a buffer the next call
        overwrites: copy it out). The rows after b compute on what their buffers held before: finite, never read."""
        b, width = piece.shape[0], next(w for w in STATIC_BUCKETS if w >= piece.shape[1])
        self.inputs[:b, :piece.shape[1]].copy_(piece)  # the padding keeps earlier ids: valid codes, never read
        self.start.fill_(start)
        self.last.fill_(piece.shape[1] - 1)
        self.noise[:b].copy_(noise)
        if self.graphs is None:
            return self._run(model, width)[:b]
        graph, out = self.graphs[width]
        graph.replay()
        return out[:b]


def static_cache_length(seq_len: int) -> int:
    """Keys in a :class:`StaticSteps` cache: the sequence, room for a padded piece at its end, rounded up to a
    multiple of 16 (the alignment CUDA's memory-efficient attention wants of a mask's last dimension)."""
    return -(-(seq_len + STATIC_BUCKETS[-1]) // 16) * 16


def _cuda_autocast_dtype() -> torch.dtype | None:
    """The dtype CUDA autocast is on with here, or None (torch 2.1-2.3 have no device argument)."""
    try:
        if not torch.is_autocast_enabled("cuda"):
            return None
        return torch.get_autocast_dtype("cuda")
    except (TypeError, AttributeError):
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
