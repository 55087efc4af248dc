"""Autoregressive generation: greedy / temperature / top-k / top-p sampling through the transformer's KV cache.

A batch of prompts of different lengths is left-padded to the longest one, so every sequence's newest token sits in
the same (last) slot and one forward per step serves the whole batch. Padding slots are marked invalid (never
attended) and every sequence keeps its own positions 0..len-1, so a prompt generates the same tokens whether it is
alone or batched with longer ones.

Conventions, chosen once and used everywhere here:

- The returned lists hold only the new tokens, never the prompt.
- End of document: when ``stop_on_eod`` is set and ``eod_id`` is given, a sequence stops at the first eod it
  produces and the eod itself is NOT included in its output, so outputs decode to clean text. With
  ``stop_on_eod=False`` (or ``eod_id=None``) eod is an ordinary token and is kept.
- Context length: prompt plus new tokens never exceed ``model.cfg.max_seq_len`` (the model never saw positions past
  it). A prompt of ``max_seq_len`` tokens or more leaves no room and raises ``ValueError``; shorter prompts get at
  most ``max_seq_len - len(prompt)`` new tokens, whatever ``max_new_tokens`` says.
- An empty prompt raises ``ValueError`` in ``generate``; ``generate_text`` turns an empty string into ``[eod_id]``
  (documents are separated by eod, so eod is the natural "start of a new document" context).
- Sampling is deterministic for a fixed ``seed`` and a fixed batch; with sampling, a prompt's output depends on its
  place in the batch (one random stream serves all rows), greedy outputs do not.
- Capacity-mode MoE (``moe.dropless=false``): when ``eval_capacity_factor < num_experts / top_k`` an expert can
  overflow and drop tokens, and the MoE layer does not know which tokens are padding, so batched outputs can then
  differ from unbatched ones. With ``eval_capacity_factor >= num_experts / top_k`` nothing is ever dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Protocol

import torch

from sparselm.errors import InputError
from sparselm.model.transformer import Transformer
from sparselm.precision import kv_cache_dtype


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 disables the top-k filter
    top_p: float = 1.0  # nucleus mass; 1.0 disables the filter
    greedy: bool = False
    stop_on_eod: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_args(cls, args) -> SamplingConfig:
        """The fields a command line set: ``args`` is any object with attributes named like the fields (argparse's
        namespace of ``sparselm generate`` or ``sparselm retro generate``); the others keep their defaults."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})

    def validate(self) -> None:
        """Raise ValueError naming the first bad field (also called by ``generate``: fields are mutable)."""
        for name in ("max_new_tokens", "top_k", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise InputError(f"SamplingConfig.{name} must be an integer, got {value!r}")
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InputError(f"SamplingConfig.{name} must be a finite number, got {value!r}")
        for name in ("greedy", "stop_on_eod"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"SamplingConfig.{name} must be true or false, got {getattr(self, name)!r}")
        if self.max_new_tokens < 0:
            raise InputError(f"SamplingConfig.max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise InputError(f"SamplingConfig.temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if self.top_k < 0:
            raise InputError(f"SamplingConfig.top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise InputError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p}")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0


class Tokenizer(Protocol):
    """What ``generate_text`` needs from a tokenizer (duck-typed; any object with these members works)."""

    eod_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row of ``logits`` [B, V] -> [B] int64: argmax if greedy, else temperature, top-k, top-p,
    then a multinomial draw from ``generator`` (pass a seeded one for reproducible samples)."""
    if cfg.is_greedy:
        return logits.argmax(dim=-1)
    # Filter and sample in fp32: bf16 logits have ~3 significant digits, too coarse for a softmax tail.
    logits = logits.float() / cfg.temperature
    vocab = logits.shape[-1]
    if 0 < cfg.top_k < vocab:
        # Scatter the k best back into a -inf canvas: exactly k survivors even when logits tie.
        top = torch.topk(logits, cfg.top_k, dim=-1)
        logits = torch.full_like(logits, float("-inf")).scatter(-1, top.indices, top.values)
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token once the mass strictly before it already reaches top_p. The best token has nothing before
        # it, so it always survives, and the token that crosses top_p is kept (the usual nucleus definition).
        drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= cfg.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def left_pad(
    prompts: list[list[int]], pad_id: int = 0, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad ``prompts`` to the longest -> ``idx``, ``positions`` (0..len-1 per sequence, 0 on pads) and
    ``valid`` (False on pads), each [B, T]: the inputs the transformer needs for a batched prefill."""
    width = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            idx[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    slot = torch.arange(width).unsqueeze(0)
    start = (width - lengths).unsqueeze(1)  # first real slot of each row
    valid = slot >= start
    positions = (slot - start).clamp(min=0)
    return idx.to(device), positions.to(device), valid.to(device)


def _check_prompts(model: Transformer, prompts: list[list[int]]) -> list[int]:
    """Validate prompts against the model and return each prompt's budget of new tokens (before max_new_tokens)."""
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise InputError("prompts must be a non-empty list of token-id lists")
    vocab, max_len = model.cfg.vocab_size, model.cfg.max_seq_len
    budgets = []
    for i, prompt in enumerate(prompts):
        check_prompt(prompt, vocab, max_len, f"prompt {i}")
        budgets.append(max_len - len(prompt))
    return budgets


def check_prompt(prompt: list[int], vocab_size: int, max_seq_len: int, name: str = "the prompt") -> None:
    """InputError unless ``prompt`` is a non-empty list of token ids of the vocabulary with room for one more."""
    if not prompt:
        raise InputError(f"{name} is empty: give at least one token (e.g. the tokenizer's eod id)")
    bad = [t for t in prompt if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size]
    if bad:
        raise InputError(f"{name} has token id {bad[0]!r} outside the vocabulary [0, model.vocab_size={vocab_size})")
    if len(prompt) >= max_seq_len:
        raise InputError(
            f"{name} has {len(prompt)} tokens; this model's context (model.max_seq_len) is {max_seq_len} tokens, "
            f"prompt plus output, so a prompt may have at most {max_seq_len - 1}"
        )


def _model_device(model: Transformer) -> torch.device:
    return model.tok_emb.weight.device


def _cache_dtype(model: Transformer, device: torch.device) -> torch.dtype:
    # Under autocast the keys/values come out in the autocast dtype; a cache of that dtype halves its memory and
    # loses nothing (an fp32 cache would only store the same bf16 values widened). Otherwise the decoding rule.
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return kv_cache_dtype(model.tok_emb.weight.dtype, device)


@torch.inference_mode()
def generate(
    model: Transformer,
    prompts: list[list[int]],
    cfg: SamplingConfig,
    eod_id: int | None = None,
    use_cache: bool = True,
) -> list[list[int]]:
    """Continue every prompt; return only the new tokens of each (see the module docstring for eod and length rules).

    ``use_cache=False`` recomputes each sequence's full, unpadded forward at every step: slow, but it is the
    reference the cached path must match (it uses no padding, no masks beyond causal and no cache).
    Wrap the call in ``torch.autocast`` for bf16 generation.
    """
    cfg.validate()
    budgets = _check_prompts(model, prompts)
    limits = [min(cfg.max_new_tokens, budget) for budget in budgets]
    if max(limits) == 0:
        return [[] for _ in prompts]
    stop_id = eod_id if cfg.stop_on_eod else None
    device = _model_device(model)
    generator = torch.Generator(device=device)
    generator.manual_seed(cfg.seed)

    was_training = model.training
    model.eval()  # no dropout, and capacity-mode MoE uses eval_capacity_factor
    try:
        stepper = _cached_steps(model, prompts, max(limits)) if use_cache else _uncached_steps(model, prompts)
        return _decode(stepper, limits, cfg, stop_id, generator)
    finally:
        model.train(was_training)


class _Stepper(Protocol):
    def __call__(self, tokens: torch.Tensor, done: torch.Tensor) -> torch.Tensor: ...


def _decode(
    stepper: tuple[torch.Tensor, _Stepper],
    limits: list[int],
    cfg: SamplingConfig,
    stop_id: int | None,
    generator: torch.Generator,
) -> list[list[int]]:
    """The loop shared by both paths: sample for every row, record, stop rows, feed the tokens back.

    Both paths hand ``sample_next`` a [B, V] tensor with one row per prompt at every step (finished rows included),
    so they draw the same random numbers and a seeded sampled run gives the same tokens with and without cache.
    """
    logits, step = stepper
    outputs: list[list[int]] = [[] for _ in limits]
    done = [limit == 0 for limit in limits]
    while True:
        tokens = sample_next(logits.float(), cfg, generator)
        for row, token in enumerate(tokens.tolist()):
            if done[row]:
                continue
            if token == stop_id:
                done[row] = True  # eod ends the sequence and is not part of the output
                continue
            outputs[row].append(token)
            done[row] = len(outputs[row]) >= limits[row]
        if all(done):
            return outputs
        logits = step(tokens, torch.tensor(done, device=tokens.device))


def _cached_steps(model: Transformer, prompts: list[list[int]], max_new: int) -> tuple[torch.Tensor, _Stepper]:
    """Prefill the left-padded batch into a KV cache; each step then feeds one token per row."""
    device = _model_device(model)
    idx, positions, valid = left_pad(prompts, device=device)
    batch, width = idx.shape
    # Slots: the prompt block plus one per fed-back token; the last sampled token is never fed back.
    cache = model.new_cache(batch, width + max_new - 1, dtype=_cache_dtype(model, device))
    logits = model(idx, positions=positions, valid=valid, cache=cache, last_only=True).logits[:, -1]
    next_pos = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=device)

    def step(tokens: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
        nonlocal next_pos
        # A finished row still occupies its batch slot: feed it as padding at position 0 so it cannot run past
        # max_seq_len; rows never attend to each other and its own outputs are discarded.
        pos = torch.where(done, 0, next_pos)
        out = model(
            tokens.unsqueeze(1), positions=pos.unsqueeze(1), valid=~done.unsqueeze(1), cache=cache, last_only=True
        )
        next_pos = next_pos + 1
        return out.logits[:, -1]

    return logits, step


def _uncached_steps(model: Transformer, prompts: list[list[int]]) -> tuple[torch.Tensor, _Stepper]:
    """Reference path: every step runs each unfinished sequence alone, unpadded, from its first token."""
    device = _model_device(model)
    sequences = [list(p) for p in prompts]
    vocab = model.cfg.vocab_size

    def last_logits(done: list[bool]) -> torch.Tensor:
        rows = []
        for seq, finished in zip(sequences, done, strict=True):
            if finished:
                rows.append(torch.zeros(vocab, device=device))  # placeholder row; its sample is ignored
                continue
            idx = torch.tensor([seq], dtype=torch.long, device=device)
            rows.append(model(idx, last_only=True).logits[0, -1].float())
        return torch.stack(rows)

    def step(tokens: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
        finished = done.tolist()
        for seq, token, fin in zip(sequences, tokens.tolist(), finished, strict=True):
            if not fin:
                seq.append(token)
        return last_logits(finished)

    return last_logits([False] * len(prompts)), step


def generate_text(
    model: Transformer, tokenizer: Tokenizer, prompts: list[str], cfg: SamplingConfig, use_cache: bool = True
) -> list[str]:
    """Encode ``prompts``, generate, decode only the continuations. An empty prompt starts from ``[eod_id]``."""
    eod_id = getattr(tokenizer, "eod_id", None)
    encoded = []
    for i, text in enumerate(prompts):
        ids = list(tokenizer.encode(text))
        if not ids:
            if eod_id is None:
                raise InputError(f"prompt {i} encodes to no tokens and the tokenizer has no eod_id to start from")
            ids = [eod_id]
        encoded.append(ids)
    outputs = generate(model, encoded, cfg, eod_id=eod_id, use_cache=use_cache)
    return [tokenizer.decode(ids) for ids in outputs]
