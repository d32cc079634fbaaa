"""Sequential-recommendation baselines on the harness contract (``model.base``).

All three score by inner product with the item-id embedding table, which is also their
input embedding (shared input/output embeddings, row 0 = padding), and train with
full-softmax cross-entropy on the window's next item (``softmax_loss``):

* ``SASRec`` (Kang & McAuley, ICDM '18) with the CE loss that "Turning dross into gold"
  (Klenitskiy & Vasilev, RecSys '23) and gSASRec (Petrov & Macdonald, RecSys '23) show is
  what makes it strong: causal pre-LN self-attention blocks, learned positions, the user
  is the output at the newest (last) position;
* ``GRU4Rec`` (Hidasi et al., ICLR '16; CE as in Hidasi & Czapp, RecSys '23): embedding ->
  dropout -> one GRU layer -> last hidden state -> linear;
* ``TwoTower``: the plain (YouTube-DNN style) two-tower: masked mean of the history's item
  embeddings -> MLP.

They are deterministic: ``noise`` is ignored and ``time_lag`` is unused.  Both still appear
in the ONNX graph (``contracts.tower`` needs all three inputs; the legacy exporter drops an
unused one), through ``_keep_inputs`` which adds an exact zero (a sum over an empty slice).

Dimensions below are written as positive numbers on purpose: torch's ONNX tracer
(torch 2.13, dynamo=False) numbers a negative ``dim`` of cat/softmax/chunk wrongly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from model.base import Batch, SequentialRecommender, keep_contract_inputs

NEG_INF = -1e9
EMBEDDING_STD = 0.05  # the same item-table init as T2Diff, so the models start alike


def _item_table(n_items: int, dim: int) -> nn.Embedding:
    table = nn.Embedding(n_items + 1, dim, padding_idx=0)
    nn.init.normal_(table.weight, std=EMBEDDING_STD)
    with torch.no_grad():
        table.weight[0].zero_()
    return table


class _Baseline(SequentialRecommender):
    """Shared item table, loss and contract plumbing; subclasses implement ``encode``."""

    def __init__(self, n_items: int, dim: int) -> None:
        super().__init__(n_items, dim)
        self.item_emb = _item_table(n_items, dim)

    def encode(self, item_seq: torch.Tensor) -> torch.Tensor:
        """[B, L] left-padded tokens -> [B, d] user vectors."""
        raise NotImplementedError

    def item_embeddings(self) -> torch.Tensor:
        return self.item_emb.weight

    def hidden(self, item_seq: torch.Tensor) -> torch.Tensor:
        """[B, L, d]: the user vector after each window position (causal models only)."""
        raise NotImplementedError(f"{self.model_name} has no per-position outputs")

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        assert batch.target is not None
        if self.dense_loss:
            loss = self.dense_softmax_loss(
                self.hidden(batch.item_seq), batch.item_seq, batch.target
            )
        else:
            loss = self.softmax_loss(self.encode(batch.item_seq), batch.target)
        return loss, {"tower": loss.detach()}

    def user_embedding(self, batch: Batch, noise: torch.Tensor | None = None) -> torch.Tensor:
        return keep_contract_inputs(self.encode(batch.item_seq), batch, noise)


# --------------------------------------------------------------------------- SASRec


@dataclass
class SASRecConfig:
    dim: int = 64
    max_seq_len: int = 50
    blocks: int = 2
    heads: int = 1
    ffn_mult: int = 1  # FFN hidden = ffn_mult * dim (1 in the original SASRec)
    dropout: float = 0.2
    dense_loss: bool = False  # a target at every window position (base.dense_loss)
    dense_cut: str = "newest"  # where each user's window ends (base.dense_cut)

    def to_dict(self) -> dict:
        return asdict(self)


class CausalBlock(nn.Module):
    """Pre-LN causal multi-head self-attention + point-wise FFN, in plain ops (ONNX)."""

    def __init__(self, dim: int, heads: int, ffn_mult: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_mult * dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(ffn_mult * dim, dim),
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
        """``blocked`` [B, 1, L, L] float: ``NEG_INF`` where a query may not see a key."""
        batch, length, dim = x.shape
        head_dim = dim // self.heads
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=2)

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(batch, length, self.heads, head_dim).transpose(1, 2)

        scores = split(q) @ split(k).transpose(2, 3) * head_dim**-0.5 + blocked
        attn = self.drop(scores.softmax(dim=3))
        out = (attn @ split(v)).transpose(1, 2).reshape(batch, length, dim)
        x = x + self.drop(self.proj(out))
        return x + self.drop(self.ffn(self.norm2(x)))


class SASRec(_Baseline):
    model_name = "sasrec"

    def __init__(self, n_items: int, config: SASRecConfig) -> None:
        super().__init__(n_items, config.dim)
        self.config = config
        self.use_dense_loss(config.dense_loss, config.dense_cut)
        self.pos_emb = nn.Embedding(config.max_seq_len, config.dim)
        nn.init.normal_(self.pos_emb.weight, std=EMBEDDING_STD)
        self.input_drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            CausalBlock(config.dim, config.heads, config.ffn_mult, config.dropout)
            for _ in range(config.blocks)
        )
        self.final_norm = nn.LayerNorm(config.dim)

    def encode(self, item_seq: torch.Tensor) -> torch.Tensor:
        return self.hidden(item_seq)[:, item_seq.shape[1] - 1]

    def hidden(self, item_seq: torch.Tensor) -> torch.Tensor:
        length = item_seq.shape[1]
        mask = item_seq > 0  # [B, L]
        keep = mask[:, :, None].to(self.item_emb.weight.dtype)
        # Positions are right-aligned: the newest behaviour always gets the last one.
        start = self.config.max_seq_len - length
        x = self.item_emb(item_seq) + self.pos_emb.weight[start:]
        x = self.input_drop(x) * keep
        steps = torch.arange(length, device=item_seq.device)
        causal = steps[None, :] <= steps[:, None]  # [L(query), L(key)]
        allowed = causal[None, :, :] & mask[:, None, :]  # [B, L, L]
        # Fully blocked rows (padding queries) get a uniform, finite softmax; their
        # outputs are zeroed by ``keep`` and never reach a valid query.
        blocked = (~allowed).to(x.dtype)[:, None, :, :] * NEG_INF
        for block in self.blocks:
            x = block(x, blocked) * keep
        return self.final_norm(x)


# --------------------------------------------------------------------------- GRU4Rec


@dataclass
class GRU4RecConfig:
    dim: int = 64
    max_seq_len: int = 50
    hidden: int = 0  # GRU hidden size; 0 = dim
    dropout: float = 0.2  # on the input embeddings
    output_proj: bool = True  # linear hidden -> dim (forced when hidden != dim)
    dense_loss: bool = False  # a target at every window position (base.dense_loss)
    dense_cut: str = "newest"  # where each user's window ends (base.dense_cut)

    def to_dict(self) -> dict:
        return asdict(self)


class GRU4Rec(_Baseline):
    model_name = "gru4rec"

    def __init__(self, n_items: int, config: GRU4RecConfig) -> None:
        super().__init__(n_items, config.dim)
        self.config = config
        self.use_dense_loss(config.dense_loss, config.dense_cut)
        hidden = config.hidden or config.dim
        self.input_drop = nn.Dropout(config.dropout)
        self.gru = nn.GRU(config.dim, hidden, num_layers=1, batch_first=True)
        use_proj = config.output_proj or hidden != config.dim
        self.out = nn.Linear(hidden, config.dim) if use_proj else nn.Identity()

    def encode(self, item_seq: torch.Tensor) -> torch.Tensor:
        # Left padding: the GRU reads the padding (zero vectors) first and the newest item
        # last, so the last output is the state after the whole history.  The padding run
        # only moves the state through the biases, identically for every row of one length.
        states, _ = self.gru(self.input_drop(self.item_emb(item_seq)))
        return self.out(states[:, item_seq.shape[1] - 1])

    def hidden(self, item_seq: torch.Tensor) -> torch.Tensor:
        states, _ = self.gru(self.input_drop(self.item_emb(item_seq)))
        return self.out(states)


# --------------------------------------------------------------------------- two-tower


@dataclass
class TwoTowerConfig:
    dim: int = 64
    max_seq_len: int = 50
    mlp_layers: int = 2  # Linear layers; hidden width mlp_mult * dim
    mlp_mult: int = 2
    dropout: float = 0.1

    def to_dict(self) -> dict:
        return asdict(self)


class TwoTower(_Baseline):
    model_name = "two_tower"

    def __init__(self, n_items: int, config: TwoTowerConfig) -> None:
        super().__init__(n_items, config.dim)
        if config.mlp_layers < 1:
            raise ValueError("two_tower needs mlp_layers >= 1")
        self.config = config
        widths = [config.dim] + [config.mlp_mult * config.dim] * (config.mlp_layers - 1)
        layers: list[nn.Module] = [nn.Dropout(config.dropout)]
        for width_in, width_out in zip(widths, widths[1:], strict=False):
            layers += [nn.Linear(width_in, width_out), nn.ReLU(), nn.Dropout(config.dropout)]
        layers.append(nn.Linear(widths[len(widths) - 1], config.dim))
        self.mlp = nn.Sequential(*layers)

    def encode(self, item_seq: torch.Tensor) -> torch.Tensor:
        weights = (item_seq > 0).to(self.item_emb.weight.dtype)[:, :, None]
        pooled = (self.item_emb(item_seq) * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return self.mlp(pooled)
