"""Tiny models made at test time (no download): a ModernBERT sentence encoder with its own tokenizer."""

from __future__ import annotations

from pathlib import Path

TRAINING_TEXT = """
The quick brown fox jumps over the lazy dog. Oil prices rose sharply in October 1973.
Retrieval augmented generation cites the lines and pages it used. Contracts, filings, papers,
source code and transcripts are long documents. The reader streams whole documents through memory.
def function(argument): return value  # code is text too
""" * 20


def build_tokenizer(folder: Path):
    """A small WordPiece tokenizer (BERT-style specials) over TRAINING_TEXT, saved to `folder`. Its vocabulary is
    chosen here rather than trained: the trainer breaks ties between equally frequent pieces differently from run
    to run, and every tiny model built on it would then differ too."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(tiny_vocabulary(normalizer, pre_tokenizer, specials), unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer = normalizer, pre_tokenizer
    tok.post_processor = processors.BertProcessing(("[SEP]", tok.token_to_id("[SEP]")),
                                                   ("[CLS]", tok.token_to_id("[CLS]")))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(folder)
    return fast


def tiny_vocabulary(normalizer, pre_tokenizer, specials: list[str], size: int = 232) -> dict[str, int]:
    """Specials, every character alone and as a continuation, TRAINING_TEXT's words, then its most frequent word
    endings as continuations (ties by spelling) up to `size` entries."""
    from collections import Counter

    words = [w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(TRAINING_TEXT))]
    chars = sorted(set("".join(words)))
    endings = Counter("##" + w[i:] for w in words for i in range(1, len(w) - 1))
    pieces = [*specials, *chars, *("##" + c for c in chars), *by_count(Counter(words)), *by_count(endings)]
    return {piece: i for i, piece in enumerate(list(dict.fromkeys(pieces))[:size])}


def by_count(counts) -> list[str]:
    """The keys of a Counter, most frequent first, ties by spelling."""
    return [key for key, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))]


def build_modernbert_encoder(folder: Path, max_seq_length: int = 64, seed: int = 0) -> Path:
    """A randomly initialised 2-layer ModernBERT saved as a sentence-transformers model in `folder`."""
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import ModernBertConfig, ModernBertModel

    torch.manual_seed(seed)
    backbone = folder / "backbone"
    tokenizer = build_tokenizer(backbone)
    config = ModernBertConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=512, global_attn_every_n_layers=2, local_attention=16,
        pad_token_id=tokenizer.pad_token_id, cls_token_id=tokenizer.cls_token_id,
        sep_token_id=tokenizer.sep_token_id, bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
    )
    ModernBertModel(config).save_pretrained(backbone)
    transformer = models.Transformer(str(backbone), max_seq_length=max_seq_length)
    pooling = models.Pooling(transformer.get_word_embedding_dimension(), pooling_mode="mean")
    encoder_dir = folder / "encoder"
    SentenceTransformer(modules=[transformer, pooling, models.Normalize()], device="cpu").save(str(encoder_dir))
    return encoder_dir


def build_bert_encoder(folder: Path, spike: float = 1.0, seed: int = 0) -> Path:
    """A randomly initialised 2-layer BERT (128 wide, 4 heads) saved as a sentence-transformers model in `folder`.
    `spike` multiplies one channel of the embeddings' LayerNorm, so that the first attention's input carries an
    outlier channel as real BERTs' do."""
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    backbone = folder / "backbone"
    tokenizer = build_tokenizer(backbone)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id)
    model = BertModel(config)
    with torch.no_grad():
        model.embeddings.LayerNorm.weight[5] *= spike
    model.save_pretrained(backbone)
    transformer = models.Transformer(str(backbone), max_seq_length=64)
    pooling = models.Pooling(transformer.get_word_embedding_dimension(), pooling_mode="mean")
    encoder_dir = folder / "encoder"
    SentenceTransformer(modules=[transformer, pooling, models.Normalize()], device="cpu").save(str(encoder_dir))
    return encoder_dir


def build_colbert(folder: Path, backbone: Path, document_length: int = 64, seed: int = 0,
                  identity: bool = False) -> Path:
    """A PyLate ColBERT over a saved backbone, saved to `folder`.

    The projection is random (16-d), or with `identity` the identity on the backbone's hidden size, so that
    MaxSim compares the backbone's own token vectors: untrained, but meaningful for a trained backbone.
    """
    import torch
    from pylate import models

    torch.manual_seed(seed)
    import json

    size = json.loads((Path(backbone) / "config.json").read_text())["hidden_size"] if identity else 16
    colbert = models.ColBERT(str(backbone), embedding_size=size, document_length=document_length, query_length=16,
                             device="cpu")
    if identity:
        colbert[1].linear.weight.data = torch.eye(size)
    colbert.save(str(folder))
    return folder


def build_llama_reader(folder: Path, seed: int = 0) -> Path:
    """A random 2-layer Llama causal LM (GQA: 4 query, 2 KV heads) with a small tokenizer, saved to `folder`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(folder)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id,
                         eos_token_id=tokenizer.sep_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder
