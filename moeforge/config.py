"""Model configuration: one dataclass tree for the DeepSeek V2 / V3 / V4 / Kimi-K2 family.

Field names follow DeepSeek / HF `config.json` where those exist (`q_lora_rank`,
`n_routed_experts`, ...) so a user can hold our config next to a checkpoint's.
Every architectural difference is an explicit field; `validate()` raises a
`ValueError` that says what is wrong and how to fix it.

`ModelConfig.from_hf_dict` maps an HF `config.json` (model_type `deepseek_v2`,
`deepseek_v3`, `kimi_k2`, `deepseek_v4`) onto these fields, `to_hf_dict` maps back.
A DeepSeek-V4 model is a ModelConfig whose optional `v4` field (`V4Config`) is set;
with `v4 = None` everything is the V2/V3 family, unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCORING_FUNCS = ("softmax", "sigmoid", "sqrtsoftplus")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
HF_MODEL_TYPES = ("deepseek_v2", "deepseek_v3", "kimi_k2", "deepseek_v4")
V4_ATTENTION_TYPES = ("sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention")
V4_MLP_TYPES = ("hash_moe", "moe")


@dataclass
class RopeConfig:
    """Rotary embedding on the `qk_rope_head_dim` part of each head, optionally YaRN-scaled."""

    theta: float = 10000.0
    interleave: bool = True  # DeepSeek stores rotary pairs as (x0, x1), (x2, x3), ...
    type: str = "default"  # "default" or "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0


@dataclass
class AttentionConfig:
    """Multi-head Latent Attention (DeepSeek-V2 report, section 2.1)."""

    num_heads: int = 4
    q_lora_rank: int | None = 64  # None: a plain q_proj, as in V2-Lite
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 8
    v_head_dim: int = 16
    attention_bias: bool = False
    rope: RopeConfig = field(default_factory=RopeConfig)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass
class MoEConfig:
    """Routed + shared experts (DeepSeek-V3 report, section 2.1.2)."""

    n_routed_experts: int = 16
    n_shared_experts: int = 1
    num_experts_per_tok: int = 4
    moe_intermediate_size: int = 64
    n_group: int = 4
    topk_group: int = 2
    scoring_func: str = "sigmoid"
    # greedy: plain top-k; group_limited_greedy: V2 (group score = max);
    # noaux_tc: V3 (group score = sum of top-2 of score+bias, bias used for selection only)
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    first_k_dense_replace: int = 1  # the first k layers use a dense SwiGLU MLP

    @property
    def has_bias(self) -> bool:
        """Whether the router keeps the selection-only `e_score_correction_bias`."""
        return self.topk_method == "noaux_tc"


@dataclass
class MTPConfig:
    """Multi-token prediction modules (DeepSeek-V3 report, section 2.2)."""

    num_layers: int = 0  # HF: num_nextn_predict_layers; each predicts one more token ahead


@dataclass
class V4Config:
    """DeepSeek-V4 fields (HF `DeepseekV4Config` names; see docs/v4.md).

    The V4 model reuses `attention.num_heads`, `attention.q_lora_rank` and `attention.rope`
    (the "main" RoPE of sliding-window layers) and the MoE fields; the MLA-only fields
    (kv_lora_rank, qk_nope_head_dim, v_head_dim) are unused.
    """

    layer_types: list[str] = field(default_factory=list)  # one of V4_ATTENTION_TYPES per layer
    mlp_layer_types: list[str] = field(default_factory=list)  # one of V4_MLP_TYPES per layer
    csa_compress_rate: int = 4  # m: tokens per compressed entry in CSA layers
    hca_compress_rate: int = 128  # m': tokens per compressed entry in HCA layers
    sliding_window: int = 128  # keys a query sees in the local branch, itself included
    head_dim: int = 512  # the single shared KV head (K = V) and every query head
    qk_rope_head_dim: int = 64  # trailing rotary dims of each head (partial RoPE)
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    o_groups: int = 8
    o_lora_rank: int = 1024
    compress_rope: RopeConfig = field(default_factory=lambda: RopeConfig(theta=160000.0))  # CSA/HCA layers
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    swiglu_limit: float = 10.0  # 0 disables the clamp

    def compress_rate(self, layer_type: str) -> int:
        """Tokens per compressed entry for a layer type (0 for sliding-window-only layers)."""
        return {"compressed_sparse_attention": self.csa_compress_rate,
                "heavily_compressed_attention": self.hca_compress_rate}.get(layer_type, 0)


@dataclass
class ModelConfig:
    vocab_size: int = 512
    hidden_size: int = 128
    intermediate_size: int = 256  # dense layers
    num_layers: int = 4
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    hidden_act: str = "silu"
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    mtp: MTPConfig = field(default_factory=MTPConfig)
    v4: V4Config | None = None  # set: the DeepSeek-V4 architecture (moeforge.model.v4)
    name: str = "custom"

    # ---------------------------------------------------------------- validation
    def validate(self) -> ModelConfig:
        a, m = self.attention, self.moe

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"invalid model config: {msg}")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers"):
            need(getattr(self, name) > 0, f"{name} must be > 0 (got {getattr(self, name)})")
        need(self.hidden_act == "silu", f"hidden_act {self.hidden_act!r} is not supported; use 'silu'")
        need(a.num_heads > 0, f"attention.num_heads must be > 0 (got {a.num_heads})")
        need(a.kv_lora_rank > 0, f"kv_lora_rank must be > 0 (got {a.kv_lora_rank})")
        need(a.q_lora_rank is None or a.q_lora_rank > 0,
             f"q_lora_rank must be > 0 or null for a plain q projection (got {a.q_lora_rank})")
        need(a.qk_nope_head_dim > 0 and a.v_head_dim > 0,
             f"qk_nope_head_dim and v_head_dim must be > 0 (got {a.qk_nope_head_dim}, {a.v_head_dim})")
        need(a.qk_rope_head_dim > 0 and a.qk_rope_head_dim % 2 == 0,
             f"qk_rope_head_dim must be a positive even number (rotary pairs), got {a.qk_rope_head_dim}")
        need(a.rope.type in ("default", "yarn"), f"rope type {a.rope.type!r} is not supported; use 'default' or 'yarn'")
        need(a.rope.theta > 0, f"rope theta must be > 0 (got {a.rope.theta})")
        need(a.rope.type != "yarn" or a.rope.factor >= 1.0, f"YaRN factor must be >= 1 (got {a.rope.factor})")
        need(0 <= m.first_k_dense_replace <= self.num_layers,
             f"first_k_dense_replace={m.first_k_dense_replace} must lie in [0, num_layers={self.num_layers}]")
        has_moe = m.first_k_dense_replace < self.num_layers or self.mtp.num_layers > 0
        if has_moe:
            need(m.n_routed_experts > 0, f"n_routed_experts must be > 0 (got {m.n_routed_experts})")
            need(m.moe_intermediate_size > 0, f"moe_intermediate_size must be > 0 (got {m.moe_intermediate_size})")
            need(m.n_shared_experts >= 0, f"n_shared_experts must be >= 0 (got {m.n_shared_experts})")
            need(0 < m.num_experts_per_tok <= m.n_routed_experts,
                 f"num_experts_per_tok (top-k) = {m.num_experts_per_tok} must be in [1, n_routed_experts = {m.n_routed_experts}]")
            need(m.scoring_func in SCORING_FUNCS, f"scoring_func {m.scoring_func!r} is not one of {SCORING_FUNCS}")
            need(m.topk_method in TOPK_METHODS, f"topk_method {m.topk_method!r} is not one of {TOPK_METHODS}")
            if m.topk_method != "greedy":
                need(m.n_group > 0 and m.n_routed_experts % m.n_group == 0,
                     f"n_routed_experts={m.n_routed_experts} must be divisible by n_group={m.n_group}")
                need(0 < m.topk_group <= m.n_group, f"topk_group={m.topk_group} must be in [1, n_group={m.n_group}]")
                per_group = m.n_routed_experts // m.n_group
                need(m.topk_group * per_group >= m.num_experts_per_tok,
                     f"topk_group={m.topk_group} groups of {per_group} experts cannot hold top-k={m.num_experts_per_tok}")
                need(m.topk_method != "noaux_tc" or per_group >= 2,
                     "noaux_tc scores each group by its top-2 experts: n_routed_experts / n_group must be >= 2")
            need(m.routed_scaling_factor > 0, f"routed_scaling_factor must be > 0 (got {m.routed_scaling_factor})")
        need(self.mtp.num_layers >= 0, f"mtp.num_layers must be >= 0 (got {self.mtp.num_layers})")
        for tok in ("bos_token_id", "eos_token_id"):
            v = getattr(self, tok)
            need(v is None or 0 <= v < self.vocab_size, f"{tok}={v} is outside the vocabulary (size {self.vocab_size})")
        if self.v4 is not None:
            _validate_v4(self, need)
        elif m.scoring_func == "sqrtsoftplus":
            need(False, "scoring_func 'sqrtsoftplus' is a DeepSeek-V4 router; set the v4 config or use 'sigmoid'")
        return self

    # ------------------------------------------------------------ convenience
    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.moe.first_k_dense_replace

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.moe.first_k_dense_replace

    @property
    def family(self) -> str:
        """'v4' for the DeepSeek-V4 architecture, 'v3' for the MLA family (V2 / V3 / Kimi-K2)."""
        return "v3" if self.v4 is None else "v4"

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with top-level fields or dotted nested ones (`moe.n_group=2`) changed."""
        cfg = ModelConfig.from_dict(self.to_dict())
        for key, value in changes.items():
            obj = cfg
            *path, last = key.replace("__", ".").split(".")
            for p in path:
                obj = getattr(obj, p)
            if not hasattr(obj, last):
                raise ValueError(f"unknown config field {key!r}")
            setattr(obj, last, value)
        return cfg.validate()

    # ----------------------------------------------------------- (de)serialise
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config field(s) {sorted(unknown)}; known: {sorted(known)}")
        att = dict(d.pop("attention", {}) or {})
        rope = RopeConfig(**_only(RopeConfig, att.pop("rope", {}) or {}, "attention.rope"))
        moe = d.pop("moe", {}) or {}
        mtp = d.pop("mtp", {}) or {}
        v4 = d.pop("v4", None)
        if v4 is not None:
            v4 = dict(v4)
            crope = RopeConfig(**_only(RopeConfig, v4.pop("compress_rope", {}) or {}, "v4.compress_rope"))
            v4 = V4Config(**_only(V4Config, v4, "v4", skip="compress_rope"), compress_rope=crope)
        return cls(
            **d,
            attention=AttentionConfig(**_only(AttentionConfig, att, "attention"), rope=rope),
            moe=MoEConfig(**_only(MoEConfig, moe, "moe")),
            mtp=MTPConfig(**_only(MTPConfig, mtp, "mtp")),
            v4=v4,
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"moeforge_config": self.to_dict()}, indent=2) + "\n")

    # ------------------------------------------------------------------- HF map
    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], name: str = "hf") -> ModelConfig:
        mt = hf.get("model_type")
        if mt not in HF_MODEL_TYPES:
            raise ValueError(f"model_type {mt!r} is not supported; expected one of {HF_MODEL_TYPES}")
        if mt == "deepseek_v4":
            from moeforge.config_v4 import v4_from_hf_dict

            return v4_from_hf_dict(cls, hf, name)

        def get(key: str, default: Any = None) -> Any:
            v = hf.get(key, default)
            return default if v is None else v

        rp = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rtype = rp.get("rope_type", rp.get("type", "default")) or "default"
        theta = rp.get("rope_theta", hf.get("rope_theta", 10000.0))
        # DeepSeek-V2's code (and transformers' deepseek_v2) always rotate interleaved pairs
        interleave = True if mt == "deepseek_v2" else bool(get("rope_interleave", True))
        rope = RopeConfig(theta=float(theta), interleave=interleave, type=rtype)
        if rtype == "yarn":  # the scaling fields mean nothing for plain RoPE; leave their defaults
            rope.factor = float(rp.get("factor") or 1.0)
            rope.original_max_position_embeddings = int(
                rp.get("original_max_position_embeddings") or get("max_position_embeddings", 4096)
            )
            rope.beta_fast = float(rp.get("beta_fast") or 32.0)
            rope.beta_slow = float(rp.get("beta_slow") or 1.0)
            rope.mscale = float(rp.get("mscale") or 0.0)
            rope.mscale_all_dim = float(rp.get("mscale_all_dim") or 0.0)
        n_heads = get("num_attention_heads", 32)
        attention = AttentionConfig(
            num_heads=n_heads,
            q_lora_rank=hf.get("q_lora_rank"),
            kv_lora_rank=get("kv_lora_rank", 512),
            qk_nope_head_dim=get("qk_nope_head_dim", 128),
            qk_rope_head_dim=get("qk_rope_head_dim", 64),
            v_head_dim=get("v_head_dim", 128),
            attention_bias=bool(get("attention_bias", False)),
            rope=rope,
        )
        if mt == "deepseek_v2":
            scoring, method = get("scoring_func", "softmax"), get("topk_method", "greedy")
        else:  # V3 and Kimi-K2: sigmoid scores, bias-corrected group-limited selection
            scoring, method = get("scoring_func", "sigmoid"), get("topk_method", "noaux_tc")
        n_layers = get("num_hidden_layers", 61)
        moe = MoEConfig(
            n_routed_experts=get("n_routed_experts", 0),
            n_shared_experts=get("n_shared_experts", 0),
            num_experts_per_tok=get("num_experts_per_tok", 1),
            moe_intermediate_size=get("moe_intermediate_size", 0),
            n_group=get("n_group", 1),
            topk_group=get("topk_group", 1),
            scoring_func=scoring,
            topk_method=method,
            norm_topk_prob=bool(get("norm_topk_prob", mt != "deepseek_v2")),
            routed_scaling_factor=float(get("routed_scaling_factor", 1.0)),
            first_k_dense_replace=min(get("first_k_dense_replace", 0), n_layers),
        )
        eos = hf.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        return cls(
            vocab_size=get("vocab_size", 129280),
            hidden_size=get("hidden_size", 7168),
            intermediate_size=get("intermediate_size", 18432),
            num_layers=n_layers,
            rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
            max_position_embeddings=get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            initializer_range=float(get("initializer_range", 0.02)),
            hidden_act=get("hidden_act", "silu"),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=eos,
            attention=attention,
            moe=moe,
            mtp=MTPConfig(num_layers=int(hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers")) or 0)),
            name=name,
        ).validate()

    def to_hf_dict(self) -> dict[str, Any]:
        """An HF `config.json` for DeepseekV3ForCausalLM (V2 for softmax-routed configs, V4 for V4 configs)."""
        if self.v4 is not None:
            from moeforge.config_v4 import v4_to_hf_dict

            return v4_to_hf_dict(self)
        a, m, r = self.attention, self.moe, self.attention.rope
        v2 = m.scoring_func == "softmax"
        rope_parameters: dict[str, Any] = {"rope_type": r.type, "rope_theta": r.theta}
        if r.type == "yarn":
            rope_parameters.update(
                factor=r.factor, original_max_position_embeddings=r.original_max_position_embeddings,
                beta_fast=r.beta_fast, beta_slow=r.beta_slow, mscale=r.mscale, mscale_all_dim=r.mscale_all_dim,
            )
        hf: dict[str, Any] = {
            "architectures": ["DeepseekV2ForCausalLM" if v2 else "DeepseekV3ForCausalLM"],
            "model_type": "deepseek_v2" if v2 else "deepseek_v3",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "moe_intermediate_size": m.moe_intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": a.num_heads,
            "num_key_value_heads": a.num_heads,
            "n_shared_experts": m.n_shared_experts,
            "n_routed_experts": m.n_routed_experts,
            "routed_scaling_factor": m.routed_scaling_factor,
            "kv_lora_rank": a.kv_lora_rank,
            "q_lora_rank": a.q_lora_rank,
            "qk_rope_head_dim": a.qk_rope_head_dim,
            "qk_nope_head_dim": a.qk_nope_head_dim,
            "v_head_dim": a.v_head_dim,
            "n_group": m.n_group,
            "topk_group": m.topk_group,
            "topk_method": m.topk_method,
            "scoring_func": m.scoring_func,
            "num_experts_per_tok": m.num_experts_per_tok,
            "first_k_dense_replace": m.first_k_dense_replace,
            "norm_topk_prob": m.norm_topk_prob,
            "hidden_act": self.hidden_act,
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": self.initializer_range,
            "rms_norm_eps": self.rms_norm_eps,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            "rope_parameters": rope_parameters,
            "rope_theta": r.theta,
            "rope_interleave": r.interleave,
            "attention_bias": a.attention_bias,
            "num_nextn_predict_layers": self.mtp.num_layers,
            "torch_dtype": "float32",
        }
        if r.type == "yarn":  # older readers look for rope_scaling
            hf["rope_scaling"] = {"type": "yarn", **{k: v for k, v in rope_parameters.items() if k != "rope_type"}}
        return hf


def _only(klass: type, d: dict[str, Any], where: str, skip: str = "rope") -> dict[str, Any]:
    known = {f.name for f in dataclasses.fields(klass)} - {skip}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown field(s) {sorted(unknown)} in {where}; known: {sorted(known)}")
    return d


# --------------------------------------------------------------------------- presets
def _tiny() -> ModelConfig:
    # A few million parameters; every feature of the family switched on.
    return ModelConfig(
        name="tiny",
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=768,
        num_layers=4,
        max_position_embeddings=2048,
        attention=AttentionConfig(num_heads=4, q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32,
                                  qk_rope_head_dim=16, v_head_dim=32),
        moe=MoEConfig(n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, moe_intermediate_size=128,
                      n_group=4, topk_group=2, scoring_func="sigmoid", topk_method="noaux_tc",
                      norm_topk_prob=True, routed_scaling_factor=2.5, first_k_dense_replace=1),
        mtp=MTPConfig(num_layers=1),
    )


def _deepseek_v3() -> ModelConfig:
    return ModelConfig(
        name="deepseek-v3",
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, num_layers=61,
        max_position_embeddings=163840,
        attention=AttentionConfig(
            num_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
            v_head_dim=128,
            rope=RopeConfig(theta=10000.0, interleave=True, type="yarn", factor=40.0,
                            original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0,
                            mscale=1.0, mscale_all_dim=1.0),
        ),
        moe=MoEConfig(n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, moe_intermediate_size=2048,
                      n_group=8, topk_group=4, scoring_func="sigmoid", topk_method="noaux_tc",
                      norm_topk_prob=True, routed_scaling_factor=2.5, first_k_dense_replace=3),
        mtp=MTPConfig(num_layers=1),
    )


def _deepseek_v2_lite() -> ModelConfig:
    return ModelConfig(
        name="deepseek-v2-lite",
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, num_layers=27,
        max_position_embeddings=163840, bos_token_id=100000, eos_token_id=100001,
        attention=AttentionConfig(
            num_heads=16, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
            v_head_dim=128,
            rope=RopeConfig(theta=10000.0, interleave=True, type="yarn", factor=40.0,
                            original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0,
                            mscale=0.707, mscale_all_dim=0.707),
        ),
        moe=MoEConfig(n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, moe_intermediate_size=1408,
                      n_group=1, topk_group=1, scoring_func="softmax", topk_method="greedy",
                      norm_topk_prob=False, routed_scaling_factor=1.0, first_k_dense_replace=1),
    )


def _kimi_k2() -> ModelConfig:
    # Kimi-K2 (1T total / 32B active): the V3 architecture with 384 experts, 64 heads, one group.
    cfg = _deepseek_v3()
    cfg.name = "kimi-k2"
    cfg.vocab_size = 163840
    cfg.num_layers = 61
    cfg.max_position_embeddings = 131072
    cfg.attention.num_heads = 64
    cfg.attention.rope = RopeConfig(theta=50000.0, interleave=True, type="yarn", factor=32.0,
                                    original_max_position_embeddings=4096, beta_fast=1.0, beta_slow=1.0,
                                    mscale=1.0, mscale_all_dim=1.0)
    cfg.moe.n_routed_experts = 384
    cfg.moe.n_group = 1
    cfg.moe.topk_group = 1
    cfg.moe.routed_scaling_factor = 2.827
    cfg.moe.first_k_dense_replace = 1
    cfg.mtp.num_layers = 0
    cfg.bos_token_id, cfg.eos_token_id = 163584, 163585
    return cfg


def _validate_v4(cfg: ModelConfig, need: Any) -> None:
    from moeforge.config_v4 import validate_v4

    validate_v4(cfg, need)


PRESETS = {
    "tiny": _tiny,
    "deepseek-v2-lite": _deepseek_v2_lite,
    "deepseek-v3": _deepseek_v3,
    "kimi-k2": _kimi_k2,
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]().validate()


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a file, or a ValueError that names the file and the problem."""
    try:
        d = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); fix or regenerate the file") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path} must hold a JSON object")  # noqa: TRY004 - bad input files are ValueErrors (one-line CLI errors)
    return d


def load_config(path: str | Path) -> ModelConfig:
    """Our own JSON (`{"moeforge_config": {...}}`) or an HF `config.json`; a folder means its config.json."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    d = read_json(p)
    if "moeforge_config" in d:
        try:
            return ModelConfig.from_dict(d["moeforge_config"]).validate()
        except TypeError as e:
            raise ValueError(f"{p}: {e}") from None
    if "model_type" in d:
        return ModelConfig.from_hf_dict(d, name=p.parent.name or "hf")
    raise ValueError(f"{p} is neither a moeforge config nor an HF config.json (no 'model_type')")


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


# DeepSeek-V4 helpers live beside this file (imported last: they use the classes above)
from moeforge.config_v4 import V4_PRESETS

PRESETS.update(V4_PRESETS)
