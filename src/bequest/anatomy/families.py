"""What each supported family's tensors ARE, as data.

A table entry maps a role to a module path; that module's own `weight` and `bias` become
`role.weight` / `role.bias`. A key that already ends in `.weight` / `.bias` names one parameter
(BERT keeps its MLM output bias outside the decoder module). `{i}` is the layer index. Tables list
their entries in the order the model registers them, which is its parameter order (growth draws
random numbers in it). Adding a family means adding one `Family` here; nothing else hard-codes tensor
names, shapes or defaults.
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
    # Per task, the entries of `final` and `heads` its model has (BERT's masked LM has no pooler).
    tasks: dict[str, tuple[str, ...]]
    # Entries with a bias: True, or the config setting that gives them one. A tied lm_head has neither.
    biases: dict[str, bool | str]
    # The defaults of the family's transformers config class, for the settings bequest reads, so a
    # config.json that leaves one out reads as transformers would read it.
    defaults: dict
    conv1d: bool = False  # linear weights stored [in, out] (GPT-2's Conv1D)
    fused_qkv: bool = False  # one tensor holds [q | k | v] along the output dimension
    gated_mlp: bool = False  # down(act(gate(x)) * up(x))
    act_key: str = "hidden_act"  # config setting naming the MLP's activation
    mlm_act: str = ""  # the masked-LM head's activation where it is not the config's (RoBERTa's is gelu)
    tiny: dict = field(default_factory=dict)  # extra config settings for tests and demos
    # RoBERTa numbers positions from padding_idx + 1, so its table holds two slots more than text.
    position_offset: int = 0


# Every role's weight in shape names (`Anatomy.size`), [out, in] for linears (GPT-2's Conv1D stores block
# linears the other way round); a bias has the first dimension.
SHAPES = {
    "embed.token": ("vocab", "hidden"),
    "embed.position": ("positions", "hidden"),
    "embed.type": ("types", "hidden"),
    "embed.norm": ("hidden",),
    "attn.qkv": ("qkv", "hidden"),
    "attn.q": ("q", "hidden"),
    "attn.k": ("kv", "hidden"),
    "attn.v": ("kv", "hidden"),
    "attn.o": ("hidden", "q"),
    "mlp.gate": ("ffn", "hidden"),
    "mlp.up": ("ffn", "hidden"),
    "mlp.down": ("hidden", "ffn"),
    "norm.attn": ("hidden",),
    "norm.mlp": ("hidden",),
    "final_norm": ("hidden",),
    "pooler": ("hidden", "hidden"),
    "lm_head.dense": ("hidden", "hidden"),
    "lm_head.norm": ("hidden",),
    "lm_head": ("vocab", "hidden"),
    "classifier.dense": ("hidden", "hidden"),
    "classifier": ("labels", "hidden"),
}

_LLAMA_LAYER = {
    "attn.q": "self_attn.q_proj",
    "attn.k": "self_attn.k_proj",
    "attn.v": "self_attn.v_proj",
    "attn.o": "self_attn.o_proj",
    "mlp.gate": "mlp.gate_proj",
    "mlp.up": "mlp.up_proj",
    "mlp.down": "mlp.down_proj",
    "norm.attn": "input_layernorm",
    "norm.mlp": "post_attention_layernorm",
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


_DECODER_TASKS = {"base": ("final_norm",), "causal_lm": ("final_norm", "lm_head"), "seq_cls": ("final_norm", "classifier")}
_LLAMA_DEFAULTS = {"vocab_size": 32000, "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                   "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "hidden_act": "silu", "initializer_range": 0.02}


def _llama_like(name: str, config_class: str, biases: dict, defaults: dict, **tiny) -> Family:
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
        tasks=_DECODER_TASKS,
        biases=biases,
        defaults={**_LLAMA_DEFAULTS, **defaults},
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
_ROBERTA_EMBED = {k: _BERT_EMBED[k] for k in ("embed.token", "embed.type", "embed.norm", "embed.position")}
_BERT_KEYS = {
    "hidden": "hidden_size",
    "layers": "num_hidden_layers",
    "heads": "num_attention_heads",
    "ffn": "intermediate_size",
    "vocab": "vocab_size",
    "positions": "max_position_embeddings",
}

_MLM_HEAD = ("lm_head.bias", "lm_head.dense", "lm_head.norm", "lm_head")


def _bert_like(name: str, config_class: str, *, embed: dict, heads: dict, classifier: tuple, tokenizer: str,
               defaults: dict, mlm_act: str = "", position_offset: int = 0) -> Family:
    """A post-norm encoder of BERT's layout; the families differ in their heads' paths and tokenizer."""
    return Family(
        name=name,
        model_types=(name,),
        config_class=config_class,
        base_prefix=name,
        layer_path="encoder.layer.{i}",
        embed=embed,
        layer=_BERT_LAYER,
        final={"pooler": "pooler.dense"},
        heads=heads,
        norm="layernorm",
        norm_position="post",
        eps_key="layer_norm_eps",
        config_keys=_BERT_KEYS,
        tokenizer=tokenizer,
        tasks={"base": ("pooler",), "masked_lm": _MLM_HEAD, "seq_cls": classifier},
        biases={role: True for role in [*_BERT_LAYER, *heads, "embed.norm", "pooler"] if not role.endswith(".bias")},
        defaults={"vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                  "intermediate_size": 3072, "max_position_embeddings": 512, "type_vocab_size": 2,
                  "layer_norm_eps": 1e-12, "tie_word_embeddings": True, "hidden_act": "gelu",
                  "initializer_range": 0.02, **defaults},
        mlm_act=mlm_act,
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
        tasks=_DECODER_TASKS,
        biases={"norm.attn": True, "attn.qkv": True, "attn.o": True, "norm.mlp": True, "mlp.up": True,
                "mlp.down": True, "final_norm": True},
        defaults={"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12,
                  "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True, "activation_function": "gelu_new",
                  "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "initializer_range": 0.02},
        conv1d=True,
        fused_qkv=True,
        act_key="activation_function",
        tiny={"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
    ),
    "bert": _bert_like(
        "bert",
        "BertConfig",
        embed=_BERT_EMBED,
        heads={
            "lm_head.bias": "cls.predictions.bias",
            "lm_head.dense": "cls.predictions.transform.dense",
            "lm_head.norm": "cls.predictions.transform.LayerNorm",
            "lm_head": "cls.predictions.decoder",
            "classifier": "classifier",
        },
        classifier=("pooler", "classifier"),
        tokenizer="wordpiece",
        defaults={"pad_token_id": 0},
    ),
    "roberta": _bert_like(
        "roberta",
        "RobertaConfig",
        embed=_ROBERTA_EMBED,
        heads={
            "lm_head.bias": "lm_head.bias",
            "lm_head.dense": "lm_head.dense",
            "lm_head.norm": "lm_head.layer_norm",
            "lm_head": "lm_head.decoder",
            "classifier.dense": "classifier.dense",
            "classifier": "classifier.out_proj",
        },
        classifier=("classifier.dense", "classifier"),
        tokenizer="bpe",
        defaults={"vocab_size": 50265, "pad_token_id": 1},
        mlm_act="gelu",
        position_offset=2,
    ),
    "llama": _llama_like("llama", "LlamaConfig",
                         biases={**dict.fromkeys(("attn.q", "attn.k", "attn.v", "attn.o"), "attention_bias"),
                                 **dict.fromkeys(("mlp.gate", "mlp.up", "mlp.down"), "mlp_bias")},
                         defaults={"intermediate_size": 11008, "max_position_embeddings": 2048}),
    "mistral": _llama_like("mistral", "MistralConfig", biases={},
                           defaults={"intermediate_size": 14336, "num_key_value_heads": 8,
                                     "max_position_embeddings": 131072, "sliding_window": 4096},
                           sliding_window=None),
    "qwen2": _llama_like("qwen2", "Qwen2Config", biases=dict.fromkeys(("attn.q", "attn.k", "attn.v"), True),
                         defaults={"vocab_size": 151936, "intermediate_size": 22016, "num_key_value_heads": 32,
                                   "max_position_embeddings": 32768, "sliding_window": None,
                                   "use_sliding_window": False}),
}
