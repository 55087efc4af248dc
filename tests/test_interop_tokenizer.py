"""Tokenizers across the boundary: the tokenizer.json written for sparselm's SentencePiece models gives the same ids
through ``AutoTokenizer`` (Unicode, emoji, byte fallback, whitespace runs), and an imported model's tokenizer.json
works behind sparselm's tokenizer interface."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sparselm.data.hf_tokenizer import HFTokenizer
from sparselm.data.reader import iter_documents
from sparselm.data.tokenizer import TextTokenizer, Tokenizer, load_tokenizer, train_tokenizer
from sparselm.interop.tokenizer_files import write_tokenizer_files

transformers = pytest.importorskip("transformers")

TEXTS = [
    "It was the best of times, it was the worst of times.",
    "   leading, trailing and  double  spaces   ",
    "tabs\tand\nnew lines\r\n\n\nand a CR\r",
    "digits 1234567890 3.14159 -42 1e-5",
    "Ünïcödé: café, naïve, Ångström, Straße, ﬁ ligature, e\u0301 (combining)",
    "CJK 漢字かなカナ한국어, Arabic العربية, Hebrew עברית, Devanagari हिन्दी",
    "emoji 😀🚀👍🏽 family 👩\u200d👩\u200d👧 flags 🇫🇷 and math ∑∫≈√∞",
    "control \x00\x07 and private use \ue000, lone combining \u0301 at the start",
    "",
]


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def unigram(tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    path = train_tokenizer([tiny_corpus], tmp_path_factory.mktemp("unigram") / "uni", 400, model_type="unigram")
    return Tokenizer.load(path)


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_auto_tokenizer_gives_sparselm_ids(
    kind: str, tiny_tokenizer: Tokenizer, unigram: Tokenizer, tiny_corpus: Path, tmp_path: Path
) -> None:
    ours = tiny_tokenizer if kind == "bpe" else unigram
    written = write_tokenizer_files(ours, tmp_path, model_max_length=64)
    assert set(written) == {"tokenizer.json", "tokenizer.model", "tokenizer_config.json"}
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    rust = HFTokenizer.load(tmp_path / "tokenizer.json")
    texts = list(TEXTS)
    if kind == "bpe":  # SentencePiece's unigram sums scores in float32 over the whole text: sentences only
        texts += [doc.text for doc in iter_documents([tiny_corpus])][:20]
    for text in texts:
        ids = ours.encode(text)
        assert auto(text)["input_ids"] == ids, text[:40]
        assert rust.encode(text) == ids, text[:40]
        assert auto.decode(ids) == text
        assert rust.decode(ids) == text
    fallback = [ours.id_to_piece(i) for i in ours.encode("😀")]
    assert fallback == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]  # the text above did need byte fallback
    assert auto.eos_token_id == ours.eod_id == rust.eod_id and auto.bos_token_id == ours.bos_id
    assert rust.vocab_size == ours.vocab_size


def byte_level_tokenizer(corpus: Path, folder: Path) -> Path:
    """A GPT-2-style byte-level BPE tokenizer.json (no SentencePiece model), as an imported model would bring."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator((d.text for d in iter_documents([corpus])), trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "GPT2Tokenizer", "eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder / "tokenizer.json"


def test_hf_tokenizer_behind_the_interface(tiny_corpus: Path, tmp_path: Path) -> None:
    path = byte_level_tokenizer(tiny_corpus, tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")  # a directory with only tokenizer.json
    assert isinstance(tok, HFTokenizer) and isinstance(tok, TextTokenizer)
    assert tok.path == path and tok.eod_id == tok.bos_id == 0
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    for text in TEXTS:
        assert tok.encode(text) == auto(text)["input_ids"]
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch(TEXTS[:3]) == [tok.encode(t) for t in TEXTS[:3]]
    assert tok.id_to_piece(tok.eod_id) == "<|endoftext|>"


def test_sentencepiece_is_preferred_in_a_checkpoint(tiny_tokenizer: Tokenizer, tmp_path: Path) -> None:
    write_tokenizer_files(tiny_tokenizer, tmp_path, 64)
    assert isinstance(load_tokenizer(tmp_path), Tokenizer)
    (tmp_path / "tokenizer.model").unlink()
    assert isinstance(load_tokenizer(tmp_path), HFTokenizer)


def test_hf_tokenizer_errors(tmp_path: Path, tiny_corpus: Path) -> None:
    from sparselm.errors import InputError

    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputError, match="not a Hugging Face tokenizer.json"):
        HFTokenizer.load(tmp_path / "bad.json")
    path = byte_level_tokenizer(tiny_corpus, tmp_path / "no_eos")
    (tmp_path / "no_eos" / "tokenizer_config.json").unlink()
    with pytest.raises(InputError, match="no end-of-sequence token"):
        HFTokenizer.load(path)
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "empty_dir_that_does_not_exist")


def test_imported_tokenizer_json_travels(tiny_corpus: Path, tmp_path: Path) -> None:
    """A model whose only tokenizer is a tokenizer.json (GPT-2's byte-level BPE) imports with it: sparselm encodes and
    decodes through it as AutoTokenizer does, generates text, and exports it again unchanged."""
    import torch

    from sparselm.checkpoint.inference import load_checkpoint
    from sparselm.interop import export_hf, import_hf
    from sparselm.model.generate import SamplingConfig, generate_text

    folder = tmp_path / "gpt2"
    byte_level_tokenizer(tiny_corpus, folder)
    config = transformers.GPT2Config(vocab_size=400, n_embd=32, n_layer=2, n_head=4, n_positions=64, eos_token_id=0)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    result = import_hf(folder, tmp_path / "run")
    assert result.tokenizer == "tokenizer.json"
    model, _, tok = load_checkpoint(result.out)
    assert isinstance(tok, HFTokenizer) and tok.eod_id == 0
    auto = transformers.AutoTokenizer.from_pretrained(folder)
    for text in TEXTS:
        assert tok.encode(text) == auto(text)["input_ids"] and tok.decode(tok.encode(text)) == text
    torch.manual_seed(0)
    assert isinstance(generate_text(model, tok, ["Hello"], SamplingConfig(max_new_tokens=4, greedy=True))[0], str)

    export_hf(result.out, tmp_path / "again")
    again = transformers.AutoTokenizer.from_pretrained(tmp_path / "again")
    assert all(again(t)["input_ids"] == auto(t)["input_ids"] for t in TEXTS)
    assert again.eos_token == "<|endoftext|>"
