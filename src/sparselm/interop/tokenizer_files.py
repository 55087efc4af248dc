"""The tokenizer files of an exported model: ``tokenizer.json`` built from sparselm's SentencePiece model so that
``AutoTokenizer.from_pretrained(DIR)`` gives the ids sparselm gives, plus ``tokenizer_config.json`` and the
SentencePiece ``tokenizer.model`` itself (llama.cpp's converters and slow tokenizers read it).

sparselm trains SentencePiece with identity normalisation, no dummy prefix and byte fallback (see
``sparselm.data.tokenizer``). The equivalent ``tokenizers`` pipeline: spaces become "▁" (nothing else is
normalised, nothing is prepended), no pre-tokenizer, the same model (BPE with merges in the order of the merged
piece's score, SentencePiece's merge priority; or unigram with the same scores) with byte fallback; decoding maps
"▁" back to spaces and byte pieces back to UTF-8. Control pieces (<unk>, <s>, </s>) are in the vocabulary but
never produced from text.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from sparselm.data.hf_tokenizer import CONFIG_FILES, special_tokens
from sparselm.data.tokenizer import HF_TOKENIZER_FILE, SENTENCEPIECE_FILE, TextTokenizer, Tokenizer
from sparselm.errors import InputError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # SentencePiece piece types
BPE, UNIGRAM = 2, 1  # SentencePiece model types


def _model_proto(path: Path):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    return proto


def _check_normalizer(proto, path: Path) -> None:
    spec = proto.normalizer_spec
    unsupported = []
    if spec.name not in ("identity", "") or spec.precompiled_charsmap:
        unsupported.append(f"normalization rule {spec.name!r}")
    if spec.add_dummy_prefix:
        unsupported.append("add_dummy_prefix")
    if spec.remove_extra_whitespaces:
        unsupported.append("remove_extra_whitespaces")
    if not spec.escape_whitespaces:
        unsupported.append("escape_whitespaces=false")
    if proto.trainer_spec.model_type not in (BPE, UNIGRAM):
        unsupported.append(f"model type {proto.trainer_spec.model_type} (only BPE and unigram)")
    if unsupported:
        raise InputError(
            f"{path}: SentencePiece option(s) {', '.join(unsupported)} have no exact tokenizer.json equivalent "
            "here (sparselm's tokenizers use identity normalisation without a dummy prefix)"
        )


def sentencepiece_to_hf(path: str | Path):
    """A ``tokenizers.Tokenizer`` giving the same ids as the SentencePiece model at ``path``."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, normalizers

    path = Path(path)
    proto = _model_proto(path)
    _check_normalizer(proto, path)
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    unk_id = next((i for i, (_, _, kind) in enumerate(pieces) if kind == UNKNOWN), None)
    byte_fallback = proto.trainer_spec.byte_fallback
    if proto.trainer_spec.model_type == UNIGRAM:
        model = models.Unigram([(p, s) for p, s, _ in pieces], unk_id=unk_id, byte_fallback=byte_fallback)
    else:
        vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
        model = models.BPE(
            vocab=vocab,
            merges=_bpe_merges(pieces, vocab),
            unk_token=pieces[unk_id][0] if unk_id is not None else None,
            byte_fallback=byte_fallback,
            fuse_unk=True,
        )
    tok = RustTokenizer(model)
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return tok


def _bpe_merges(pieces: list[tuple[str, float, int]], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every (left, right) split of a mergeable piece into two mergeable pieces, ranked as SentencePiece merges:
    the merged piece with the higher score (lower id: the vocabulary is sorted by score) first."""
    mergeable = {p for p, _, kind in pieces if kind in (NORMAL, USER_DEFINED)}
    merges = []
    for piece, _, kind in pieces:
        if kind != NORMAL or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                merges.append((vocab[piece], vocab[left], vocab[right], left, right))
    merges.sort()
    return [(left, right) for *_, left, right in merges]


def tokenizer_config(tokenizer: TextTokenizer, model_max_length: int) -> dict:
    """``tokenizer_config.json``: the special tokens and no automatic BOS/EOS (sparselm never adds them)."""
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "eos_token": tokenizer.id_to_piece(tokenizer.eod_id),
    }
    if tokenizer.bos_id is not None and tokenizer.bos_id >= 0:
        config["bos_token"] = tokenizer.id_to_piece(tokenizer.bos_id)
    if isinstance(tokenizer, Tokenizer):
        config["unk_token"] = tokenizer.id_to_piece(0)
    return config


def write_tokenizer_files(tokenizer: TextTokenizer, out: Path, model_max_length: int) -> list[str]:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` (and ``tokenizer.model`` for SentencePiece) into ``out``;
    returns the file names written. A tokenizer.json beside the tokenizer (an imported model's) travels as it came,
    with its config; otherwise it is built from the SentencePiece model."""
    written = []
    folder = tokenizer.path.parent
    if isinstance(tokenizer, Tokenizer) and not (folder / HF_TOKENIZER_FILE).is_file():
        sentencepiece_to_hf(tokenizer.path).save(str(out / HF_TOKENIZER_FILE))
        shutil.copyfile(tokenizer.path, out / SENTENCEPIECE_FILE)
        config = tokenizer_config(tokenizer, model_max_length)
        written += [HF_TOKENIZER_FILE, SENTENCEPIECE_FILE]
    else:
        for name in (HF_TOKENIZER_FILE, SENTENCEPIECE_FILE):
            if (folder / name).is_file():
                shutil.copyfile(folder / name, out / name)
                written.append(name)
        source = folder / CONFIG_FILES[0]
        config = json.loads(source.read_text(encoding="utf-8")) if source.is_file() else {}
        config.update({k: v for k, v in tokenizer_config(tokenizer, model_max_length).items() if k not in config})
        config.update(special_tokens(folder))
    (out / CONFIG_FILES[0]).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    written.append(CONFIG_FILES[0])
    return written
