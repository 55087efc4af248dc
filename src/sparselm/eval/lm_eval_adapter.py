"""lm-evaluation-harness adapter: the model class ``sparselm``, so that harness's own task catalogue runs on our
checkpoints. Needs the optional extra: ``pip install 'sparselm[eval]'`` (lm-eval 0.4.13).

lm-eval has no plugin entry point for models, so the class is registered when this module is imported:

    python -m sparselm.eval.lm_eval_adapter --model sparselm --model_args ckpt=runs/x --tasks lambada_openai

runs lm-eval's own command line with the class registered (every lm-eval option works), and from Python

    import sparselm.eval.lm_eval_adapter  # registers "sparselm"
    lm_eval.simple_evaluate(model="sparselm", model_args="ckpt=runs/x", tasks=[...])

Every request goes through ``sparselm.eval.loglik.Scorer``, the engine behind ``sparselm eval``, so the two report
the same numbers for the same prompts. ``--model_args``: ``ckpt`` (required), ``precision`` (fp32|bf16), ``stride``
(rolling windows, default max_seq_len), ``max_batch_tokens``, ``threads`` (torch CPU threads); lm-eval's
``--batch_size`` and ``--device`` are honoured (``auto`` batch size means 16; an unavailable CUDA device means CPU).
"""

from __future__ import annotations

import logging
import sys

import torch

try:
    # lm-eval's own models enter its registry lazily when lm_eval.models is imported; a registry that receives
    # ours first never gets them, and `hf` is then unknown in this process.
    import lm_eval.models  # noqa: F401
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("the lm-evaluation-harness adapter needs lm-eval: pip install 'sparselm[eval]'") from exc

from tqdm import tqdm

from sparselm.errors import InputError
from sparselm.eval.loglik import Scorer

log = logging.getLogger(__name__)
DEFAULT_MAX_GEN_TOKENS = 256  # lm-eval's default for generate_until


def _int_arg(value: object, name: str, default: int) -> int:
    if value in (None, "", "auto") or (isinstance(value, str) and value.startswith("auto")):
        return default
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise InputError(f"sparselm adapter: {name} must be an integer, got {value!r}") from exc


@register_model("sparselm")
class SparseLM(LM):
    """A sparselm checkpoint as an lm-eval language model (loglikelihood, loglikelihood_rolling, generate_until)."""

    def __init__(
        self,
        ckpt: str | None = None,
        precision: str = "fp32",
        batch_size: int | str | None = 16,
        stride: int | str = 0,
        max_batch_tokens: int | str = 8192,
        device: str | None = None,
        threads: int | str = 0,
        **_ignored: object,  # lm-eval passes options some models do not use (max_batch_size, ...)
    ) -> None:
        super().__init__()
        if not ckpt:
            raise InputError("sparselm adapter: pass --model_args ckpt=RUN_OR_CHECKPOINT_DIR")
        from sparselm.checkpoint.inference import load_checkpoint

        if _int_arg(threads, "threads", 0) > 0:
            torch.set_num_threads(_int_arg(threads, "threads", 0))

        model, _, tokenizer = load_checkpoint(ckpt)
        if device and device.startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's --device defaults to "cuda"; on a CPU-only machine run where the weights are.
            log.warning("sparselm adapter: device %s is not available, using the CPU", device)
        elif device:
            model = model.to(device)
        self.tokenizer = tokenizer
        self.stride = _int_arg(stride, "stride", 0)
        self.scorer = Scorer(
            model,
            tokenizer,
            batch_size=_int_arg(batch_size, "batch_size", 16),
            precision=str(precision),
            max_batch_tokens=_int_arg(max_batch_tokens, "max_batch_tokens", 8192),
        )
        self._device = model.tok_emb.weight.device

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eod_id

    @property
    def max_length(self) -> int:
        return self.scorer.max_len

    def tok_encode(self, string: str, **_: object) -> list[int]:
        return list(self.tokenizer.encode(string))

    def tok_decode(self, tokens: list[int], **_: object) -> str:
        return self.tokenizer.decode(tokens)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [tuple(req.args[:2]) for req in requests]
        with tqdm(total=len(pairs), desc="sparselm loglikelihood", disable=disable_tqdm) as bar:
            results = self.scorer.loglikelihood_text(pairs, lambda i: bar.update(1))
        out = []
        for pair, result in zip(pairs, results, strict=True):
            if not result.ok:
                raise InputError(
                    f"sparselm adapter: a continuation of {result.tokens} tokens does not fit "
                    f"max_seq_len={self.scorer.max_len}: {pair[1][:60]!r}"
                )
            answer = (result.logprob, result.is_greedy)
            self.cache_hook.add_partial("loglikelihood", pair, answer)
            out.append(answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        texts = [req.args[0] for req in requests]
        with tqdm(total=len(texts), desc="sparselm rolling", disable=disable_tqdm) as bar:
            totals = self.scorer.rolling(texts, self.stride, lambda i: bar.update(1))
        out = []
        for text, (logprob, _) in zip(texts, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), logprob)
            out.append(logprob)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy only: sampling options are refused rather than silently ignored."""
        # Requests with the same stop strings and length limit are generated together in length-sorted batches.
        groups: dict[tuple, list[int]] = {}
        for i, req in enumerate(requests):
            _, kwargs = req.args[:2]
            kwargs = dict(kwargs or {})
            if kwargs.get("do_sample") or float(kwargs.get("temperature", 0.0) or 0.0) > 0:
                raise InputError("sparselm adapter: generate_until supports greedy decoding only (do_sample=False)")
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_gen = _int_arg(kwargs.get("max_gen_toks"), "max_gen_toks", DEFAULT_MAX_GEN_TOKENS)
            max_gen = min(max_gen, self.scorer.max_len - 1)
            groups.setdefault((tuple(until), max_gen), []).append(i)
        out = [""] * len(requests)
        with tqdm(total=len(requests), desc="sparselm generate_until", disable=disable_tqdm) as bar:
            for (until, max_gen), members in groups.items():
                prompts = [requests[i].args[0] for i in members]
                texts = self.scorer.generate_until(prompts, list(until), max_gen, lambda i: bar.update(1))
                for i, (text, _) in zip(members, texts, strict=True):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out


def main() -> None:
    """lm-eval's command line with the ``sparselm`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    sys.exit(main())
