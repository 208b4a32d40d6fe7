"""Fuzzing ``jasp check`` with mutated copies of files that jasp itself exported.

Every format the checker reads (ONNX from ``to_onnx``, a SavedModel from
``to_saved_model``, ``save_safetensors``, flax msgpack, orbax with and without
OCDBT) is exported from a small pruned model, then mutated: truncations at many
offsets, bit flips, zeroed and overwritten regions, deleted and duplicated byte
ranges, lies in headers and declared sizes, jasp metadata whose fields change
type, vanish, repeat or swap, graphs that lose nodes or initializers, files that
become FIFOs or links to ``/dev/zero``. Each case runs through
``jasp.export.cli.main`` in-process and must end with exit 0, 1 or 2, with no
traceback, within a per-case time limit; a sample also runs in a child process
under a wall-clock timeout and an address-space limit (``RLIMIT_AS``), where an
abort or a crash would show. Cases whose answer is known (the file lost its
graph, its metadata still names pruned weights) must exit 2.

The seed is fixed (``JASP_FUZZ_SEED`` overrides it) and printed, so a failure
reproduces; the figures (cases per format, outcomes, time) are printed too
(``pytest -s``).
"""

import collections
import contextlib
import copy
import io
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("jax2onnx", reason="ONNX export needs the onnx extra: pip install 'jasp[onnx]'")
pytest.importorskip(
  "tensorflow", reason="SavedModel export needs the tf extra: pip install 'jasp[tf]'"
)
pytest.importorskip("safetensors", reason="needs the safetensors extra")
pytest.importorskip("orbax.checkpoint", reason="needs the checkpoint extra")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import msgpack  # noqa: E402
import onnx  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from flax import serialization  # noqa: E402
from onnx import TensorProto  # noqa: E402
from onnx import helper  # noqa: E402

import jasp  # noqa: E402
from jasp import export  # noqa: E402
from jasp.export import cli  # noqa: E402

SEED = int(os.environ.get("JASP_FUZZ_SEED", "20261130"))
CASE_TIMEOUT_S = 10.0  # in-process, per case
CHILD_TIMEOUT_S = 240  # the child process running the sample
CHILD_MEMORY = 3 << 30  # its RLIMIT_AS
SAMPLE_EVERY = 8  # every 8th case also runs in the child
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = [
  pytest.mark.slow,
  pytest.mark.filterwarnings("ignore:'.value' access is now deprecated"),
  # orbax, on a checkpoint whose metadata it cannot read, drops a coroutine unawaited.
  pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning"),
]


class _Tiny(nn.Module):
  """A conv and a dense layer: both prunable 2:4 (4 input channels, 64 input features)."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3))(x))
    return nn.Dense(8)(x.reshape(x.shape[0], -1))


def _export_all(root: str) -> dict:
  """The pruned tiny model exported to every format; ``{format: path}``."""
  model = _Tiny()
  x = np.asarray(jax.random.normal(jax.random.key(0), (1, 2, 4, 4)), np.float32)
  variables = model.init(jax.random.key(1), x)
  layouts = jasp.trace_layouts(model.apply, variables, x)
  pruned, masks = jasp.prune(variables, layouts=layouts)
  host = jax.tree.map(np.asarray, pruned)
  out = {
    "onnx": os.path.join(root, "m.onnx"),
    "savedmodel": os.path.join(root, "sm"),
    "safetensors": os.path.join(root, "m.safetensors"),
    "msgpack": os.path.join(root, "m.msgpack"),
    "orbax": os.path.join(root, "orbax"),
    "orbax-zarr": os.path.join(root, "orbax_zarr"),
  }
  export.to_onnx(model.apply, pruned, x, path=out["onnx"], masks=masks)
  export.to_saved_model(model.apply, pruned, x, path=out["savedmodel"], masks=masks)
  export.save_safetensors(out["safetensors"], pruned, layouts=layouts, masks=masks, apex_masks=True)
  with open(out["msgpack"], "wb") as f:
    f.write(serialization.msgpack_serialize(host))
  with ocp.PyTreeCheckpointer() as c:
    c.save(out["orbax"], {"params": host["params"]})
  with ocp.PyTreeCheckpointer(use_ocdbt=False) as c:
    c.save(out["orbax-zarr"], {"params": host["params"]})
  return out


# ----------------------------------------------------------------------------
# Mutations.

_ODD_VALUES = (None, "x", "", True, 0, -1, 3, 1 << 70, 0.5, [], {}, [1, "a"], {"a": 1}, [[[]]])
# Texts that json.dumps does not produce: an out-of-range float, NaN, a huge integer.
_ODD_TEXTS = ("1e400", "NaN", "-Infinity", "9" * 30, '"\\ud800"')


def _json_paths(node, prefix=()):
  yield prefix
  if isinstance(node, dict):
    for k, v in node.items():
      yield from _json_paths(v, prefix + (k,))
  elif isinstance(node, list):
    for i, v in enumerate(node):
      yield from _json_paths(v, prefix + (i,))


def _get(node, path):
  for k in path:
    node = node[k]
  return node


def _mutate_json(rng, text: str) -> tuple[str, str]:
  """One structural mutation of a JSON text: ``(what, new text)``."""
  doc = json.loads(text)
  paths = list(_json_paths(doc))
  path = paths[int(rng.integers(len(paths)))]
  op = rng.choice(["type", "type", "delete", "duplicate", "swap", "wrap", "text", "huge"])
  marker = "__JASP_FUZZ__"
  if op == "delete" and path:
    parent = _get(doc, path[:-1])
    del parent[path[-1]]
    return f"delete {path}", json.dumps(doc)
  if op == "duplicate" and path and isinstance(path[-1], str):
    # The same key twice in one object (json.dumps cannot write that).
    parent = _get(doc, path[:-1])
    parent[marker] = 0
    dup = json.dumps(_ODD_VALUES[int(rng.integers(len(_ODD_VALUES)))])
    return f"duplicate {path}", json.dumps(doc).replace(
      f'"{marker}": 0', f"{json.dumps(path[-1])}: {dup}"
    )
  if op == "swap" and len(paths) > 2:
    other = paths[int(rng.integers(1, len(paths)))]
    if (
      path
      and other
      and path[:-1] != other
      and other[:-1] != path
      and not _prefix(path, other)
      and not _prefix(other, path)
    ):
      a, b = _get(doc, path), _get(doc, other)
      _get(doc, path[:-1])[path[-1]] = copy.deepcopy(b)
      _get(doc, other[:-1])[other[-1]] = copy.deepcopy(a)
      return f"swap {path} {other}", json.dumps(doc)
  if op == "wrap" and path:
    parent = _get(doc, path[:-1])
    parent[path[-1]] = [parent[path[-1]]]
    return f"wrap {path}", json.dumps(doc)
  if op in ("text", "huge") and path:
    parent = _get(doc, path[:-1])
    parent[path[-1]] = marker
    lit = (
      _ODD_TEXTS[int(rng.integers(len(_ODD_TEXTS)))]
      if op == "text"
      else str(int(rng.choice([1 << 31, 1 << 40, 1 << 62, 1 << 64])))
    )
    return f"{op} {path}={lit}", json.dumps(doc).replace(f'"{marker}"', lit)
  value = _ODD_VALUES[int(rng.integers(len(_ODD_VALUES)))]
  if not path:
    return f"root={value!r}", json.dumps(value)
  _get(doc, path[:-1])[path[-1]] = value
  return f"type {path}={value!r}", json.dumps(doc)


def _prefix(a, b) -> bool:
  return len(a) <= len(b) and tuple(b[: len(a)]) == tuple(a)


def _cold_ranges(data: bytes, blobs) -> list[tuple[int, int]]:
  """Byte ranges holding tensor data (the rest of a file is its structure)."""
  out = []
  for b in blobs:
    if len(b) >= 16:
      i = data.find(b)
      if i >= 0:
        out.append((i, i + len(b)))
  return out


def _pick(rng, n: int, cold) -> int:
  """A byte offset; three times in four outside the tensor data when there is any."""
  for _ in range(8):
    i = int(rng.integers(n))
    if rng.random() < 0.25 or not any(a <= i < b for a, b in cold):
      return i
  return i


def _one_mutation(rng, data: bytes, cold=(), kind: str | None = None) -> tuple[str, bytes]:
  """One byte-level mutation: a truncation, bit flips, a zeroed/overwritten/deleted/duplicated run."""
  n = len(data)
  kinds = ["truncate", "flip", "flip", "flip", "zero", "random", "delete", "duplicate"]
  kind = kind or kinds[int(rng.integers(len(kinds)))]
  b = bytearray(data)
  i = _pick(rng, n, cold)
  k = int(rng.integers(1, 64))
  if kind == "truncate":
    return f"truncate@{i}", data[:i]
  if kind == "flip":
    bits = int(rng.integers(1, 9))
    for _ in range(bits):
      j = _pick(rng, n, cold)
      b[j] ^= 1 << int(rng.integers(8))
    return f"flip x{bits}", bytes(b)
  if kind == "zero":
    b[i : i + k] = bytes(len(b[i : i + k]))
    return f"zero {i}+{k}", bytes(b)
  if kind == "random":
    b[i : i + k] = rng.integers(0, 256, len(b[i : i + k]), dtype=np.uint8).tobytes()
    return f"random {i}+{k}", bytes(b)
  if kind == "delete":
    del b[i : i + k]
    return f"delete {i}+{k}", bytes(b)
  b[i:i] = data[i : i + k]
  return f"duplicate {i}+{k}", bytes(b)


def _byte_mutations(rng, data: bytes, count: int, cold=()) -> list[tuple[str, bytes]]:
  """``count`` mutations: a third truncations at many offsets (the short ones all), the rest mixed."""
  n = len(data)
  offs = {0, 1, 2, 7, 8, 9, 15, 16, n // 2, n - 1}
  while len(offs) < count // 3:
    offs.add(_pick(rng, n, cold) if rng.random() < 0.5 else int(rng.integers(n)))
  out = [(f"truncate@{o}", data[:o]) for o in sorted(offs)[: count // 3]]
  while len(out) < count:
    out.append(
      _one_mutation(
        rng,
        data,
        cold,
        str(rng.choice(["flip", "flip", "flip", "zero", "random", "delete", "duplicate"])),
      )
    )
  return out


class _Cases:
  """Writes the mutated files under ``root``; ``items``: ``(format, what, path, must_exit)``."""

  def __init__(self, root: str):
    self.root = root
    self.items: list[tuple[str, str, str, int | None]] = []

  def add_file(self, fmt: str, what: str, data: bytes, suffix: str, must: int | None = None):
    path = os.path.join(self.root, f"c{len(self.items):04d}{suffix}")
    with open(path, "wb") as f:
      f.write(data)
    self.items.append((fmt, what, path, must))

  def add_dir(self, fmt: str, what: str, src: str, edit, must: int | None = None):
    path = os.path.join(self.root, f"c{len(self.items):04d}")
    shutil.copytree(src, path, symlinks=True)
    edit(path)
    self.items.append((fmt, what, path, must))


# Complexity: one chain of mutations, each drawing from ``rng`` in turn; the draws' order
# fixes the cases a seed reproduces.
def _onnx_cases(  # noqa: C901
  rng, cases: _Cases, src: str, count_bytes: int, count_struct: int
) -> None:
  data = open(src, "rb").read()
  model = onnx.load(src)
  cold = _cold_ranges(data, [t.raw_data for t in model.graph.initializer])
  cases.add_file("onnx", "original", data, ".onnx", must=0)
  for what, blob in _byte_mutations(rng, data, count_bytes, cold):
    cases.add_file("onnx", what, blob, ".onnx")
  meta_text = next(e.value for e in model.metadata_props if e.key == "jasp")
  ext_dir = os.path.join(cases.root, "onnx_ext")
  os.makedirs(ext_dir, exist_ok=True)
  with open(os.path.join(ext_dir, "short.bin"), "wb") as f:
    f.write(b"\0" * 16)
  made = 0
  while made < count_struct:
    m = copy.deepcopy(model)
    g = m.graph
    kind = rng.choice(
      [
        "meta",
        "meta",
        "meta",
        "no_nodes",
        "no_inits",
        "drop_init",
        "drop_node",
        "dims",
        "dtype",
        "raw",
        "attr",
        "attr",
        "op",
        "rename",
        "dup_meta",
        "external",
      ]
    )
    must = None
    if kind == "meta":
      what, text = _mutate_json(rng, meta_text)
      next(e for e in m.metadata_props if e.key == "jasp").value = text
    elif kind == "no_nodes":
      g.ClearField("node")
      what, must = "graph without nodes", 2
    elif kind == "no_inits":
      g.ClearField("initializer")
      what, must = "graph without initializers", 2
    elif kind == "drop_init":
      i = int(rng.integers(len(g.initializer)))
      what = f"drop initializer {g.initializer[i].name}"
      del g.initializer[i]
    elif kind == "drop_node":
      i = int(rng.integers(len(g.node)))
      what = f"drop node {g.node[i].op_type}"
      del g.node[i]
    elif kind == "dims":
      t = g.initializer[int(rng.integers(len(g.initializer)))]
      if not t.dims:
        continue
      j = int(rng.integers(len(t.dims)))
      t.dims[j] = int(rng.choice([0, -1, 2 * t.dims[j], 1 << 31, 1 << 62]))
      what = f"dims of {t.name}: {list(t.dims)}"
    elif kind == "dtype":
      t = g.initializer[int(rng.integers(len(g.initializer)))]
      t.data_type = int(rng.integers(0, 26))
      what = f"data_type of {t.name}: {t.data_type}"
    elif kind == "raw":
      t = g.initializer[int(rng.integers(len(g.initializer)))]
      t.raw_data = t.raw_data[: int(rng.integers(len(t.raw_data) + 1))]
      what = f"raw_data of {t.name} cut to {len(t.raw_data)}"
    elif kind == "attr":
      node = g.node[int(rng.integers(len(g.node)))]
      name = str(
        rng.choice(
          [
            "perm",
            "axis",
            "axes",
            "transA",
            "transB",
            "group",
            "equation",
            "allowzero",
            "num_scan_inputs",
            "scan_input_axes",
            "to",
          ]
        )
      )
      value = [0, 0] if rng.random() < 0.2 else _ODD_VALUES[int(rng.integers(2, 10))]
      if isinstance(value, (dict, type(None))) or value == [] or value == [1, "a"]:
        value = int(rng.integers(-5, 9))
      for a in list(node.attribute):
        if a.name == name:
          node.attribute.remove(a)
      try:
        node.attribute.append(helper.make_attribute(name, value))
      except (TypeError, ValueError):
        continue
      what = f"{node.op_type}.{name}={value!r}"
    elif kind == "op":
      node = g.node[int(rng.integers(len(g.node)))]
      new = str(
        rng.choice(
          [
            "MatMul",
            "Gemm",
            "Conv",
            "ConvTranspose",
            "Einsum",
            "Transpose",
            "Reshape",
            "Squeeze",
            "Unsqueeze",
            "Flatten",
            "Concat",
            "Loop",
            "Scan",
            "Identity",
          ]
        )
      )
      what = f"{node.op_type} -> {new}"
      node.op_type = new
    elif kind == "rename":
      node = g.node[int(rng.integers(len(g.node)))]
      if not node.input:
        continue
      j = int(rng.integers(len(node.input)))
      node.input[j] = str(rng.choice(["", "nope", g.initializer[0].name, node.output[0]]))
      what = f"{node.op_type}.input[{j}]={node.input[j]!r}"
    elif kind == "dup_meta":
      e = m.metadata_props.add()
      e.key, e.value = "jasp", meta_text
      what, must = "two jasp metadata entries", 2
    else:
      t = g.initializer[int(rng.integers(len(g.initializer)))]
      loc = str(rng.choice(["short.bin", "../m.onnx", "/dev/zero", "missing.bin", "zero.link"]))
      length = int(rng.choice([16, 1 << 40]))
      t.ClearField("raw_data")
      t.data_location = TensorProto.EXTERNAL
      for k, v in (("location", loc), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v
      itemsize = helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
      fits = loc == "short.bin" and length == 16 == int(np.prod(t.dims)) * itemsize
      what, must = f"external data of {t.name} in {loc}", None if fits else 2
      link = os.path.join(ext_dir, "zero.link")
      if not os.path.lexists(link) and os.path.exists("/dev/zero"):
        os.symlink("/dev/zero", link)
      path = os.path.join(ext_dir, f"c{len(cases.items):04d}.onnx")
      with open(path, "wb") as f:
        f.write(m.SerializeToString())
      cases.items.append(("onnx", what, path, must))
      made += 1
      continue
    cases.add_file("onnx", what, m.SerializeToString(), ".onnx", must)
    made += 1


def _safetensors_cases(rng, cases: _Cases, src: str, count_bytes: int, count_struct: int) -> None:
  data = open(src, "rb").read()
  hlen = int.from_bytes(data[:8], "little")
  header = data[8 : 8 + hlen].decode()
  body = data[8 + hlen :]
  cases.add_file("safetensors", "original", data, ".safetensors", must=0)
  cold = [(8 + hlen, len(data))]
  for what, blob in _byte_mutations(rng, data, count_bytes, cold):
    cases.add_file("safetensors", what, blob, ".safetensors")

  def pack(h: str, body=body, hlen=None) -> bytes:
    hb = h.encode()
    return (len(hb) if hlen is None else hlen).to_bytes(8, "little") + hb + body

  doc = json.loads(header)
  jasp_meta = doc["__metadata__"]["jasp"]
  for i in range(count_struct):
    kind = rng.choice(["header", "header", "meta", "meta", "meta", "length", "drop"])
    if kind == "header":
      what, h = _mutate_json(rng, header)
      cases.add_file("safetensors", "header " + what, pack(h), ".safetensors")
    elif kind == "meta":
      what, text = _mutate_json(rng, jasp_meta)
      d = copy.deepcopy(doc)
      d["__metadata__"]["jasp"] = text
      cases.add_file("safetensors", "jasp " + what, pack(json.dumps(d)), ".safetensors")
    elif kind == "length":
      lie = int(rng.choice([0, 1, hlen - 1, hlen + 1, len(data), 1 << 31, 1 << 63]))
      cases.add_file("safetensors", f"header length {lie}", pack(header, hlen=lie), ".safetensors")
    else:  # a tensor that the metadata names as pruned leaves the file
      d = copy.deepcopy(doc)
      meta = json.loads(jasp_meta)
      pruned = sorted(k for k, v in meta["weights"].items() if v["pruned"])
      key = pruned[i % len(pruned)]
      del d[key]
      cases.add_file(
        "safetensors", f"drop pruned {key}", pack(json.dumps(d)), ".safetensors", must=2
      )


def _msgpack_cases(rng, cases: _Cases, src: str, count_bytes: int, count_struct: int) -> None:
  data = open(src, "rb").read()
  raw = msgpack.unpackb(data, raw=False, strict_map_key=False)
  blobs = []

  def records(node, path=()):
    if isinstance(node, dict):
      for k, v in node.items():
        yield from records(v, path + (k,))
    elif isinstance(node, msgpack.ExtType):
      yield path, node

  for _, ext in records(raw):
    blobs.append(msgpack.unpackb(ext.data, raw=True)[2])
  cases.add_file("msgpack", "original", data, ".msgpack", must=0)
  for what, blob in _byte_mutations(rng, data, count_bytes, _cold_ranges(data, blobs)):
    cases.add_file("msgpack", what, blob, ".msgpack")
  recs = list(records(raw))
  for _ in range(count_struct):
    tree = copy.deepcopy(raw)
    path, ext = recs[int(rng.integers(len(recs)))]
    shape, dtype, buf = msgpack.unpackb(ext.data, raw=True)
    kind = rng.choice(
      ["shape", "dtype", "buffer", "record", "code", "subtree", "root", "deep", "chunked"]
    )
    if kind == "shape":
      shape = [int(rng.choice([0, 1 << 20, 1 << 40, 3]))] + list(shape)[1:]
      new = msgpack.ExtType(1, msgpack.packb((shape, dtype, buf)))
    elif kind == "dtype":
      dtype = str(rng.choice(["object", "V16", "<U4", "float128", "bogus", "int4", ""])).encode()
      new = msgpack.ExtType(1, msgpack.packb((shape, dtype, buf)))
    elif kind == "buffer":
      new = msgpack.ExtType(1, msgpack.packb((shape, dtype, buf[: int(rng.integers(len(buf)))])))
    elif kind == "record":
      value = _ODD_VALUES[int(rng.integers(len(_ODD_VALUES)))]
      new = msgpack.ExtType(1, msgpack.packb(value if value != 1 << 70 else -(1 << 40)))
    elif kind == "code":
      new = msgpack.ExtType(int(rng.choice([2, 3, 7, 127])), ext.data)
    elif kind == "subtree":
      new = _ODD_VALUES[int(rng.integers(len(_ODD_VALUES)))]
    elif kind == "chunked":
      new = {
        "__msgpack_chunked_array__": True,
        "chunks": {"0": ext},
        "shape": {"0": int(rng.choice([1, 1 << 40]))},
      }
    if kind == "root":
      tree = list(tree.values())
      what = "a list at the root"
    elif kind == "deep":
      for _ in range(int(rng.choice([70, 500, 5000]))):
        tree = {"a": tree}
      what = "nested deep"
    else:
      node = tree
      for k in path[:-1]:
        node = node[k]
      node[path[-1]] = new
      what = f"{kind} of {'/'.join(path)}"
    try:
      blob = msgpack.packb(tree)
    except (ValueError, TypeError, OverflowError):  # deeper or larger than msgpack writes
      continue
    cases.add_file("msgpack", what, blob, ".msgpack")


def _replace_file(path: str, how: str) -> None:
  os.remove(path)
  if how == "fifo":
    os.mkfifo(path)
  else:
    os.symlink("/dev/zero", path)


def _dir_files(root: str) -> list[str]:
  """The files under ``root``, in an order that does not depend on OCDBT's random file names."""
  files = [os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs]
  return sorted(
    files,
    key=lambda f: (
      os.path.dirname(f),
      os.path.getsize(os.path.join(root, f)),
      f if "ocdbt" not in f else "",
    ),
  )


def _dir_cases(rng, cases: _Cases, fmt: str, src: str, count: int, json_files, hot_files) -> None:
  """Mutations of a checkpoint directory: its JSON files, its binary files, files replaced."""
  cases.add_dir(fmt, "original", src, lambda p: None, must=0)
  files = _dir_files(src)
  jsons = [f for f in files if any(f.endswith(j) for j in json_files)]
  hot = [f for f in files if any(h in f for h in hot_files)] or files
  for _ in range(count):
    kind = rng.choice(["json", "json", "json", "bytes", "bytes", "bytes", "remove", "special"])
    if kind == "json" and jsons:
      rel = jsons[int(rng.integers(len(jsons)))]
      with open(os.path.join(src, rel)) as f:
        what, text = _mutate_json(rng, f.read())

      def edit(p, rel=rel, text=text):
        with open(os.path.join(p, rel), "w") as f:
          f.write(text)

      cases.add_dir(fmt, f"{rel}: {what}", src, edit)
    elif kind in ("bytes", "json"):
      rel = hot[int(rng.integers(len(hot)))]
      with open(os.path.join(src, rel), "rb") as f:
        data = f.read()
      if not data:
        continue
      what, blob = _one_mutation(rng, data)

      def edit(p, rel=rel, blob=blob):
        with open(os.path.join(p, rel), "wb") as f:
          f.write(blob)

      cases.add_dir(fmt, f"{rel}: {what}", src, edit)
    elif kind == "remove":
      rel = files[int(rng.integers(len(files)))]
      cases.add_dir(fmt, f"remove {rel}", src, lambda p, rel=rel: os.remove(os.path.join(p, rel)))
    else:
      rel = hot[int(rng.integers(len(hot)))]
      how = "fifo" if rng.random() < 0.5 or not os.path.exists("/dev/zero") else "zero"
      cases.add_dir(
        fmt,
        f"{rel} -> {how}",
        src,
        lambda p, rel=rel, how=how: _replace_file(os.path.join(p, rel), how),
        must=2,
      )


def _savedmodel_pruned_dropped(cases: _Cases, src: str) -> None:
  """The SavedModel's metadata names a pruned weight under a path it does not hold."""

  def edit(p):
    jp = os.path.join(p, "assets.extra", "jasp.json")
    with open(jp) as f:
      meta = json.load(f)
    name = sorted(k for k, v in meta["weights"].items() if v["pruned"])[0]
    meta["weights"]["params/Gone_0/kernel"] = meta["weights"].pop(name)
    with open(jp, "w") as f:
      json.dump(meta, f)

  cases.add_dir("savedmodel", "pruned weight renamed in jasp.json", src, edit, must=2)


def _build_cases(root: str, files: dict, rng) -> _Cases:
  cases = _Cases(os.path.join(root, "cases"))
  os.makedirs(cases.root)
  _onnx_cases(rng, cases, files["onnx"], 110, 90)
  _safetensors_cases(rng, cases, files["safetensors"], 70, 60)
  _msgpack_cases(rng, cases, files["msgpack"], 70, 40)
  _dir_cases(
    rng, cases, "savedmodel", files["savedmodel"], 60, ("jasp.json",), ("variables/", "jasp.json")
  )
  _savedmodel_pruned_dropped(cases, files["savedmodel"])
  _dir_cases(
    rng,
    cases,
    "orbax",
    files["orbax"],
    45,
    ("_METADATA", "_CHECKPOINT_METADATA"),
    ("ocdbt", "manifest", "_METADATA"),
  )
  _dir_cases(
    rng,
    cases,
    "orbax",
    files["orbax-zarr"],
    45,
    (".zarray", "_METADATA"),
    (".zarray", "/0", "_METADATA"),
  )
  return cases


# ----------------------------------------------------------------------------
# Running the cases.


class _Timeout(Exception):
  pass


class _LateErrors:
  """``sys.unraisablehook`` while the cases run.

  After orbax fails to read a checkpoint, tensorstore still completes the reads it had
  started and calls back into the asyncio loop that orbax already closed: Python reports
  that ``RuntimeError('Event loop is closed')`` as unraisable, printed later, during
  whichever check runs then. Those are counted (a figure of the run); any other unraisable
  exception is a failure.
  """

  def __init__(self):
    self.closed_loop = 0
    self.other: list[str] = []

  def __call__(self, unraisable):
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc):
      self.closed_loop += 1
    else:
      self.other.append(f"{type(exc).__name__}: {exc} ({unraisable.object!r})")

  @contextlib.contextmanager
  def installed(self):
    old = sys.unraisablehook
    sys.unraisablehook = self
    try:
      yield self
    finally:
      sys.unraisablehook = old


def _alarm(signum, frame):
  raise _Timeout()


def _run_one(path: str) -> tuple[int | str, str, float]:
  """``(exit status or 'timeout', stderr, seconds)`` of ``jasp check PATH`` in this process."""
  err = io.StringIO()
  t0 = time.perf_counter()
  old = signal.signal(signal.SIGALRM, _alarm)
  signal.setitimer(signal.ITIMER_REAL, CASE_TIMEOUT_S)
  try:
    # stdout as a terminal's: UTF-8, strict (a name the file gives must still print).
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
      try:
        code = cli.main(["check", path])
      except SystemExit as e:
        code = e.code
      out.flush()
  except _Timeout:
    code = "timeout"
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, old)
  return code, err.getvalue(), time.perf_counter() - t0


_CHILD = r"""
import io, json, resource, signal, sys, contextlib, time
mem, timeout = int(sys.argv[1]), float(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
from jasp.export import cli

class Timeout(Exception):
  pass

def alarm(signum, frame):
  raise Timeout()

late = {"closed_loop": 0, "other": []}

def unraisable(u):  # see _LateErrors
  if isinstance(u.exc_value, RuntimeError) and "Event loop is closed" in str(u.exc_value):
    late["closed_loop"] += 1
  else:
    late["other"].append(repr(u.exc_value))

sys.unraisablehook = unraisable
signal.signal(signal.SIGALRM, alarm)
for path in sys.argv[3:]:
  print(json.dumps({"start": path}), flush=True)
  err, t0 = io.StringIO(), time.perf_counter()
  signal.setitimer(signal.ITIMER_REAL, timeout)
  try:
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
      try:
        code = cli.main(["check", path])
      except SystemExit as e:
        code = e.code
      out.flush()
  except Timeout:
    code = "timeout"
  signal.setitimer(signal.ITIMER_REAL, 0)
  print(json.dumps({"path": path, "code": code, "err": err.getvalue()[-2000:],
                    "s": time.perf_counter() - t0}), flush=True)
print(json.dumps({"late": late}), flush=True)
"""


_ONE = (
  "import resource, sys; mem = int(sys.argv[1]); "
  "resource.setrlimit(resource.RLIMIT_AS, (mem, mem)); "
  "import runpy; sys.argv = ['jasp', 'check', sys.argv[2]]; "
  "runpy.run_module('jasp.export.cli', run_name='__main__')"
)


def _problems(code, err: str, seconds: float, must: int | None) -> list[str]:
  out = []
  if code not in (0, 1, 2):
    out.append(f"exit {code!r}")
  if "Traceback" in err or "internal error" in err:
    out.append("traceback: " + err[-1500:])
  if seconds > CASE_TIMEOUT_S:
    out.append(f"{seconds:.1f} s")
  if must is not None and code != must:
    out.append(f"exit {code!r}, expected {must}: {err[-500:]}")
  return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("fuzz"))
  t0 = time.perf_counter()
  files = _export_all(root)
  return root, files, time.perf_counter() - t0


def test_fuzz_check_fails_closed(exported, capsys):
  root, files, export_s = exported
  rng = np.random.default_rng(SEED)
  t0 = time.perf_counter()
  cases = _build_cases(root, files, rng)
  build_s = time.perf_counter() - t0
  with capsys.disabled():
    print(
      f"\njasp check fuzz: seed {SEED} (JASP_FUZZ_SEED={SEED} reproduces), {len(cases.items)} cases"
    )
  rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  outcomes: dict = collections.defaultdict(collections.Counter)
  failures, slowest = [], (0.0, "")
  t0 = time.perf_counter()
  with _LateErrors().installed() as late:
    for fmt, what, path, must in cases.items:
      code, err, seconds = _run_one(path)
      outcomes[fmt][code] += 1
      slowest = max(slowest, (seconds, f"{fmt} {what}"))
      for p in _problems(code, err, seconds, must):
        failures.append(f"[{fmt}] {what} ({path}): {p}")
  failures += [f"unraisable exception during the run: {e}" for e in late.other]
  run_s = time.perf_counter() - t0
  rss_growth_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024

  # A sample in a child process: a memory cap, a hard timeout, and a crash would show.
  sample = [c for i, c in enumerate(cases.items) if i % SAMPLE_EVERY == 0 or c[3] == 2]
  t1 = time.perf_counter()
  env = dict(
    os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
  )
  proc = subprocess.run(
    [sys.executable, "-c", _CHILD, str(CHILD_MEMORY), str(CASE_TIMEOUT_S)] + [c[2] for c in sample],
    capture_output=True,
    text=True,
    cwd=ROOT,
    env=env,
    timeout=CHILD_TIMEOUT_S,
  )
  child_s = time.perf_counter() - t1
  lines = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
  done = {ln["path"]: ln for ln in lines if "path" in ln}
  child_late = next((ln["late"] for ln in lines if "late" in ln), {"closed_loop": 0, "other": []})
  failures += [f"[child] unraisable exception: {e}" for e in child_late["other"]]
  child_outcomes = collections.Counter()
  for fmt, what, path, must in sample:
    got = done.get(path)
    if got is None:
      failures.append(
        f"[child] {fmt} {what} ({path}): no result; the child ended with "
        f"{proc.returncode}: {proc.stderr[-1500:]}"
      )
      break
    child_outcomes[got["code"]] += 1
    for p in _problems(got["code"], got["err"], got["s"], must):
      failures.append(f"[child] [{fmt}] {what} ({path}): {p}")
  if proc.returncode != 0:
    failures.append(f"[child] exit {proc.returncode}: {proc.stderr[-1500:]}")

  # One case per format as the real command, `python -m jasp.export.cli check`, in its own
  # process (its exit status is the process's).
  t2 = time.perf_counter()
  by_fmt = collections.defaultdict(list)
  for item in cases.items:
    if item[1] != "original":
      by_fmt[item[0]].append(item)
  picked = [v[int(rng.integers(len(v)))] for _, v in sorted(by_fmt.items())]
  procs = [
    (
      item,
      subprocess.Popen(
        [sys.executable, "-c", _ONE, str(CHILD_MEMORY), item[2]],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
      ),
    )
    for item in picked
  ]
  for (fmt, what, path, must), p in procs:
    try:
      _, err = p.communicate(timeout=120)
    except subprocess.TimeoutExpired:
      p.kill()
      _, err = p.communicate()
      failures.append(f"[process] [{fmt}] {what}: timed out")
      continue
    for prob in _problems(p.returncode, err, 0.0, must):
      failures.append(f"[process] [{fmt}] {what} ({path}): {prob}")
  process_s = time.perf_counter() - t2

  total = {k: sum(c.values()) for k, c in outcomes.items()}
  summary = collections.Counter()
  for c in outcomes.values():
    summary.update(c)
  with capsys.disabled():
    print(
      f"jasp check fuzz: seed {SEED}; cases per format {dict(total)}; {len(cases.items)} in all"
    )
    for fmt, c in outcomes.items():
      print(f"  {fmt}: " + ", ".join(f"exit {k}: {v}" for k, v in sorted(c.items(), key=str)))
    print("  outcomes: " + ", ".join(f"exit {k}: {v}" for k, v in sorted(summary.items(), key=str)))
    print(
      f"  time: export {export_s:.1f} s, build {build_s:.1f} s, in-process {run_s:.1f} s "
      f"(slowest {slowest[0]:.2f} s: {slowest[1]}), child sample of {len(sample)} under "
      f"RLIMIT_AS {CHILD_MEMORY >> 30} GiB {child_s:.1f} s "
      f"({', '.join(f'exit {k}: {v}' for k, v in sorted(child_outcomes.items(), key=str))}), "
      f"{len(procs)} separate processes {process_s:.1f} s; peak RSS growth "
      f"{rss_growth_mib:.0f} MiB; orbax's late 'Event loop is closed' reports: "
      f"{late.closed_loop} in-process, {child_late['closed_loop']} in the child"
    )
  assert len(cases.items) >= 500
  assert not failures, f"{len(failures)} failing case(s) (seed {SEED}):\n" + "\n".join(
    failures[:30]
  )
  assert rss_growth_mib < 1024
