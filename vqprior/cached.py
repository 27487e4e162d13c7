"""The exact cached evaluation of a PixelSNAIL, one raster position at a time (docs/design.md section 7).

``CachedSampler`` evaluates every layer at the new position only: each conv layer keeps its (channels-last,
zero-padded) input map filled up to the current position and contracts the small causal window with its weight in
one matmul; each attention step keeps the keys and values of the positions filled so far. The samplers
(``vqprior.sampling``) and the lossless coder (``vqprior.compress``) drive it; tests check it against full forward
passes at every position.

Two ways to run a step, the same arithmetic up to the attention's reduction length:

* dynamic (the default; fastest in eager mode): Python-integer slices of the maps, attention over the p positions
  filled so far, so the shapes change from one position to the next;
* static (``static=True``; what ``compile()`` needs): every map is read and written through index tensors taken from
  per-position tables, the position is a device tensor, and attention runs over all L positions under a mask. Every
  step then has the same shapes, so ``torch.compile`` builds one graph for all positions (and CUDA graphs can
  replay it: ``mode="reduce-overhead"``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .activation import elu
from .attention import background
from .distributions import uint8_to_unit
from .layers import GatedResBlock, WNConv2d


def _conv_matrix(conv: WNConv2d) -> torch.Tensor:
    """A conv's weight-normed weight as a (kh*kw*in, out) matrix, rows in channels-last window order (kh, kw, in)."""
    w = conv.weight().detach()
    return w.permute(2, 3, 1, 0).reshape(-1, w.shape[0]).contiguous()


def _fill_prefix(buffer: torch.Tensor, top: int, left: int, fmap: torch.Tensor, start: int) -> None:
    """Copy the positions < start of a (B, C, H, W) map into a channels-last buffer padded by ``top``/``left``."""
    W = fmap.shape[3]
    rows, cols = divmod(start, W)
    src = fmap.permute(0, 2, 3, 1)
    buffer[:, top:top + rows, left:left + W] = src[:, :rows]
    if cols:
        buffer[:, top + rows, left:left + cols] = src[:, rows, :cols]


def _at(table: torch.Tensor, p: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``table`` at the position held by the 0-d device tensor ``p`` along ``dim`` (that dimension dropped). Not
    ``table[p]``: torch.compile in torch 2.13 (not 2.14) reads a 0-d index as an int and guards on ``p.item()``,
    which recompiled the static step at every position (docs/gpu.md, "Torch versions")."""
    return table.index_select(dim, p.view(1)).squeeze(dim)


class _NinGated:
    """A 1x1 GatedResBlock at one position: (B, D) -> (B, D); ``aux`` (B, A) enters conv1 through its 1x1 conv."""

    def __init__(self, block: GatedResBlock):
        self.w1, self.b1 = _conv_matrix(block.conv1), block.conv1.bias.detach()
        if block.aux is not None:  # elu(x) W1 + elu(aux) Waux as one matmul over [x, aux]
            self.w1 = torch.cat([self.w1, _conv_matrix(block.aux)], 0)
            self.b1 = self.b1 + block.aux.bias.detach()
        self.w2, self.b2 = _conv_matrix(block.conv2), block.conv2.bias.detach()

    def __call__(self, x, aux=None, bias2=None):
        h = torch.addmm(self.b1, elu(x if aux is None else torch.cat([x, aux], 1)), self.w1)
        return x + F.glu(torch.addmm(self.b2 if bias2 is None else bias2, elu(h), self.w2), 1)  # a * sigmoid(b)


class _DownRightGated:
    """A k x k down-right GatedResBlock at one position, keeping the two maps its convs read (elu already applied)."""

    def __init__(self, block: GatedResBlock, batch: int, height: int, width: int):
        self.k = k = block.conv1.k
        self.w1, self.b1 = _conv_matrix(block.conv1.conv), block.conv1.conv.bias.detach()
        self.w2 = _conv_matrix(block.conv2.conv)  # conv2's bias is part of the per-step conditioned bias
        shape = (batch, height + k - 1, width + k - 1, self.w1.shape[1])  # zero rows on top, zero columns left
        # Allocated flat (B, rows * columns, C) for the static path's index_select / index_copy_; viewed 4-D.
        self.in_flat = self.w1.new_zeros(batch, shape[1] * shape[2], shape[3])  # elu(x): conv1's input
        self.mid_flat = self.w1.new_zeros(batch, shape[1] * shape[2], shape[3])  # elu(conv1 output): conv2's input
        self.in_map, self.mid_map = self.in_flat.view(shape), self.mid_flat.view(shape)  # (dropout is off in eval)

    def __call__(self, x, r: int, c: int, bias2):
        k, B = self.k, x.shape[0]
        self.in_map[:, r + k - 1, c + k - 1] = elu(x)
        h = torch.addmm(self.b1, self.in_map[:, r:r + k, c:c + k].reshape(B, -1), self.w1)
        self.mid_map[:, r + k - 1, c + k - 1] = elu(h)
        return x + F.glu(torch.addmm(bias2, self.mid_map[:, r:r + k, c:c + k].reshape(B, -1), self.w2), 1)

    def static(self, x, window: torch.Tensor, write: torch.Tensor, bias2):
        """The same at the position whose k*k window and own cell in the flat maps are ``window`` (k*k,) and
        ``write`` (1,) (index tensors): the window rows come out in the (kh, kw, channel) order of the matrices."""
        B = x.shape[0]
        self.in_flat.index_copy_(1, write, elu(x).unsqueeze(1).to(self.in_flat.dtype))
        h = torch.addmm(self.b1, self.in_flat.index_select(1, window).reshape(B, -1), self.w1)
        self.mid_flat.index_copy_(1, write, elu(h).unsqueeze(1).to(self.mid_flat.dtype))
        return x + F.glu(torch.addmm(bias2, self.mid_flat.index_select(1, window).reshape(B, -1), self.w2), 1)


class _Attention:
    """Causal self-attention at one position over cached keys/values of the earlier positions."""

    def __init__(self, attn, batch: int, length: int, bg_rows: torch.Tensor):
        self.heads, self.key_channels = n, dk = attn.heads, attn.key_channels
        self.q_block, self.kv_block = _NinGated(attn.q_block), _NinGated(attn.kv_block)
        scale = 1.0 / math.sqrt(dk // n)  # SDPA's default: 1 / sqrt(per-head key size); folded into the query
        self.q_w, self.q_b = _conv_matrix(attn.q_proj) * scale, attn.q_proj.bias.detach() * scale
        self.kv_w, self.kv_b = _conv_matrix(attn.kv_proj), attn.kv_proj.bias.detach()
        like = self.kv_w
        self.keys_t = like.new_zeros(batch, n, dk // n, length)  # transposed: ready for q @ k^T
        self.values = like.new_zeros(batch, n, length, attn.value_channels // n)
        self.zero = like.new_zeros(batch, attn.value_channels)  # position 0 attends to nothing
        self.bg = bg_rows.unsqueeze(1).expand(length, batch, 2)  # (L, B, 2)
        self.block_out = None  # block output at the current position, waiting for that position's raw input
        self.block_out_buffer = like.new_zeros(batch, attn.q_proj.in_channels - 2)  # static path (q_in = filters + 2)
        self.before = torch.arange(length, device=like.device)  # static path: key j is visible at p when j < p

    def attend(self, h, p: int):
        self.block_out = h
        if p == 0:
            return self.zero
        B = h.shape[0]
        q = torch.addmm(self.q_b, self.q_block(torch.cat([h, self.bg[p]], 1)), self.q_w)
        scores = torch.matmul(q.view(B, self.heads, 1, -1), self.keys_t[..., :p])  # (B, n, 1, p)
        out = torch.matmul(torch.softmax(scores, -1), self.values[:, :, :p])  # (B, n, 1, value / n)
        return out.reshape(B, -1)

    def attend_static(self, h, p: torch.Tensor):
        """``attend`` at the position held by the 0-d tensor ``p``, over all L cached keys with those at positions
        >= p masked: the same shapes at every position. exp(-inf) = 0, so the masked keys add exact zeros."""
        self.block_out_buffer.copy_(h)
        B = h.shape[0]
        q = torch.addmm(self.q_b, self.q_block(torch.cat([h, _at(self.bg, p)], 1)), self.q_w)
        scores = torch.matmul(q.view(B, self.heads, 1, -1), self.keys_t)  # (B, n, 1, L)
        scores = scores.masked_fill(self.before >= p, float("-inf"))
        out = torch.matmul(torch.softmax(scores, -1), self.values).reshape(B, -1)  # (B, value)
        return torch.where(p > 0, out, self.zero)  # position 0 (an all-masked row, NaN above) attends to nothing

    def append_static(self, raw, p: torch.Tensor):
        """``append`` at the position held by the 0-d tensor ``p``."""
        B = raw.shape[0]
        kv = torch.addmm(self.kv_b, self.kv_block(torch.cat([raw, self.block_out_buffer, _at(self.bg, p)], 1)),
                         self.kv_w)
        at = p.view(1)
        self.keys_t.index_copy_(3, at, kv[:, :self.key_channels].reshape(B, self.heads, -1, 1).to(self.keys_t.dtype))
        self.values.index_copy_(2, at, kv[:, self.key_channels:].reshape(B, self.heads, 1, -1).to(self.values.dtype))

    def append(self, raw, p: int):
        B = raw.shape[0]
        kv = torch.addmm(self.kv_b, self.kv_block(torch.cat([raw, self.block_out, self.bg[p]], 1)), self.kv_w)
        self.keys_t[..., p] = kv[:, :self.key_channels].view(B, self.heads, -1)
        self.values[:, :, p] = kv[:, self.key_channels:].view(B, self.heads, -1)

    def fill(self, kv_map, start: int):
        """Keys/values of positions < start from kv_proj's (B, key + value, H, W) output."""
        B = kv_map.shape[0]
        kv = kv_map.flatten(2)[:, :, :start]
        self.keys_t[..., :start] = kv[:, :self.key_channels].reshape(B, self.heads, -1, start)
        self.values[:, :, :start] = kv[:, self.key_channels:].reshape(B, self.heads, -1, start).transpose(2, 3)


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
            raise ValueError("cached sampling needs the model in eval mode (call model.eval())")
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
            res = [_DownRightGated(g, B, H, W) for g in blk.res]
            gated += list(blk.res)
            attn = out = None
            if blk.attn is not None:
                attn, out = _Attention(blk.attn, B, H * W, bg_rows), _NinGated(blk.out)
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
                    raise ValueError("this model is class-conditional: a label is required")
                bias = bias + g.class_embedding.weight.detach()[label]
            static.append(bias)
        static = torch.stack(static, 1)
        self.cond_rows = None
        if model.condition is not None:
            if condition is None:
                raise ValueError("this model is conditioned on a code map: condition codes are required")
            feats = model.condition_features(condition, (H, W))  # (B, cond_channels, H, W)
            self.cond_rows = feats.flatten(2).transpose(1, 2).contiguous()  # (B, L, cond_channels)
            self.cond_w = torch.cat([_conv_matrix(g.cond) for g in gated], 1)  # (cond_channels, G * 2F)
            self.static_bias = static.reshape(B, -1)
        else:
            self.bias_views = static.unbind(1)
        self.num_gated = len(gated)
        self.head_w, self.head_b = _conv_matrix(model.head.out), model.head.out.bias.detach()

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
        ``mode="reduce-overhead"`` for CUDA graphs; the maps that steps write are marked as static addresses so
        that the graphs can update them in place."""
        if not self.static:
            raise ValueError("compile() needs a CachedSampler built with static=True")
        if self.inputs.device.type == "cuda":
            for t in self._state():
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

    def _state(self) -> list[torch.Tensor]:
        """Every tensor a step writes."""
        out = [self.inputs]
        for res_blocks, attn, _ in self.blocks:
            out += [t for res in res_blocks for t in (res.in_flat, res.mid_flat)]
            if attn is not None:
                out += [attn.keys_t, attn.values, attn.block_out_buffer]
        return out

    def _biases(self, p):
        """An iterator over each gated block's (B, 2F) conv2 bias at position p (an int or a 0-d tensor)."""
        if self.cond_rows is None:
            return iter(self.bias_views)
        rows = self.cond_rows[:, p] if isinstance(p, int) else _at(self.cond_rows, p, 1)
        return iter(torch.addmm(self.static_bias, rows, self.cond_w).view(self.batch, self.num_gated, -1).unbind(1))

    def _step_static(self, p: torch.Tensor) -> torch.Tensor:
        """The step at the position held by the 0-d device tensor ``p``: no Python value depends on p."""
        B = self.batch
        stem_in = self.inputs_flat.index_select(1, _at(self.stem_window, p)).reshape(B, -1)
        h = torch.addmm(_at(self.stem_bias_rows, p), stem_in, self.stem_w)
        biases = self._biases(p)
        at = {k: (_at(window, p), _at(write, p)) for k, (window, write) in self.windows.items()}
        for res_blocks, attn, out in self.blocks:
            for res in res_blocks:
                h = res.static(h, *at[res.k], next(biases))
            if attn is not None:
                h = out(h, attn.attend_static(h, p), next(biases))
        return torch.addmm(self.head_b, elu(h), self.head_w)

    def _append_static(self, p: torch.Tensor, raw: torch.Tensor) -> None:
        """Write the raw input ``raw`` (B, Cr) at the position held by the 0-d device tensor ``p``."""
        row = torch.cat([raw.to(self.inputs.dtype), self.ones], 1).unsqueeze(1)  # the raw input and its one
        self.inputs_flat.index_copy_(1, _at(self.stem_write, p), row)
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
        with torch.autocast(h.device.type, enabled=False):  # the head projects in float32, as vqprior.heads does
            return torch.addmm(self.head_b, elu(h).to(self.head_w.dtype), self.head_w)

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
            _fill_prefix(self.inputs[..., :self.raw_channels], 1, 1, raw, start)
            for (res_blocks, attn, _), blk in zip(self.blocks, model.blocks):
                for cached, g in zip(res_blocks, blk.res):
                    _fill_prefix(cached.in_map, cached.k - 1, cached.k - 1, captured[g.conv1], start)
                    _fill_prefix(cached.mid_map, cached.k - 1, cached.k - 1, captured[g.conv2], start)
                if attn is not None:
                    attn.fill(captured[blk.attn.kv_proj], start)
        self.position = start


# ---- the sampling loop ----------------------------------------------------------------------------------------------


__all__ = ["CachedSampler"]
