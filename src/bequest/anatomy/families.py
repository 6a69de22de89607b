"""What each supported family's tensors ARE, as data.

A table entry maps a role to a module path; that module's own `weight` and `bias` become
`role.weight` / `role.bias`. A key that already ends in `.weight` / `.bias` names one parameter
(BERT keeps its MLM output bias outside the decoder module). `{i}` is the layer index.
Adding a family means adding one `Family` here; nothing else hard-codes tensor names.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # config.model_type values this description covers
    config_class: str  # transformers class that builds a fresh config
    base_prefix: str  # attribute of task models that holds the base model
    layer_path: str  # one block, relative to the base model
    embed: dict[str, str]  # roles before the first block, relative to the base model
    layer: dict[str, str]  # roles inside one block
    final: dict[str, str]  # roles after the last block, relative to the base model
    heads: dict[str, str]  # task-head roles, relative to the model root
    norm: str  # "layernorm" | "rmsnorm"
    norm_position: str  # "pre" | "post"
    eps_key: str  # config attribute holding every norm's epsilon
    config_keys: dict[str, str]  # bequest's shape names -> this family's config attributes
    tokenizer: str  # "bpe" | "wordpiece"
    conv1d: bool = False  # linear weights stored [in, out] (GPT-2's Conv1D)
    fused_qkv: bool = False  # one tensor holds [q | k | v] along the output dimension
    gated_mlp: bool = False  # down(act(gate(x)) * up(x))
    tasks: tuple[str, ...] = ("base", "causal_lm", "seq_cls")
    tiny: dict = field(default_factory=dict)  # extra config settings for tests and demos
    # RoBERTa numbers positions from padding_idx + 1, so its table holds two slots more than text.
    position_offset: int = 0


_LLAMA_LAYER = {
    "norm.attn": "input_layernorm",
    "attn.q": "self_attn.q_proj",
    "attn.k": "self_attn.k_proj",
    "attn.v": "self_attn.v_proj",
    "attn.o": "self_attn.o_proj",
    "norm.mlp": "post_attention_layernorm",
    "mlp.gate": "mlp.gate_proj",
    "mlp.up": "mlp.up_proj",
    "mlp.down": "mlp.down_proj",
}
_LLAMA_KEYS = {
    "hidden": "hidden_size",
    "layers": "num_hidden_layers",
    "heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "ffn": "intermediate_size",
    "vocab": "vocab_size",
    "positions": "max_position_embeddings",
}


def _llama_like(name: str, config_class: str, **tiny) -> Family:
    return Family(
        name=name,
        model_types=(name,),
        config_class=config_class,
        base_prefix="model",
        layer_path="layers.{i}",
        embed={"embed.token": "embed_tokens"},
        layer=_LLAMA_LAYER,
        final={"final_norm": "norm"},
        heads={"lm_head": "lm_head", "classifier": "score"},
        norm="rmsnorm",
        norm_position="pre",
        eps_key="rms_norm_eps",
        config_keys=_LLAMA_KEYS,
        tokenizer="bpe",
        gated_mlp=True,
        tiny=tiny,
    )


_BERT_LAYER = {
    "attn.q": "attention.self.query",
    "attn.k": "attention.self.key",
    "attn.v": "attention.self.value",
    "attn.o": "attention.output.dense",
    "norm.attn": "attention.output.LayerNorm",
    "mlp.up": "intermediate.dense",
    "mlp.down": "output.dense",
    "norm.mlp": "output.LayerNorm",
}
_BERT_EMBED = {
    "embed.token": "embeddings.word_embeddings",
    "embed.position": "embeddings.position_embeddings",
    "embed.type": "embeddings.token_type_embeddings",
    "embed.norm": "embeddings.LayerNorm",
}
_BERT_KEYS = {
    "hidden": "hidden_size",
    "layers": "num_hidden_layers",
    "heads": "num_attention_heads",
    "ffn": "intermediate_size",
    "vocab": "vocab_size",
    "positions": "max_position_embeddings",
}

def _bert_like(name: str, config_class: str, *, heads: dict, tokenizer: str, position_offset: int = 0) -> Family:
    """A post-norm encoder of BERT's layout; the families differ in their heads' paths and tokenizer."""
    return Family(
        name=name,
        model_types=(name,),
        config_class=config_class,
        base_prefix=name,
        layer_path="encoder.layer.{i}",
        embed=_BERT_EMBED,
        layer=_BERT_LAYER,
        final={"pooler": "pooler.dense"},
        heads=heads,
        norm="layernorm",
        norm_position="post",
        eps_key="layer_norm_eps",
        config_keys=_BERT_KEYS,
        tokenizer=tokenizer,
        tasks=("base", "masked_lm", "seq_cls"),
        tiny={"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
        position_offset=position_offset,
    )


FAMILIES: dict[str, Family] = {
    "gpt2": Family(
        name="gpt2",
        model_types=("gpt2",),
        config_class="GPT2Config",
        base_prefix="transformer",
        layer_path="h.{i}",
        embed={"embed.token": "wte", "embed.position": "wpe"},
        layer={
            "norm.attn": "ln_1",
            "attn.qkv": "attn.c_attn",
            "attn.o": "attn.c_proj",
            "norm.mlp": "ln_2",
            "mlp.up": "mlp.c_fc",
            "mlp.down": "mlp.c_proj",
        },
        final={"final_norm": "ln_f"},
        heads={"lm_head": "lm_head", "classifier": "score"},
        norm="layernorm",
        norm_position="pre",
        eps_key="layer_norm_epsilon",
        config_keys={
            "hidden": "n_embd",
            "layers": "n_layer",
            "heads": "n_head",
            "ffn": "n_inner",
            "vocab": "vocab_size",
            "positions": "n_positions",
        },
        tokenizer="bpe",
        conv1d=True,
        fused_qkv=True,
        tiny={"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
    ),
    "bert": _bert_like(
        "bert",
        "BertConfig",
        heads={
            "lm_head.dense": "cls.predictions.transform.dense",
            "lm_head.norm": "cls.predictions.transform.LayerNorm",
            "lm_head": "cls.predictions.decoder",
            "lm_head.bias": "cls.predictions.bias",
            "classifier": "classifier",
        },
        tokenizer="wordpiece",
    ),
    "roberta": _bert_like(
        "roberta",
        "RobertaConfig",
        heads={
            "lm_head.dense": "lm_head.dense",
            "lm_head.norm": "lm_head.layer_norm",
            "lm_head": "lm_head.decoder",
            "lm_head.bias": "lm_head.bias",
            "classifier.dense": "classifier.dense",
            "classifier": "classifier.out_proj",
        },
        tokenizer="bpe",
        position_offset=2,
    ),
    "llama": _llama_like("llama", "LlamaConfig"),
    "mistral": _llama_like("mistral", "MistralConfig", sliding_window=None),
    "qwen2": _llama_like("qwen2", "Qwen2Config"),
}
