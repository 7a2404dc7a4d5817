"""A tiny Llama written as a GGUF file at test time, with the HF model it was made from.

The file is what llama.cpp's converter would write for this model: a GPT-2-style byte-level BPE vocabulary
(tokenizer.ggml.model "gpt2": tokens, token types, merges, special token ids, chat template) and float32 tensors
under GGUF names, with the query and key projections in llama.cpp's rotary layout (each head's rows interleaved
as pairs), which transformers undoes when it reads the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2: unk, bos, eos (= pad)
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
                 "+ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                 "{% endif %}")
CORPUS = ["The capital of France is Paris.", "Question: what is the capital of France? Answer: Paris.",
          "Ragkit reads long documents and answers questions about them, citing the passages it used.",
          "Tokenizers cut text into pieces; café, naïve and 東京 are cut into bytes when no merge covers them."] * 4
GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def train_tokenizer(vocab_size: int = 320):
    """A byte-level BPE `tokenizers.Tokenizer` (all 256 bytes, the special tokens first)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


def to_rotary_layout(weight: np.ndarray, heads: int) -> np.ndarray:
    """HF rows (head, half, pair index) reordered to llama.cpp's (head, pair index, half)."""
    rows, cols = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def build_llama(vocab_size: int, seed: int = 0):
    """A random 2-layer Llama (GQA, tied embeddings) in float32."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # random norms, so that a norm read into the wrong place changes the output
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    return model


def write_tiny_gguf(path: Path, seed: int = 0):
    """Write the GGUF file; returns (the HF model, the `tokenizers` tokenizer) it was made from."""
    import gguf

    tokenizer = train_tokenizer()
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    merges = [" ".join(pair) if isinstance(pair, list) else pair
              for pair in json.loads(tokenizer.to_str())["model"]["merges"]]
    model = build_llama(len(vocab), seed)
    config = model.config

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny test llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_vocab_size(len(vocab))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([3 if token in SPECIAL_TOKENS else 1 for token, _ in vocab])  # 3: control, 1: normal
    writer.add_token_merges(merges)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    for name, tensor in _gguf_tensors(model):
        writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model, tokenizer


def _gguf_tensors(model):
    """(GGUF name, float32 array) for every weight of the model."""
    config = model.config
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    yield "token_embd.weight", state["model.embed_tokens.weight"]
    yield "output_norm.weight", state["model.norm.weight"]
    for i in range(config.num_hidden_layers):
        for hf_name, gguf_name in GGUF_NAMES.items():
            weight = state[f"model.layers.{i}.{hf_name}.weight"]
            if gguf_name == "attn_q":
                weight = to_rotary_layout(weight, config.num_attention_heads)
            elif gguf_name == "attn_k":
                weight = to_rotary_layout(weight, config.num_key_value_heads)
            yield f"blk.{i}.{gguf_name}.weight", np.ascontiguousarray(weight)
