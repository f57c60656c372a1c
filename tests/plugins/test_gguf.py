"""The GGUF header reader, against files written by llama.cpp's own ``gguf`` package."""

from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest
from gguf import quants

from lmkernel.plugins.gguf import GGUFError, read_gguf

Q = gguf.GGMLQuantizationType


def write(path, *, file_type=None, endian=gguf.GGUFEndian.LITTLE, tokens=300):
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "qwen2", endianess=endian)
    writer.add_name("Test Model")
    writer.add_context_length(32768)
    if file_type is not None:
        writer.add_file_type(file_type)
    writer.add_token_list([f"tok{i}" for i in range(tokens)])
    writer.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    writer.add_array("test.small", [1, 2, 3])
    writer.add_float32("test.float", 0.5)
    writer.add_bool("test.flag", True)
    for name, kind in (("blk.0.attn_q.weight", Q.Q4_0), ("blk.0.attn_k.weight", Q.Q4_0),
                       ("blk.0.ffn_up.weight", Q.Q8_0), ("token_embd.weight", Q.F16)):
        data = rng.random((64, 128), dtype=np.float32)
        raw = quants.quantize(data, kind) if kind != Q.F16 else data.astype(np.float16)
        writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=kind)
    writer.add_tensor("output_norm.weight", np.ones(128, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("endian", [gguf.GGUFEndian.LITTLE, gguf.GGUFEndian.BIG])
def test_the_header_as_llama_cpps_reader_sees_it(tmp_path, endian):
    path = write(tmp_path / "m.gguf", file_type=gguf.LlamaFileType.MOSTLY_Q4_0, endian=endian)
    info = read_gguf(path)
    reference = gguf.GGUFReader(str(path))
    assert info.version == 3 and info.tensor_count == len(reference.tensors) == 5
    assert info.parameter_count == sum(int(np.prod(t.shape)) for t in reference.tensors) == 4 * 64 * 128 + 128
    assert info.tensor_types == {"Q4_0": 2, "Q8_0": 1, "F16": 1, "F32": 1}
    assert (info.architecture, info.name, info.context_length, info.quantization) == (
        "qwen2", "Test Model", 32768, "Q4_0")
    assert info.metadata["tokenizer.chat_template"].startswith("{% for m in messages %}")
    assert info.metadata["test.small"] == [1, 2, 3] and info.metadata["test.flag"] is True
    assert info.metadata["test.float"] == 0.5
    assert info.metadata["tokenizer.ggml.tokens"] == {"array_length": 300}  # long arrays are skipped


def test_without_a_file_type_the_quantization_is_the_matrices_most_common_type(tmp_path):
    info = read_gguf(write(tmp_path / "m.gguf"))
    assert info.quantization == "Q4_0"  # two Q4_0 matrices of three quantized ones plus the embeddings


def test_long_arrays_are_read_when_asked(tmp_path):
    info = read_gguf(write(tmp_path / "m.gguf"), keep_arrays={"tokenizer.ggml.tokens"})
    assert info.metadata["tokenizer.ggml.tokens"] == [f"tok{i}" for i in range(300)]


def test_no_weight_is_read(tmp_path):
    path = write(tmp_path / "m.gguf")
    full = read_gguf(path)
    data = path.read_bytes()
    data_start = gguf.GGUFReader(str(path)).data_offset  # where the tensor data begins
    assert len(data) > data_start + 30000
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:data_start])
    # The header alone gives the same answer: the data section is never touched.
    assert read_gguf(cut) == full


def test_every_truncation_of_the_header_is_a_clear_error(tmp_path):
    data = write(tmp_path / "m.gguf", tokens=3).read_bytes()
    header = read_gguf(tmp_path / "m.gguf")
    assert header.tensor_count == 5
    cut = tmp_path / "cut.gguf"
    errors = set()
    for n in range(0, 900):
        cut.write_bytes(data[:n])
        try:
            read_gguf(cut)
        except GGUFError as exc:
            errors.add(str(exc).split(" (byte")[0].split(" is not")[0][:30])
        else:
            break  # from here on the whole header is there
    else:
        pytest.fail("a header of 900 bytes never read")
    assert errors  # truncations fail as GGUFError (any other exception fails the test)


@pytest.mark.parametrize(("data", "message"), [
    (b"GGML" + bytes(20), "is not a GGUF file"),
    (b"GGUF" + struct.pack("<I", 1) + bytes(16), "is GGUF version 1; this reader reads versions 2 and 3"),
    (b"GGUF" + struct.pack("<IQQ", 3, 2**40, 0), "the tensor count is 1099511627776, more than this reader accepts"),
    (b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, 2**40), "the length of key 0 is 1099511627776, more than"),
    (b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, 1) + b"k" + struct.pack("<I", 99), "has the unknown value type 99"),
    (b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, 1) + b"\xff" + struct.pack("<I", 6), "key 0 is not UTF-8 text"),
])
def test_malformed_headers_say_what_is_wrong(tmp_path, data, message):
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    with pytest.raises(GGUFError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_gguf(path)
