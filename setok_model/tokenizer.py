"""SeTokTokenizer: patch features -> a variable number of concept tokens per image, batched."""

from __future__ import annotations

import re
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Mapping, Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

import setok_kernels
from setok_kernels import _validation as V

from . import _checks
from .layers import PositionalEncoding2D, build_encoder

__all__ = ["SeTokConfig", "SeTokOutput", "SeTokTokenizer"]


@dataclass
class SeTokConfig:
    """Defaults are the SeTok reference's (SPEC.md); ``block`` picks the encoder block.

    ``block="shared_norm"`` is the reference's block (one norm shared by all
    attention layers, one MLP at the end; needed to load its weights);
    ``"pre_norm"`` is a standard pre-norm transformer for new models.
    ``max_clusters`` bounds the tokens per image (None: N, the reference's
    "no cap"; 0 is refused, never "no cap"); it also sets the static size
    ``M`` of the outputs. ``k`` larger than an image's real patches uses
    them all (SPEC.md: k is clamped per image).
    """

    input_dim: int = 4096
    hidden_dim: int = 4096
    token_dim: int = 4096
    num_heads: int = 2
    mlp_dim: int = 4096
    inner_layers: int = 2
    inter_layers: int = 2
    dropout: float = 0.0
    k: int = 64
    threshold: float = 0.5
    min_clusters: int = 64
    max_clusters: Optional[int] = None
    densest_delta: str = "column_max"
    block: str = "shared_norm"
    gradient_checkpointing: bool = False

    def __post_init__(self):
        for name in ("input_dim", "hidden_dim", "token_dim", "mlp_dim", "k", "min_clusters"):
            _checks.count(getattr(self, name), name)
        for name in ("inner_layers", "inter_layers"):
            _checks.count(getattr(self, name), name, minimum=0)
        _checks.heads(self.hidden_dim, self.num_heads)
        _checks.probability(self.dropout, "dropout")
        V.not_nan(self.threshold, "threshold")
        if self.max_clusters is not None:
            _checks.count(self.max_clusters, "max_clusters")
        V.densest_delta(self.densest_delta)
        V.choice(self.block, "block", ("shared_norm", "pre_norm"))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "SeTokConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown SeTokConfig fields: {sorted(unknown)}")
        return cls(**d)


@dataclass
class SeTokOutput:
    """Tokens of a batch, packed with a static layout.

    ``tokens (B*M, D)``, one per cluster: image b's tokens are rows
    ``cu_clusters[b]:cu_clusters[b+1]`` in cluster order; rows past
    ``cu_clusters[-1]`` are zeros (static shape, no host sync). ``M`` is
    ``max_clusters`` (``config.max_clusters``, else N). The fields' former names
    ``cu_tokens``, ``num_tokens``, ``max_tokens`` still read, with a
    DeprecationWarning (docs/NAMES.md).
    """

    tokens: Tensor
    cu_clusters: Tensor  # (B+1,) int32
    num_clusters: Tensor  # (B,) int64
    labels: Tensor  # (B, N) int64, cluster (= token) of each patch, -1 where masked
    score: Tensor  # (B, N) DPC score
    max_clusters: int

    cu_tokens = _checks.deprecated_field("cu_clusters", "cu_tokens")
    num_tokens = _checks.deprecated_field("num_clusters", "num_tokens")
    max_tokens = _checks.deprecated_field("max_clusters", "max_tokens")

    def padded(self) -> tuple[Tensor, Tensor]:
        """``(tokens (B, M, D), key_mask (B, M))``, True for real tokens."""
        return setok_kernels.pad_segments(self.tokens, self.cu_clusters, self.max_clusters)


def _live_extent(packing, rows: int, segments: int, device: torch.device) -> tuple[int, int]:
    """How many packed rows and segments the encoders must run on.

    On the CPU, reading the real counts costs nothing (there is no device to
    wait for), so the encoders skip masked tokens and empty cluster slots.
    Elsewhere, and under torch.compile, the static bounds keep the forward free
    of host syncs (capturable in a CUDA graph); the extra rows are masked out.
    """
    if device.type != "cpu" or torch.compiler.is_compiling():
        return rows, segments
    return int(packing.cu_seqlens[-1]), int(packing.cu_clusters[-1])


class SeTokTokenizer(nn.Module):
    """Position embedding -> DPC-kNN -> intra-cluster encoder -> mean -> inter-cluster encoder -> ``out``.

    All clusters of all images go through the intra-cluster encoder as one
    packed varlen batch, all images' cluster vectors through the
    inter-cluster encoder as another: no loop over images or clusters, no host
    sync. Differentiable in the parameters and in ``features``; the
    clustering is not (it sees detached features).
    """

    def __init__(self, config: SeTokConfig):
        super().__init__()
        self.config = config
        c = config
        self.position_embedding = PositionalEncoding2D(c.input_dim)
        # the reference has none: its vision features already have the hidden width
        self.input_proj = nn.Identity() if c.input_dim == c.hidden_dim else nn.Linear(c.input_dim, c.hidden_dim)
        self.inner_encoder = build_encoder(c.block, c.hidden_dim, c.num_heads, c.mlp_dim, c.inner_layers, c.dropout)
        self.inter_encoder = build_encoder(c.block, c.hidden_dim, c.num_heads, c.mlp_dim, c.inter_layers, c.dropout)
        self.out = nn.Linear(c.hidden_dim, c.token_dim)
        self.set_gradient_checkpointing(c.gradient_checkpointing)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.config.gradient_checkpointing = enabled
        self.inner_encoder.gradient_checkpointing = enabled
        self.inter_encoder.gradient_checkpointing = enabled

    def cluster(self, features: Tensor, mask: Optional[Tensor] = None, grid: Optional[tuple[int, int]] = None):
        """``(features + position embedding, ClusterResult)``: the clustering alone.

        An image with no real patch (mask all False) gets no cluster.
        """
        c = self.config
        _, N, _ = _checks.features(features, self, c.input_dim)
        x = self.position_embedding(features, _checks.grid(N, grid))
        clusters = setok_kernels.dpc_cluster(
            x, min(c.k, N), c.threshold, c.min_clusters, self.cluster_slots(N), mask, c.densest_delta
        )
        return x, clusters

    def cluster_slots(self, N: int) -> int:
        """M, the static bound on clusters (= tokens) per image for N patches."""
        return V.cluster_bound(N, self.config.max_clusters, None, 1)

    def max_tokens(self, N: int) -> int:
        """Deprecated name of :meth:`cluster_slots`."""
        warnings.warn("SeTokTokenizer.max_tokens() is deprecated, use cluster_slots()", DeprecationWarning, stacklevel=2)
        return self.cluster_slots(N)

    def forward(self, features: Tensor, mask: Optional[Tensor] = None, grid: Optional[tuple[int, int]] = None) -> SeTokOutput:
        x, clusters = self.cluster(features, mask, grid)
        B, N, _ = features.shape
        M = self.cluster_slots(N)
        packing = setok_kernels.pack_clusters(clusters.labels, clusters.num_clusters, M)
        live_rows, live_segments = _live_extent(packing, B * N, B * M, x.device)
        # (live_rows, hidden): each cluster's tokens contiguous, masked tokens (in no segment) last
        rows = self.input_proj(x).flatten(0, 1).index_select(0, packing.perm[:live_rows])  # 5x indexing's speed
        # (live_segments, hidden): one vector per cluster (the mean of its rows), image after
        # image, empty slots last; the offsets cut to the live segments, so that the means
        # (and the last linear layer, which runs on them) cover only those
        cu_seqlens = packing.cu_seqlens[: live_segments + 1]
        pooled = self.inner_encoder(rows, cu_seqlens, N, segment_means=True)
        pooled = self.inter_encoder(pooled, packing.cu_clusters, M)
        tokens = self.out(pooled)
        if live_segments < B * M:
            tokens = F.pad(tokens, (0, 0, 0, B * M - live_segments))
        else:
            real = torch.arange(B * M, device=tokens.device) < packing.cu_clusters[-1]
            tokens = torch.where(real[:, None], tokens, torch.zeros((), dtype=tokens.dtype, device=tokens.device))
        return SeTokOutput(tokens, packing.cu_clusters, clusters.num_clusters, clusters.labels, clusters.score, M)

    # ------------------------------------------------------------ reference weights

    def load_official_state_dict(self, state_dict: Mapping[str, Tensor], prefix: str = "") -> None:
        """Load weights in the SeTok reference layout (OFFICIAL.md); its vision tower keys are ignored.

        Needs ``block="shared_norm"`` and ``input_dim == hidden_dim``, as in the reference.
        """
        if self.config.block != "shared_norm":
            raise ValueError(f"reference weights need block='shared_norm', this tokenizer has {self.config.block!r}")
        if self.config.input_dim != self.config.hidden_dim:
            raise ValueError("reference weights need input_dim == hidden_dim (the reference has no input projection)")
        own = _from_official_keys(_strip_prefix(state_dict, prefix))
        if "position_embedding.inv_freq" not in own:
            # some releases keep it out of the state dict; it is a fixed table anyway
            own["position_embedding.inv_freq"] = self.position_embedding.inv_freq
        missing = [_to_official_key(key) for key in self.state_dict() if key not in own]
        if missing:
            raise ValueError(f"state_dict (prefix {prefix!r}) misses {len(missing)} key(s): {', '.join(prefix + k for k in missing)}")
        self.load_state_dict(own, strict=True)

    @classmethod
    def from_official_state_dict(
        cls, state_dict: Mapping[str, Tensor], num_heads: int, prefix: str = "", **config_fields
    ) -> "SeTokTokenizer":
        """A tokenizer whose dims and depths are read off reference weights; other fields from ``config_fields``.

        Parameters take the dtype of the weights.
        """
        sd = _strip_prefix(state_dict, prefix)
        missing = [key for key in _SIZING_KEYS if key not in sd]
        if missing:
            raise ValueError(f"not a SeTok reference state dict (prefix {prefix!r}): missing {', '.join(prefix + k for k in missing)}")
        hidden = sd["inner_encoder.norm1.weight"].shape[0]
        mlp = sd["inner_encoder.mlp.fc1.weight"].shape[0]
        token_dim = sd["out.weight"].shape[0]
        if sd["inter_encoder.mlp.fc1.weight"].shape[0] != mlp:
            raise ValueError("inner and inter encoders have different MLP widths; SeTokConfig has one mlp_dim")
        depth = {
            enc: len({m.group(1) for key in sd if (m := re.fullmatch(rf"{enc}\.layers\.(\d+)\.1\.qkv\.weight", key))})
            for enc in ("inner_encoder", "inter_encoder")
        }
        config = SeTokConfig(
            **{
                **dict(input_dim=hidden, hidden_dim=hidden, token_dim=token_dim, num_heads=num_heads, mlp_dim=mlp),
                **dict(inner_layers=depth["inner_encoder"], inter_layers=depth["inter_encoder"]),
                **config_fields,
                "block": "shared_norm",
            }
        )
        # built in the weights' dtype: float64 weights stay exact
        model = cls(config).to(sd["out.weight"].dtype)
        model.load_official_state_dict(sd)
        return model


# the keys from_official_state_dict reads the dims off
_SIZING_KEYS = ("inner_encoder.norm1.weight", "inner_encoder.mlp.fc1.weight", "inter_encoder.mlp.fc1.weight", "out.weight")


def _strip_prefix(state_dict: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}


_LAYER_KEY = re.compile(r"(inner_encoder|inter_encoder)\.layers\.(\d+)\.([01])\.(.+)")


def _to_official_key(key: str) -> str:
    """This module's key -> the reference's (the inverse of the renaming in _from_official_keys)."""
    m = re.fullmatch(r"(inner_encoder|inter_encoder)\.attn\.(\d+)\.(.+)", key)
    return f"{m[1]}.layers.{m[2]}.1.{m[3]}" if m else key


def _from_official_keys(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Reference key names -> this module's. ``layers.{i}.0`` repeats the shared ``norm1``: checked, dropped."""
    own = {}
    for key, value in sd.items():
        if key.startswith("image_feature_encoder."):
            continue
        m = _LAYER_KEY.fullmatch(key)
        if m is None:
            own[key] = value
            continue
        enc, i, part, rest = m.groups()
        if part == "1":
            own[f"{enc}.attn.{i}.{rest}"] = value
        elif not torch.equal(value, sd.get(f"{enc}.norm1.{rest}", value.new_empty(0))):
            raise ValueError(f"{key} differs from {enc}.norm1.{rest}: the reference shares one norm1")
    return own
