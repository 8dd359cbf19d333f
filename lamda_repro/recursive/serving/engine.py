"""A decoding engine for (Relaxed) Recursive Transformers that runs tokens at different loop depths
together in one call of the shared block.

The engine owns a KV cache with one slot per (depth position, sequence): ``k[p, s, :, t]`` is the
key of token t of the sequence in slot s at position p. An *item* is the token a sequence has in
flight and the loop it is at. A call of the block takes any set of items: for every shared layer
k it runs one batched layer forward in which item i uses position p_i = b_i K + k, i.e. its own
cache slot and, for relaxed models, its own depth's LoRA. The shared weights are applied once to
all items; the per-depth deltas are applied to the items of each depth (``relaxed_delta``).

Supported decoders: Llama-style layers (``input_layernorm``, ``self_attn.{q,k,v,o}_proj``,
``post_attention_layernorm``, ``mlp.{gate,up,down}_proj`` with ``act_fn``, rotary embeddings),
i.e. model types in ``SUPPORTED_MODEL_TYPES``. A plain (non-recursive) model is served as one
loop of L layers.

KV policy for a token that exits after loop b < B - 1 (the skipped positions never ran):
``copy_state`` copies the exit hidden state into every skipped depth and computes that depth's
key and value from it (its input norm, k/v maps with the depth's LoRA, rotary embedding: the
state propagation of early-exit decoders); ``copy_kv`` copies the key and value the token computed
at the same shared layer in its exit loop. Both leave every cache entry a later token reads
defined, so decoding stays well formed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lamda_repro.recursive.early_exit import KV_POLICIES, final_norm
from lamda_repro.recursive.spec import RecursiveConfigError, decoder_layers, recursion_spec

SUPPORTED_MODEL_TYPES = ("llama", "gemma")  # Llama-style layers, full attention (tested)
LINEAR_SITES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip
NORM_SITES = ("input_layernorm", "post_attention_layernorm")
_KNOWN_CHILDREN = {
    "": {"self_attn", "mlp", *NORM_SITES},
    "self_attn": {"q_proj", "k_proj", "v_proj", "o_proj"},
    "mlp": {"gate_proj", "up_proj", "down_proj", "act_fn"},
}


class EngineError(ValueError):
    """The model or a request cannot be served by the engine."""


def relaxed_delta(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What a relaxed (depth-specific) linear map adds to its shared ``base_layer`` for inputs ``x``.

    A relaxation kind plugs in by giving its module a ``base_layer`` (the shared map) and a
    ``delta(x)`` method; without ``delta`` the difference ``module(x) - base_layer(x)`` is used.
    """
    delta = getattr(module, "delta", None)
    if callable(delta):
        return delta(x)
    return module(x) - module.base_layer(x)


def _base(module: nn.Module) -> nn.Module:
    return getattr(module, "base_layer", module)


def _same_parameters(a: nn.Module, b: nn.Module) -> bool:
    pa, pb = list(a.parameters()), list(b.parameters())
    return len(pa) == len(pb) and all(x is y for x, y in zip(pa, pb, strict=True))


def timer(device: torch.device) -> tuple[Callable[[], float], str]:
    """The clock the engine's measurements use, and its name.

    CUDA: wall time (callers synchronise). CPU with one torch thread: the process's CPU time,
    which equals wall time on an idle machine and, unlike wall time, is not stretched by other
    processes on a shared one (tables of short calls and long decoding runs then agree). CPU with
    several threads: wall time."""
    if device.type == "cpu" and torch.get_num_threads() == 1:
        return time.process_time, "process CPU time (1 torch thread)"
    return time.perf_counter, "wall time"


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass(frozen=True)
class Geometry:
    """What the engine needs to know about the model's shape."""

    num_layers: int  # L positions
    num_loops: int  # B (1 for a plain model)
    num_shared: int  # K layers per block call
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    relaxed: bool

    def kv_bytes_per_token(self, element_bytes: int) -> int:
        """Bytes of keys and values one token stores over all L positions."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element_bytes


def model_geometry(model: nn.Module) -> Geometry:
    """The geometry of a servable model; a one-line EngineError for anything else."""
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise EngineError(
            f"the serving engine supports model types {', '.join(SUPPORTED_MODEL_TYPES)}; got {model_type!r}"
        )
    layers = decoder_layers(model)
    spec = recursion_spec(model)
    if spec is None:
        loops, shared, relaxed = 1, len(layers), False
    else:
        if spec.sharing != "cycle":
            raise EngineError(f"depth-wise batching needs cycle sharing, the model uses {spec.sharing!r}")
        loops, shared, relaxed = spec.num_loops, spec.num_shared, bool(spec.lora)
    attn = layers[0].self_attn
    return Geometry(
        num_layers=len(layers),
        num_loops=loops,
        num_shared=shared,
        hidden_size=config.hidden_size,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=attn.head_dim,
        vocab_size=config.vocab_size,
        relaxed=relaxed,
    )


class DepthBatchedModel:
    """Functional forward of a decoder whose items sit at different depth positions.

    Holds the KV cache (``slots`` sequences x ``max_len`` tokens) and the layer modules; every
    method takes explicit slot/position/token-index tensors and keeps no scheduling state.
    """

    def __init__(self, model: nn.Module, slots: int, max_len: int, kv_policy: str = "copy_state"):
        if kv_policy not in KV_POLICIES:
            raise EngineError(f"kv_policy must be one of {KV_POLICIES}, got {kv_policy!r}")
        if slots < 1 or max_len < 1:
            raise EngineError(f"the KV cache needs slots >= 1 and max_len >= 1, got {slots}, {max_len}")
        self.model = model
        self.geometry = g = model_geometry(model)
        self.kv_policy = kv_policy
        self.layers = decoder_layers(model)
        self.embed_tokens = model.get_input_embeddings()
        self.norm = final_norm(model)
        self.lm_head = model.get_output_embeddings()
        self.rotary = model.get_submodule("model.rotary_emb")
        self._check_sharing()
        ref = next(model.parameters())
        self.device, self.dtype = ref.device, ref.dtype
        shape = (g.num_layers, slots, g.num_kv_heads, max_len, g.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.slots, self.max_len = slots, max_len
        # the modules of every site at every position, and whether a site's modules differ by depth
        self.sites = {
            site: [layer.get_submodule(site) for layer in self.layers]
            for site in (*LINEAR_SITES, *NORM_SITES)
        }
        K = g.num_shared
        self._tied = {
            site: all(_same_parameters(mods[p % K], mods[p]) for p in range(g.num_layers))
            for site, mods in self.sites.items()
        }
        self.act_fn = self.layers[0].mlp.act_fn
        self.scaling = self.layers[0].self_attn.scaling

    def _check_sharing(self) -> None:
        g, layers = self.geometry, self.layers
        for layer in layers:
            for site in (*LINEAR_SITES, *NORM_SITES):
                try:
                    layer.get_submodule(site)
                except AttributeError:
                    raise EngineError(f"decoder layer {type(layer).__name__} has no {site}") from None
            for path, allowed in _KNOWN_CHILDREN.items():
                module = layer.get_submodule(path) if path else layer
                extra = sorted({name for name, _ in module.named_children()} - allowed)
                if extra:
                    raise EngineError(
                        f"decoder layer {type(layer).__name__} has parts the engine does not run: "
                        f"{', '.join(f'{path}.{e}' if path else e for e in extra)}"
                    )
        for k in range(g.num_shared):
            for b in range(1, g.num_loops):
                p = b * g.num_shared + k
                for site in LINEAR_SITES:
                    a, c = _base(layers[k].get_submodule(site)), _base(layers[p].get_submodule(site))
                    if not _same_parameters(a, c):
                        raise RecursiveConfigError(
                            f"positions {k} and {p} do not share the weights of {site}: "
                            "not a cycle-shared block"
                        )

    # -- per-depth application ---------------------------------------------------------------

    def _loop_rows(self, loops: torch.Tensor) -> list[tuple[int, torch.Tensor | None]]:
        """(loop, row indices) for every distinct loop in ``loops``; rows None when there is one."""
        values = loops.tolist()
        distinct = sorted(set(values))
        if len(distinct) == 1:
            return [(distinct[0], None)]
        return [
            (b, torch.tensor([i for i, v in enumerate(values) if v == b], device=self.device))
            for b in distinct
        ]

    def _linear(self, site: str, groups, x: torch.Tensor) -> torch.Tensor:
        mods = self.sites[site]
        first = mods[groups[0][0]]
        y = _base(first)(x)
        if not hasattr(first, "base_layer"):
            return y
        for position, rows in groups:
            module = mods[position]
            if rows is None:
                y = y + relaxed_delta(module, x)
            else:
                y = y.index_add(0, rows, relaxed_delta(module, x.index_select(0, rows)))
        return y

    def _norm(self, site: str, groups, x: torch.Tensor) -> torch.Tensor:
        """A norm site: one call when every depth ties it to the block (the paper), else per depth."""
        mods = self.sites[site]
        if self._tied[site] or len(groups) == 1:
            return mods[groups[0][0]](x)
        out = torch.empty_like(x)
        for position, rows in groups:
            out[rows] = mods[position](x.index_select(0, rows))
        return out

    def _rope(self, x: torch.Tensor, token_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.rotary(x, position_ids=token_pos)
        return cos.unsqueeze(1), sin.unsqueeze(1)  # [n, 1, q, head_dim]

    def _kv(self, groups, h: torch.Tensor, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.geometry
        n, q = h.shape[:2]
        k = self._linear("self_attn.k_proj", groups, h).view(n, q, g.num_kv_heads, g.head_dim).transpose(1, 2)
        v = self._linear("self_attn.v_proj", groups, h).view(n, q, g.num_kv_heads, g.head_dim).transpose(1, 2)
        return k * cos + rotate_half(k) * sin, v

    # -- one layer ---------------------------------------------------------------------------

    def _context(self, x: torch.Tensor, slots: torch.Tensor, token_pos: torch.Tensor) -> dict:
        """What every layer of one call shares: rotary tables, the visibility mask, cache rows."""
        n, q = token_pos.shape
        length = int(token_pos.max()) + 1
        cos, sin = self._rope(x, token_pos)
        visible = torch.arange(length, device=self.device)[None, None, :] <= token_pos[:, :, None]
        return {
            "slots": slots,
            "token_pos": token_pos,
            "write_slots": slots[:, None].expand(n, q),
            "length": length,
            "cos": cos,
            "sin": sin,
            "mask": visible[:, None],
        }

    def layer(self, x: torch.Tensor, positions: torch.Tensor, groups, ctx: dict) -> torch.Tensor:
        """One decoder layer for n items: x [n, q, d]; item i at depth position ``positions[i]``
        (``groups``: (position, rows) per distinct position), its cache slot and token indices in
        ``ctx``. Writes the items' keys and values and attends over each item's cache."""
        g = self.geometry
        n, q, _ = x.shape
        h = self._norm("input_layernorm", groups, x)
        cos, sin = ctx["cos"], ctx["sin"]
        query = (
            self._linear("self_attn.q_proj", groups, h).view(n, q, g.num_heads, g.head_dim).transpose(1, 2)
        )
        query = query * cos + rotate_half(query) * sin
        key, value = self._kv(groups, h, cos, sin)
        # k_cache[p_i, s_i, :, t_ij] = key[i, :, j]
        rows_p = positions[:, None].expand(n, q)
        self.k_cache[rows_p, ctx["write_slots"], :, ctx["token_pos"]] = key.transpose(1, 2)
        self.v_cache[rows_p, ctx["write_slots"], :, ctx["token_pos"]] = value.transpose(1, 2)
        keys = self.k_cache[positions, ctx["slots"], :, : ctx["length"]]  # [n, kv, length, head_dim]
        values = self.v_cache[positions, ctx["slots"], :, : ctx["length"]]
        attn = F.scaled_dot_product_attention(
            query,
            keys,
            values,
            attn_mask=ctx["mask"],
            scale=self.scaling,
            enable_gqa=g.num_kv_heads != g.num_heads,
        )
        attn = attn.transpose(1, 2).reshape(n, q, g.num_heads * g.head_dim)
        x = x + self._linear("self_attn.o_proj", groups, attn)
        h = self._norm("post_attention_layernorm", groups, x)
        gate = self._linear("mlp.gate_proj", groups, h)
        up = self._linear("mlp.up_proj", groups, h)
        return x + self._linear("mlp.down_proj", groups, self.act_fn(gate) * up)

    # -- the primitives the schedulers use ---------------------------------------------------

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings [n, d] of token ids [n]."""
        return self.embed_tokens(token_ids)

    def block(
        self, hidden: torch.Tensor, loops: torch.Tensor, slots: torch.Tensor, token_pos: torch.Tensor
    ) -> torch.Tensor:
        """One call of the shared block: item i ([n, d] states) runs loop ``loops[i]``, i.e. the
        positions loops[i] K + k of the K shared layers k, in one batched layer call per k."""
        K = self.geometry.num_shared
        x = hidden[:, None, :]
        ctx = self._context(x, slots, token_pos[:, None])
        loop_rows = self._loop_rows(loops)
        for k in range(K):
            x = self.layer(x, loops * K + k, [(b * K + k, rows) for b, rows in loop_rows], ctx)
        return x[:, 0, :]

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits [n, vocab] of states [n, d] (final norm and LM head)."""
        return self.lm_head(self.norm(hidden))

    def fill(
        self, hidden: torch.Tensor, loops: torch.Tensor, slots: torch.Tensor, token_pos: torch.Tensor
    ) -> int:
        """Write the KV entries of the loops after ``loops[i]`` that item i skipped (the KV policy).

        ``hidden`` are the exit states. Returns the number of (item, skipped loop) rows filled."""
        g = self.geometry
        K, B = g.num_shared, g.num_loops
        rows = [(i, b) for i, exit_loop in enumerate(loops.tolist()) for b in range(exit_loop + 1, B)]
        if not rows:
            return 0
        items = torch.tensor([i for i, _ in rows], device=self.device)
        skipped = torch.tensor([b for _, b in rows], device=self.device)
        r_slots, r_tpos = slots[items], token_pos[items]
        if self.kv_policy == "copy_kv":
            source_loop = loops[items]
            for k in range(K):
                src, dst = source_loop * K + k, skipped * K + k
                self.k_cache[dst, r_slots, :, r_tpos] = self.k_cache[src, r_slots, :, r_tpos]
                self.v_cache[dst, r_slots, :, r_tpos] = self.v_cache[src, r_slots, :, r_tpos]
            return len(rows)
        x = hidden[items][:, None, :]
        cos, sin = self._rope(x, r_tpos[:, None])
        loop_rows = self._loop_rows(skipped)
        for k in range(K):
            positions = skipped * K + k
            groups = [(b * K + k, rows) for b, rows in loop_rows]
            h = self._norm("input_layernorm", groups, x)
            key, value = self._kv(groups, h, cos, sin)
            self.k_cache[positions, r_slots, :, r_tpos] = key[:, :, 0]
            self.v_cache[positions, r_slots, :, r_tpos] = value[:, :, 0]
        return len(rows)

    def prefill(self, token_ids: torch.Tensor, slot: int) -> torch.Tensor:
        """Run a prompt ([P] ids) through every position into cache slot ``slot``; last logits [vocab]."""
        P = token_ids.shape[0]
        if P > self.max_len:
            raise EngineError(f"prompt of {P} tokens exceeds the cache length {self.max_len}")
        x = self.embed(token_ids)[None]
        slots = torch.tensor([slot], device=self.device)
        ctx = self._context(x, slots, torch.arange(P, device=self.device)[None])
        for p in range(self.geometry.num_layers):
            x = self.layer(x, torch.tensor([p], device=self.device), [(p, None)], ctx)
        return self.head(x[0, -1:])[0]


__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "EngineError",
    "Geometry",
    "model_geometry",
    "relaxed_delta",
    "DepthBatchedModel",
]
