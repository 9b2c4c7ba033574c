"""What runs on the cluster: the MoE model (:class:`ModelSpec`) and how its router spreads tokens
(:class:`RoutingSpec`)."""

from __future__ import annotations

from dataclasses import dataclass

from ..comm.row_codec import DISPATCH_FORMATS, RowCodec
from ..config import ConfigError, default_cross_node_budget

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp8": 1}
GRAD_DTYPES = ("fp32", "bf16", "fp16")
#: how the dense parameters are stepped: "replicated" (gradients all-reduced, every rank steps all of them) or
#: "distributed" (Megatron's distributed optimizer: gradients reduce-scattered, parameters all-gathered)
OPTIMIZERS = ("replicated", "distributed")


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """Args:
        hidden: model width d. ffn: one expert's FFN width F. experts: routed experts E per MoE layer.
        topk: experts per token k. tokens_per_rank: tokens s one rank routes per micro-batch.
        layers: MoE layers (each with an attention block before it). dtype: the all-to-all payload dtype.
        swiglu: gated experts (3 matrices; 2 for a GELU MLP). seq: sequence length (attention cost only).
        grad_dtype: the dtype the dense parameters' gradients are all-reduced in across the data-parallel
            ranks ("fp32": Megatron-LM's default for bf16 training; "bf16": ``--grad-reduce-in-bf16``).
        optimizer: "replicated" (the dense gradients all-reduced) or "distributed" (Megatron-LM's
            ``--use-distributed-optimizer``: the gradients reduce-scattered in ``grad_dtype``, the updated
            parameters all-gathered in ``dtype``).
        dispatch_format: how LocMoE's dispatcher sends rows in the dispatch direction (``"native"``, ``"fp8"``,
            ``"int8"``; :mod:`locmoe_plugin.comm.row_codec`): two of a layer's four transfers (the dispatch's
            forward, the combine's backward) move :attr:`dispatch_row_bytes` per row. Applies to
            LocMoE's systems (``locmoe_flat``, ``locmoe_hier`` and the overlapped ones) on more than one node
            (on one node the dispatcher sends rows native); the other frameworks' systems stay native.
    """

    hidden: int
    ffn: int
    experts: int
    topk: int
    tokens_per_rank: int
    layers: int = 1
    dtype: str = "bf16"
    swiglu: bool = True
    seq: int = 4096
    grad_dtype: str = "fp32"
    optimizer: str = "replicated"
    dispatch_format: str = "native"

    def __post_init__(self) -> None:
        for f in ("hidden", "ffn", "experts", "topk", "tokens_per_rank", "layers", "seq"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{f}={v!r}: must be an integer >= 1 (--{f.replace('_', '-')})")
        if self.topk > self.experts:
            raise ConfigError(f"topk={self.topk} > experts={self.experts}: a token picks k distinct experts; "
                              f"use --topk <= {self.experts}")
        if self.dtype not in DTYPE_BYTES:
            raise ConfigError(f"dtype {self.dtype!r}: use one of {sorted(DTYPE_BYTES)}")
        if self.grad_dtype not in GRAD_DTYPES:
            raise ConfigError(f"grad_dtype {self.grad_dtype!r}: the dense gradients are reduced in one of "
                              f"{', '.join(GRAD_DTYPES)} (--grad-dtype)")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer {self.optimizer!r}: use one of {', '.join(OPTIMIZERS)} (--optimizer)")
        if self.dispatch_format not in DISPATCH_FORMATS:
            raise ConfigError(f"dispatch_format {self.dispatch_format!r}: use one of {', '.join(DISPATCH_FORMATS)} "
                              f"(--dispatch-format)")

    @property
    def elt(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def dispatch_row_bytes(self) -> int:
        """Bytes of one row in LocMoE's dispatch direction: ``hidden x elt`` native, else the codec's
        encoded row (``hidden`` codes + 4 bytes per 128 features)."""
        if self.dispatch_format == "native":
            return self.hidden * self.elt
        return RowCodec(self.dispatch_format).row_bytes(self.hidden)

    @property
    def expert_flops_per_row(self) -> float:
        """Forward + backward FLOPs of one (token, expert) row: 2 d F per matrix forward, 3x with backward."""
        return 3 * 2 * self.hidden * self.ffn * (3 if self.swiglu else 2)

    @property
    def dense_params_per_layer(self) -> int:
        """Parameters of one layer outside its experts, which every data-parallel rank synchronises:
        the attention block's QKV and output projections (4 d^2; no GQA, no biases) and the router (d E).
        Norms and the embeddings are left out."""
        return 4 * self.hidden**2 + self.hidden * self.experts

    @property
    def attention_flops_per_token(self) -> float:
        """Forward + backward FLOPs of one token's attention block: QKV and output projections (4 d^2 MACs)
        and scores + values over ``seq`` keys (2 seq d MACs), no causal halving, no GQA."""
        return 3 * (2 * 4 * self.hidden**2 + 2 * 2 * self.seq * self.hidden)


@dataclass(frozen=True, kw_only=True)
class RoutingSpec:
    """Args:
        cross_node_share: share of LocMoE's (token, expert) pairs whose expert is on another node (the
            router's measured ``cross_node_share``, or the locality budget it is held to); None = LocMoE's
            default budget on the EP group's N nodes (:func:`locmoe_plugin.config.default_cross_node_budget`:
            0.2 on 2 nodes, 0.3 on 4, towards 0.4 on many), what a run with the defaults holds. The
            baselines route uniformly: share (N - 1) / N.
        pairs_per_copy: for a router that concentrates a token's remote pairs on one other node
            (``budget_mechanism="node"``): the mean number of its pairs a token sends to each other node it
            reaches, i.e. cross-node pairs over the hierarchical plan's inter-node rows (the dispatcher's
            traffic counter); None = the pairs spread as the share alone implies (a Binomial(k, share) of
            remote pairs per token), which overstates the copies, so the bytes, of such a router.
        imbalance: the busiest rank's rows over the mean rank's (>= 1): its expert GEMMs and the bytes it
            sends or receives scale by it; the layer waits for that rank. Applied to every dropless system.
        inter_imbalance: the busiest rank's cross-node bytes over the mean rank's (>= 1), where it differs
            from ``imbalance`` (a locality-trained router concentrates its remote pairs on a few ranks
            while their expert rows stay near balance); None = ``imbalance``. For uniform random routing of
            B tokens it is ~1 (the max over P ranks of a Binomial(B k, share) load exceeds the mean by
            about sqrt(2 ln P / (B k share))); a measured per-rank byte count is the input to prefer.
        group_nodes: nodes a token may use under group-limited routing (Megatron ``--moe-router-num-groups``
            = nodes, ``--moe-router-group-topk`` = this); None = min(nodes, 4).
        capacity_factor: DeepSpeed MoE's capacity factor (its buffers are padded to capacity).
    """

    cross_node_share: float | None = None
    pairs_per_copy: float | None = None
    imbalance: float = 1.0
    inter_imbalance: float | None = None
    group_nodes: int | None = None
    capacity_factor: float = 1.25

    def __post_init__(self) -> None:
        if self.cross_node_share is not None and not 0.0 <= self.cross_node_share <= 1.0:
            raise ConfigError(f"cross_node_share={self.cross_node_share!r}: a share of pairs lies in [0, 1] "
                              f"(--cross-node-share 0.1 = 10 % of pairs cross nodes)")
        if self.pairs_per_copy is not None and not self.pairs_per_copy >= 1.0:
            raise ConfigError(f"pairs_per_copy={self.pairs_per_copy!r}: a copy carries at least one pair; give a "
                              f"value >= 1 (--pairs-per-copy)")
        if not self.imbalance >= 1.0:
            raise ConfigError(f"imbalance={self.imbalance!r}: the busiest rank's rows over the mean is >= 1 "
                              f"(1 = balanced)")
        if self.inter_imbalance is not None and not self.inter_imbalance >= 1.0:
            raise ConfigError(f"inter_imbalance={self.inter_imbalance!r}: the busiest rank's cross-node bytes "
                              f"over the mean is >= 1 (1 = balanced; --inter-imbalance)")
        if self.group_nodes is not None and (isinstance(self.group_nodes, bool) or self.group_nodes < 1):
            raise ConfigError(f"group_nodes={self.group_nodes!r}: must be >= 1 (--group-nodes)")
        if not self.capacity_factor > 0:
            raise ConfigError(f"capacity_factor={self.capacity_factor!r}: must be > 0 (--capacity-factor)")

    def share_on(self, nodes: int) -> float:
        """LocMoE's cross-node pair share on an EP group over ``nodes`` nodes: ``cross_node_share``, or the
        default budget there (0 on one node, where nothing crosses)."""
        if nodes <= 1:
            return 0.0
        if self.cross_node_share is not None:
            return self.cross_node_share
        return default_cross_node_budget(nodes) or 0.0

    @property
    def inter_scale(self) -> float:
        return self.imbalance if self.inter_imbalance is None else self.inter_imbalance
