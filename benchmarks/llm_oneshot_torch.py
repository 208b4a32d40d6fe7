"""The authors' SparseGPT (IST-DASLab/sparsegpt) on the weights of ``llm_oneshot.py``.

A PyTorch copy of ``llm_oneshot``'s decoder laid out as the authors'
``llama.llama_sequential`` expects (``model.model.layers[i].self_attn.q_proj``,
``mlp.gate_proj``, ``model.config.hidden_size``, ``model.seqlen``, ...), converters
to and from the JAX params dict, and :func:`run_authors`, which runs their loop::

    model = from_jax(params, cfg)                                    # on the CPU
    res = run_authors(model, batches, "/path/to/sparsegpt", "cuda:0")
    err = llm_oneshot.output_error(params, to_jax(model, params), held_out)

Their code is never part of this project: it is imported from the directory
given at run time and runs unchanged. Around it: their ``sparsegpt.py`` imports
``transformers`` only for ``isinstance(layer, transformers.Conv1D)``, so without
``transformers`` a stand-in module whose ``Conv1D`` no layer is an instance of
serves the import (and is removed after it); without CUDA, the
``torch.cuda.synchronize()`` that ``fasterprune`` always calls is a no-op while
their loop runs; their per-layer prints go to stderr.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math
import os
import sys
import time
import types
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from unittest import mock

import jax
import numpy as np
import torch
from torch import nn

# JAX block leaf -> the module of one torch decoder layer whose ``weight`` holds it.
BLOCK_MODULES = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
BLOCK_MODULES |= {k: f"self_attn.{k}_proj" for k in "qkvo"}
BLOCK_MODULES |= {k: f"mlp.{k}_proj" for k in ("gate", "up", "down")}
# Every attribute of ``args`` that ``llama_sequential`` reads: true-sequential 2:4, every layer.
AUTHORS_ARGS = dict(true_sequential=True, minlayer=0, maxlayer=1 << 30, prune_only="", invert=False)
AUTHORS_ARGS |= dict(wbits=16, sparsity=0.0, prunen=2, prunem=4, percdamp=0.01, blocksize=128)
_AUTHORS_FILES = ("llama.py", "sparsegpt.py", "modelutils.py", "quant.py")


class RMSNorm(nn.Module):
  """``llm_oneshot.rms_norm``: float32 statistics and scale, result in the input dtype."""

  def __init__(self, dim: int, eps: float = 1e-6, **kw):
    super().__init__()
    self.weight = nn.Parameter(torch.ones(dim, **kw), requires_grad=False)
    self.eps = eps

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(torch.mean(xf * xf, dim=-1, keepdim=True) + self.eps)
    return (xf * self.weight.float()).to(x.dtype)


def rope(x: torch.Tensor, theta: float = 10_000.0) -> torch.Tensor:
  """Rotate-half RoPE on ``x (B, T, N, Dh)``, computed in float32, returned in ``x.dtype``."""
  t, half = x.shape[1], x.shape[-1] // 2
  inv = theta ** (-torch.arange(half, dtype=torch.float32, device=x.device) / half)
  ang = torch.arange(t, dtype=torch.float32, device=x.device)[:, None] * inv[None, :]
  sin, cos = torch.sin(ang)[None, :, None, :], torch.cos(ang)[None, :, None, :]
  x1, x2 = x[..., :half].float(), x[..., half:].float()
  return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)


def _linears(kw: dict, **shapes: tuple[int, int]) -> nn.Module:
  """A container of bias-free ``nn.Linear(in, out)``, one per ``name=(in, out)``."""
  mod = nn.Module()
  for name, (i, o) in shapes.items():
    setattr(mod, name, nn.Linear(i, o, bias=False, **kw))
  return mod


class DecoderLayer(nn.Module):
  """``llm_oneshot.block``: causal GQA/MHA attention (scores, softmax in float32), SiLU MLP."""

  def __init__(self, dim: int, hidden: int, heads: int, kv_heads: int, **kw):
    super().__init__()
    hd = dim // heads
    self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hd
    q, kv = heads * hd, kv_heads * hd
    self.self_attn = _linears(
      kw, q_proj=(dim, q), k_proj=(dim, kv), v_proj=(dim, kv), o_proj=(q, dim)
    )
    self.mlp = _linears(kw, gate_proj=(dim, hidden), up_proj=(dim, hidden), down_proj=(hidden, dim))
    self.input_layernorm = RMSNorm(dim, **kw)
    self.post_attention_layernorm = RMSNorm(dim, **kw)

  def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
    """``x (B, T, dim)`` -> ``(x', )``, ``x'`` of the same shape and dtype; a given
    ``attention_mask`` is added to the (already causal) scores."""
    (b, t, _), n, kvn, hd = x.shape, self.heads, self.kv_heads, self.head_dim
    attn, mlp = self.self_attn, self.mlp
    h = self.input_layernorm(x)
    q = rope(attn.q_proj(h).view(b, t, n, hd))
    k = rope(attn.k_proj(h).view(b, t, kvn, hd)).repeat_interleave(n // kvn, dim=2)  # jnp.repeat
    v = attn.v_proj(h).view(b, t, kvn, hd).repeat_interleave(n // kvn, dim=2)
    s = torch.einsum("bqnh,bknh->bnqk", q, k).float() / math.sqrt(hd)
    s = torch.where(torch.ones(t, t, dtype=torch.bool, device=x.device).tril(), s, -1e30)
    if attention_mask is not None:
      s = s + attention_mask.float()
    a = torch.einsum("bnqk,bknh->bqnh", torch.softmax(s, -1).to(v.dtype), v)
    x = x + attn.o_proj(a.reshape(b, t, n * hd))
    h = self.post_attention_layernorm(x)
    g = mlp.gate_proj(h)  # jax.nn.silu as XLA expands it: 1 / (1 + exp(-g)), each op rounded
    return (x + mlp.down_proj(g * (1 / (1 + torch.exp(-g))) * mlp.up_proj(h)),)


class Decoder(nn.Module):
  """Embedding, the decoder layers, the final RMSNorm (``model.model`` in their code)."""

  def __init__(self, layers, dim, hidden, heads, kv_heads, vocab, **kw):
    super().__init__()
    self.embed_tokens = nn.Embedding(vocab, dim, **kw)  # first parameter: their dtype
    self.layers = nn.ModuleList(
      DecoderLayer(dim, hidden, heads, kv_heads, **kw) for _ in range(layers)
    )
    self.norm = RMSNorm(dim, **kw)

  def forward(self, tokens: torch.Tensor) -> torch.Tensor:
    x = self.embed_tokens(tokens)
    for layer in self.layers:  # looked up per call: their Catcher replaces layers[0]
      x = layer(x, attention_mask=None)[0]
    return self.norm(x)


class CausalLM(nn.Module):
  """``llm_oneshot.hidden_states``: int tokens ``(B, T)`` -> ``(B, T, dim)`` in the params dtype."""

  def __init__(self, layers, dim, hidden, heads, kv_heads, vocab, seq, **kw):
    super().__init__()
    self.model = Decoder(layers, dim, hidden, heads, kv_heads, vocab, **kw)
    self.config = types.SimpleNamespace(use_cache=False, hidden_size=dim)
    self.seqlen = seq

  def forward(self, tokens: torch.Tensor) -> torch.Tensor:
    return self.model(tokens)


def _host(leaf: Any, dtype: Any = None) -> np.ndarray:
  return np.asarray(jax.device_get(leaf), dtype)


def _fill(param: torch.Tensor, w: np.ndarray) -> None:
  """Copies JAX-layout ``w`` (one layer's slice) into ``param``; 2-D: nn.Linear's ``(out, in)``."""
  if param.ndim == 2:
    w = w.reshape(param.shape[1], param.shape[0]).T
  param.data.copy_(torch.from_numpy(np.ascontiguousarray(w).reshape(param.shape)))


def from_jax(
  params: Mapping[str, Any], cfg: Mapping[str, int], dtype: torch.dtype | None = None
) -> CausalLM:
  """The torch model (on the CPU) holding ``params`` (``llm_oneshot.init_params``' tree).

  ``cfg``: ``llm_oneshot``'s config (``PRESETS[...]``, optionally with ``kv_heads``);
  ``seq`` sets ``model.seqlen``, the other keys, when present, must agree with the
  shapes of ``params`` (which decide them). ``dtype``: default, that of ``params``
  (bf16 in ``llm_oneshot``). Converts one layer of one leaf at a time through
  float32 (exact for bf16), into storage allocated once.
  """
  b = params["blocks"]
  layers, dim, heads, _ = b["q"].shape
  shape = dict(layers=layers, dim=dim, hidden=b["gate"].shape[-1], heads=heads)
  shape |= dict(kv_heads=b["k"].shape[2], vocab=params["embed"].shape[0])
  bad = {k: (cfg[k], v) for k, v in shape.items() if k in cfg and cfg[k] != v}
  if bad:
    raise ValueError(f"cfg disagrees with the params' shapes (cfg, params): {bad}")
  dtype = dtype or getattr(torch, str(b["q"].dtype))  # bfloat16, float32, ...
  with torch.device("meta"):
    model = CausalLM(**shape, seq=cfg.get("seq", 2048), dtype=dtype)
  model = model.to_empty(device="cpu").requires_grad_(False).eval()
  dec = model.model
  dec.embed_tokens.weight.data.copy_(torch.from_numpy(_host(params["embed"], np.float32)))
  dec.norm.weight.data.copy_(torch.from_numpy(_host(params["final_norm"], np.float32)))
  for key, name in BLOCK_MODULES.items():
    host = _host(b[key])  # one stacked leaf, in its own dtype
    for i, layer in enumerate(dec.layers):
      _fill(layer.get_parameter(f"{name}.weight"), host[i].astype(np.float32))
    del host
  return model


def _to_leaf(t: torch.Tensor, like: Any, linear: bool = True) -> np.ndarray:
  """``t`` in the layout (undoing nn.Linear's ``(out, in)``) and dtype of the array ``like``."""
  w = t.detach().to("cpu", torch.float32).numpy()
  return (w.T if linear and w.ndim == 2 else w).reshape(like.shape).astype(like.dtype)


def _put(host: np.ndarray, like: Any) -> Any:
  return jax.device_put(host, like.sharding) if isinstance(like, jax.Array) else host


def to_jax(model: CausalLM, params: Mapping[str, Any]) -> dict[str, Any]:
  """A copy of ``params`` (same tree, shapes, dtypes, shardings) holding ``model``'s weights."""
  dec = model.model
  out = dict(params)
  out["embed"] = _put(_to_leaf(dec.embed_tokens.weight, params["embed"], False), params["embed"])
  out["final_norm"] = _put(_to_leaf(dec.norm.weight, params["final_norm"]), params["final_norm"])
  blocks = {}
  for key, like in params["blocks"].items():
    host = np.empty(like.shape, like.dtype)
    for i, layer in enumerate(dec.layers):
      host[i] = _to_leaf(layer.get_parameter(f"{BLOCK_MODULES[key]}.weight"), host[i])
    blocks[key] = _put(host, like)
  out["blocks"] = blocks
  return out


def _import_llama(sparsegpt_dir: str) -> types.ModuleType:
  """Their ``llama`` module, imported from ``sparsegpt_dir`` (with its ``sparsegpt`` etc.)."""
  d = os.path.abspath(sparsegpt_dir)
  missing = [f for f in _AUTHORS_FILES if not os.path.isfile(os.path.join(d, f))]
  if missing:
    raise FileNotFoundError(
      f"{d} is not a checkout of IST-DASLab/sparsegpt: no {', '.join(missing)} there."
    )
  stub = None
  if "transformers" not in sys.modules and importlib.util.find_spec("transformers") is None:
    stub = types.ModuleType("transformers", "Stand-in: only `transformers.Conv1D` is read.")
    stub.Conv1D = type("Conv1D", (), {})  # no layer here is one
    sys.modules["transformers"] = stub
  sys.path.insert(0, d)
  try:
    return importlib.import_module("llama")
  finally:
    sys.path.remove(d)
    if stub is not None and sys.modules.get("transformers") is stub:
      del sys.modules["transformers"]


def run_authors(
  model: CausalLM, token_batches: Sequence[Any], sparsegpt_dir: str, device: Any, **args: Any
) -> dict[str, Any]:
  """Prunes ``model`` in place with their ``llama_sequential`` (true-sequential 2:4).

  ``token_batches``: ``(B, T)`` int arrays (JAX or numpy); each sequence is one
  calibration sample, ``(tokens (1, T),)`` as their loader gives. ``device``:
  where their loop runs each layer (``"cuda:0"``, ``"cpu"``); the model stays on
  the CPU between layers. ``args``: overrides of :data:`AUTHORS_ARGS` (their
  ``args``: ``percdamp``, ``blocksize``, ``prunen``, ``prunem``, ...).

  Returns ``{"wall_s", "peak_bytes" (torch's CUDA max allocated, else None),
  "nsamples"}``. With JAX on the same GPU in this process, start it with
  ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` (else it holds 75% of the GPU).
  """
  llama = _import_llama(sparsegpt_dir)
  xs = [torch.from_numpy(np.asarray(b, np.int64)) for b in token_batches]
  loader = [(x[i, None],) for x in xs for i in range(len(x))]
  lengths = {x.shape[1] for x in xs}
  if len(lengths) != 1:
    raise ValueError(f"calibration sequences must share one length, got {sorted(lengths)}")
  model.seqlen = lengths.pop()
  llama.args = types.SimpleNamespace(**{**AUTHORS_ARGS, "nsamples": len(loader), **args})
  dev = torch.device(device)
  cuda = dev.type == "cuda"
  model.to("cpu").eval()
  if cuda:
    torch.zeros(1, device=dev)  # the allocator must exist before its statistics are reset
    torch.cuda.reset_peak_memory_stats(dev)
    torch.cuda.synchronize(dev)
  # fasterprune calls torch.cuda.synchronize() unconditionally; it raises without CUDA.
  no_sync = mock.patch.object(torch.cuda, "synchronize", lambda *a, **k: None)
  t0 = time.perf_counter()
  with (
    contextlib.redirect_stdout(sys.stderr),
    contextlib.nullcontext() if torch.cuda.is_available() else no_sync,
  ):
    llama.llama_sequential(model, loader, dev)
  if cuda:
    torch.cuda.synchronize(dev)
  wall = time.perf_counter() - t0
  peak = int(torch.cuda.max_memory_allocated(dev)) if cuda else None
  return {"wall_s": wall, "peak_bytes": peak, "nsamples": len(loader)}
