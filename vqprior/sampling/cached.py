"""The exact cached evaluation of a PixelSNAIL, one raster position at a time (docs/design.md section 7).

``CachedSampler`` evaluates every layer at the new position only: each conv layer keeps its (channels-last,
zero-padded) input map filled up to the current position and contracts the small causal window with its weight in
one matmul; each attention step keeps the keys and values of the positions filled so far. The samplers
(``vqprior.sampling.sampler``) and the lossless coder (``vqprior.compress``) drive it; tests check it against full
forward passes at every position. The per-layer state lives in ``vqprior.sampling.cached_layers``.

Two ways to run a step, the same arithmetic up to the attention's reduction length:

* dynamic (the default; fastest in eager mode): Python-integer slices of the maps, attention over the p positions
  filled so far, so the shapes change from one position to the next;
* static (``static=True``; what ``compile()`` needs): every map is read and written through index tensors taken from
  per-position tables, the position is a device tensor, and attention runs over all L positions under a mask. Every
  step then has the same shapes, so ``torch.compile`` builds one graph for all positions (and CUDA graphs can
  replay it: ``mode="reduce-overhead"``).
"""
from __future__ import annotations

import torch

from vqprior.errors import InputError
from vqprior.models.activation import elu
from vqprior.models.attention import background
from vqprior.models.distributions import uint8_to_unit
from vqprior.sampling.cached_layers import (
    AttentionStep,
    DownRightGatedStep,
    NinGatedStep,
    at_position,
    conv_matrix,
    fill_prefix,
)


class CachedSampler:
    """Exact incremental evaluation of a PixelSNAIL, one raster position at a time, for a batch of B samples.

    Use: ``params = s.step(p)`` (the (B, P) head parameters at position p given every value appended so far), then
    ``s.append(p, value)`` with the value sampled at p (pixels: uint8 (B, C); codes: int64 (B,)); p = 0, 1, ... in
    order, or from ``start`` after ``prefill(prefix, start)``. The model must be in eval mode; everything that does
    not depend on the sampled values (weight-normed weights, background, class biases, condition features) is
    computed here, once.

    ``static=True`` runs every step with the same shapes (see the module docstring); ``compile()`` then compiles the
    step and the append once each, for all positions. Both ways give the same parameters to float rounding (the
    attention's sums run over p or over L terms); a test checks that and that the samples agree.
    """

    def __init__(self, model, batch_size: int, label: torch.Tensor | None = None,
                 condition: torch.Tensor | None = None, height: int | None = None, width: int | None = None,
                 static: bool = False):
        if model.training:
            raise InputError("cached sampling needs the model in eval mode (call model.eval())")
        c = model.config
        self.model, self.batch, self.static = model, batch_size, static
        self.height, self.width = height or c.height, width or c.width
        self.label, self.condition = label, condition
        self.position, self._stepped = 0, -1
        # Compiled step and append, or None for the plain methods. Not bound methods stored on self: that is a
        # reference cycle, which kept every finished sampler's buffers alive until Python's cyclic collector
        # ran (peak memory grew by one sampler per sample() call: 4 calls, 4x). compile() does wrap bound
        # methods; close() drops them again (sample() does).
        self._step_at = self._append_at = None
        self.compiled = False
        with torch.no_grad():
            self._build(model, batch_size, self.height, self.width, label, condition)
            if static:
                self._build_tables()

    def _build(self, model, B, H, W, label, condition):
        stem = model.stem
        w_down, w_right = stem.down.conv.weight(), stem.down_right.weight()  # (F, Cs, 1, 3), (F, Cs, 2, 1)
        filters, stem_in = w_down.shape[:2]
        # One 2x3 window over rows r-1..r, columns c-1..c+1: the down part reads its top row, the right part its
        # left column; the current and next positions (bottom row, right two columns) get zero weight.
        w = w_down.new_zeros(filters, stem_in, 2, 3)
        w[:, :, 0, :] = w_down[:, :, 0]
        w[:, :, :, 0] += w_right[:, :, :, 0]
        self.stem_w = w.permute(2, 3, 1, 0).reshape(-1, filters).contiguous().detach()
        # The shifts zero a whole row/column, bias included: down part off on row 0, right part off on column 0.
        b_down, b_right = stem.down.conv.bias.detach(), stem.down_right.bias.detach()
        self.stem_bias = [torch.zeros_like(b_down), b_right, b_down, b_down + b_right]  # [2 * (r > 0) + (c > 0)]
        self.raw_channels = stem_in - 1
        self.inputs = w.new_zeros(B, H + 1, W + 2, stem_in)  # concat[raw, ones], one zero row top, columns each side
        self.inputs[:, 1:, 1:W + 1, -1] = 1.0
        dtype, device = w.dtype, w.device
        self.embed_table = model.embedding.weight.detach() if model.embedding is not None else None

        bg_rows = background(H, W, device, dtype)[0].flatten(1).t().contiguous()  # (L, 2)
        self.blocks, self.attns, gated = [], [], []
        for blk in model.blocks:
            res = [DownRightGatedStep(g, B, H, W) for g in blk.res]
            gated += list(blk.res)
            attn = out = None
            if blk.attn is not None:
                attn, out = AttentionStep(blk.attn, B, H * W, bg_rows), NinGatedStep(blk.out)
                self.attns.append(attn)
                gated.append(blk.out)
            self.blocks.append((res, attn, out))

        # Per conditioned gated block: conv2 bias + class bias, (B, G, 2F); a code-map condition adds a 1x1 conv of
        # the condition features at the current position, all blocks in one matmul per step.
        static = []
        for g in gated:
            conv2 = g.conv2.conv if g.kind == "down_right" else g.conv2
            bias = conv2.bias.detach().expand(B, -1)
            if g.class_embedding is not None:
                if label is None:
                    raise InputError("this model is class-conditional: a label is required")
                bias = bias + g.class_embedding.weight.detach()[label]
            static.append(bias)
        static = torch.stack(static, 1)
        self.cond_rows = None
        if model.condition is not None:
            if condition is None:
                raise InputError("this model is conditioned on a code map: condition codes are required")
            feats = model.condition_features(condition, (H, W))  # (B, cond_channels, H, W)
            self.cond_rows = feats.flatten(2).transpose(1, 2).contiguous()  # (B, L, cond_channels)
            self.cond_w = torch.cat([conv_matrix(g.cond) for g in gated], 1)  # (cond_channels, G * 2F)
            self.static_bias = static.reshape(B, -1)
        else:
            self.bias_views = static.unbind(1)
        self.num_gated = len(gated)
        self.head_w, self.head_b = conv_matrix(model.head.out), model.head.out.bias.detach()

    def _build_tables(self):
        """Per-position index tables of the static path: the position as a device tensor, the stem's 2x3 window
        and own cell in the flat input map, each kernel size's k*k window and own cell in the flat block maps,
        and the stem bias of each position."""
        H, W, device = self.height, self.width, self.inputs.device
        r = torch.arange(H, device=device).repeat_interleave(W)  # (L,) row of each position
        c = torch.arange(W, device=device).repeat(H)

        def windows(rows, cols, width):  # (L, rows * cols): row-major window starting at (r, c) in a padded map
            i, j = torch.arange(rows, device=device), torch.arange(cols, device=device)
            return ((r[:, None, None] + i[:, None]) * width + c[:, None, None] + j).flatten(1)

        self.positions = torch.arange(H * W, device=device)
        self.inputs_flat = self.inputs.view(self.batch, -1, self.inputs.shape[-1])
        self.stem_window, self.stem_write = windows(2, 3, W + 2), ((r + 1) * (W + 2) + c + 1)[:, None]
        self.stem_bias_rows = torch.stack(self.stem_bias)[2 * (r > 0).long() + (c > 0).long()]  # (L, F)
        self.windows = {}  # kernel size -> ((L, k*k) window, (L, 1) own cell)
        for res_blocks, _, _ in self.blocks:
            for res in res_blocks:
                k = res.k
                self.windows[k] = (windows(k, k, W + k - 1), ((r + k - 1) * (W + k - 1) + c + k - 1)[:, None])
        self.ones = self.inputs.new_ones(self.batch, 1)

    def compile(self, **options) -> "CachedSampler":
        """Compile the static step and append with ``torch.compile(fullgraph=True, dynamic=False, **options)``:
        one graph each for every position (a batch of another size compiles once more). On CUDA pass
        ``mode="reduce-overhead"`` for CUDA graphs. Every tensor the two read or write (``_graph_tensors``) is
        marked as a static address: CUDA graphs then read the weights and tables and update the maps in place,
        where they would otherwise copy each unmarked input into a buffer of their own at every replay (the
        weights are plain tensors here, not module parameters, which torch.compile would treat as static)."""
        if not self.static:
            raise ValueError("compile() needs a CachedSampler built with static=True")
        for t in self._graph_tensors():
            torch._dynamo.mark_static_address(t, guard=False)
        settings = dict(fullgraph=True, dynamic=False, **options)
        self._step_at = torch.compile(self._step_static, **settings)
        self._append_at = torch.compile(self._append_static, **settings)
        self.compiled = True
        return self

    def close(self) -> None:
        """Drop the compiled step and append. They wrap this sampler's bound methods, a reference cycle that would
        keep its buffers until Python's cycle collector runs; an eager sampler has none and needs no close()."""
        self._step_at = self._append_at = None
        self.compiled = False

    def _graph_tensors(self) -> list[torch.Tensor]:
        """Every tensor the static step and append can read or write, each once: the maps and key/value caches
        they write (``inputs_flat`` included: the view they write through, not only its base), the weights, biases
        and per-position tables of this sampler and of its layers' steps."""
        found: dict[int, torch.Tensor] = {}

        def visit(value):
            if isinstance(value, torch.Tensor):
                found.setdefault(id(value), value)
            elif isinstance(value, (list, tuple)):
                for v in value:
                    visit(v)
            elif isinstance(value, dict):
                for v in value.values():
                    visit(v)
            elif isinstance(value, (NinGatedStep, DownRightGatedStep, AttentionStep)):
                visit(vars(value))

        visit([v for k, v in vars(self).items() if k not in ("model", "label", "condition")])
        return list(found.values())

    def _biases(self, p):
        """An iterator over each gated block's (B, 2F) conv2 bias at position p (an int or a 0-d tensor)."""
        if self.cond_rows is None:
            return iter(self.bias_views)
        rows = self.cond_rows[:, p] if isinstance(p, int) else at_position(self.cond_rows, p, 1)
        return iter(torch.addmm(self.static_bias, rows, self.cond_w).view(self.batch, self.num_gated, -1).unbind(1))

    def _step_static(self, p: torch.Tensor) -> torch.Tensor:
        """The step at the position held by the 0-d device tensor ``p``: no Python value depends on p."""
        B = self.batch
        stem_in = self.inputs_flat.index_select(1, at_position(self.stem_window, p)).reshape(B, -1)
        h = torch.addmm(at_position(self.stem_bias_rows, p), stem_in, self.stem_w)
        biases = self._biases(p)
        at = {k: (at_position(window, p), at_position(write, p)) for k, (window, write) in self.windows.items()}
        for res_blocks, attn, out in self.blocks:
            for res in res_blocks:
                h = res.static(h, *at[res.k], next(biases))
            if attn is not None:
                h = out(h, attn.attend_static(h, p), next(biases))
        return self._head(h)

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        """The head's last projection, in float32 under any autocast, as vqprior.models.heads projects in training."""
        with torch.autocast(h.device.type, enabled=False):
            return torch.addmm(self.head_b, elu(h).to(self.head_w.dtype), self.head_w)

    def _append_static(self, p: torch.Tensor, raw: torch.Tensor) -> None:
        """Write the raw input ``raw`` (B, Cr) at the position held by the 0-d device tensor ``p``."""
        row = torch.cat([raw.to(self.inputs.dtype), self.ones], 1).unsqueeze(1)  # the raw input and its one
        self.inputs_flat.index_copy_(1, at_position(self.stem_write, p), row)
        for attn in self.attns:
            attn.append_static(raw, p)

    def step(self, p: int) -> torch.Tensor:
        """The (B, P) head parameters at position p (p must be the next position to sample)."""
        if p != self.position:
            raise ValueError(f"step({p}) out of order: the next position is {self.position}")
        if self.static:
            if self.compiled:
                torch.compiler.cudagraph_mark_step_begin()
            params = (self._step_at or self._step_static)(self.positions[p])
            self._stepped = p
            return params
        B = self.batch
        r, c = divmod(p, self.width)
        h = torch.addmm(self.stem_bias[2 * (r > 0) + (c > 0)], self.inputs[:, r:r + 2, c:c + 3].reshape(B, -1),
                        self.stem_w)
        biases = self._biases(p)
        for res_blocks, attn, out in self.blocks:
            for res in res_blocks:
                h = res(h, r, c, next(biases))
            if attn is not None:
                h = out(h, attn.attend(h, p), next(biases))
        self._stepped = p
        return self._head(h)

    def append(self, p: int, value: torch.Tensor) -> None:
        """Record the value sampled at p (pixels uint8 (B, C), codes int64 (B,)) and the keys/values it yields."""
        if p != self.position or self._stepped != p:
            raise ValueError(f"append({p}) must follow step({p}); the next position is {self.position}")
        if self.embed_table is None:
            raw = uint8_to_unit(value, self.inputs.dtype)  # (B, C)
        else:
            raw = self.embed_table[value]  # (B, embed_dim)
        if self.static:
            (self._append_at or self._append_static)(self.positions[p], raw)
        else:
            r, c = divmod(p, self.width)
            self.inputs[:, r + 1, c + 1, :self.raw_channels] = raw
            for attn in self.attns:
                attn.append(raw, p)
        self.position += 1

    def prefill(self, prefix: torch.Tensor, start: int) -> None:
        """Fill every cache with the known positions < start of ``prefix`` (pixels uint8 (B, C, H, W), codes
        (B, H, W)) by one ordinary forward pass; sampling then continues at ``start``."""
        if self.position != 0:
            raise ValueError("prefill must come before the first step")
        if start == 0:
            return
        model, captured, hooks = self.model, {}, []
        keep_input = lambda module, inputs, output: captured.__setitem__(module, inputs[0])  # noqa: E731
        keep_output = lambda module, inputs, output: captured.__setitem__(module, output)  # noqa: E731
        for blk in model.blocks:
            for g in blk.res:  # the down-right convs' inputs are exactly the maps the cached blocks keep
                hooks += [g.conv1.register_forward_hook(keep_input), g.conv2.register_forward_hook(keep_input)]
            if blk.attn is not None:
                hooks.append(blk.attn.kv_proj.register_forward_hook(keep_output))
        try:
            with torch.no_grad():
                raw = model.embed_input(prefix)
                model.forward_raw(raw, self.label, self.condition)
        finally:
            for h in hooks:
                h.remove()
        with torch.no_grad():
            fill_prefix(self.inputs[..., :self.raw_channels], 1, 1, raw, start)
            for (res_blocks, attn, _), blk in zip(self.blocks, model.blocks):
                for cached, g in zip(res_blocks, blk.res):
                    fill_prefix(cached.in_map, cached.k - 1, cached.k - 1, captured[g.conv1], start)
                    fill_prefix(cached.mid_map, cached.k - 1, cached.k - 1, captured[g.conv2], start)
                if attn is not None:
                    attn.fill(captured[blk.attn.kv_proj], start)
        self.position = start


__all__ = ["CachedSampler"]
