"""The C kernels: built once per machine, atomically; the dropout kernel draws exactly the numpy reference's masks."""

import math
import platform

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tunesmith.kernels import dropout, native


@pytest.fixture
def fresh_library(tmp_path, monkeypatch):
    """native.library() built from scratch in an empty TUNESMITH_HOME (and the cached one restored after)."""
    monkeypatch.setenv("TUNESMITH_HOME", str(tmp_path))
    native.library.cache_clear()
    yield tmp_path
    native.library.cache_clear()


def test_the_library_is_built_once_into_the_home_with_no_temporary_left(fresh_library):
    assert native._compiler() is not None  # CI and the documented setup have a C compiler (torch.compile needs one)
    lib = native.library()
    assert lib is not None
    built = list((fresh_library / "kernels").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"
    stamp = built[0].stat().st_mtime_ns
    native.library.cache_clear()
    assert native.library() is not None and built[0].stat().st_mtime_ns == stamp  # reused, not rebuilt


def test_without_a_compiler_or_when_switched_off_there_is_no_library(fresh_library, monkeypatch, caplog):
    monkeypatch.setenv("TUNESMITH_NATIVE", "0")
    assert native.library() is None
    monkeypatch.delenv("TUNESMITH_NATIVE")
    native.library.cache_clear()
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails: a warning, no library, no file left
    assert native.library() is None
    assert "could not compile" in caplog.text
    assert not any((fresh_library / "kernels").iterdir())


@pytest.fixture(scope="module", params=["host", "portable"])
def c_library(request, tmp_path_factory):
    """The library as built for this CPU, and its portable C path (vector extensions beyond AVX2 switched off)."""
    if request.param == "host":
        return native.library()
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the host build is the portable path off x86")
    path = tmp_path_factory.mktemp("portable") / "native.so"
    assert native._build(native._compiler(), path, native.FLAGS + ("-mno-avx512f",)) == path
    return native._load(path)


@pytest.mark.parametrize("shape", [(1, 512, 576), (3, 7, 5), (1, 130), (64,), (2, 9, 1536)])
@pytest.mark.parametrize("p", [0.05, 0.5])
def test_the_c_kernel_draws_the_numpy_reference_mask_bit_for_bit(c_library, shape, p):
    lib = c_library
    n = math.prod(shape)
    x = torch.randn(shape)
    for threads in (1, 2):  # the mask depends on the seed and the element only, not on the threads
        dropped, packed = torch.empty_like(x), torch.full(((n + 7) // 8,), 255, dtype=torch.uint8)
        lib.tunesmith_dropout_forward(x.data_ptr(), dropped.data_ptr(), packed.data_ptr(), n, 1234, dropout._threshold(p),
                                      1 / (1 - p), threads)
        keep = dropout.reference_keep(1234, n, p)
        assert torch.equal(packed, torch.from_numpy(np.packbits(keep.view(np.uint8), bitorder="little")))  # spare bits 0
        assert torch.equal(dropped, torch.where(torch.from_numpy(keep).view(shape), x * (1 / (1 - p)), 0.0))
        again = torch.empty_like(x)
        lib.tunesmith_dropout_apply(x.data_ptr(), again.data_ptr(), packed.data_ptr(), n, 1 / (1 - p), threads)
        assert torch.equal(again, dropped)
        grad = torch.randn(shape)
        expected = torch.where(torch.from_numpy(keep).view(shape), grad * (1 / (1 - p)), 0.0)
        lib.tunesmith_dropout_apply(grad.data_ptr(), grad.data_ptr(), packed.data_ptr(), n, 1 / (1 - p), threads)
        assert torch.equal(grad, expected)  # in place
        bytes_out = torch.full((n,), 7, dtype=torch.uint8)
        lib.tunesmith_unpack_bits(packed.data_ptr(), bytes_out.data_ptr(), n, threads)
        assert torch.equal(bytes_out, torch.from_numpy(keep.view(np.uint8)))  # the compiled backward's bytes


def test_the_unpack_op_gives_the_mask_bytes_with_and_without_the_c_kernel(monkeypatch):
    from torch.library import opcheck

    torch.manual_seed(3)
    keep = dropout.keep_mask((5, 77), 0.2)
    packed = dropout.pack_bits(keep)
    assert torch.equal(dropout._unpack_mask(packed, keep.numel()), keep.reshape(-1))
    opcheck(dropout._unpack_mask, (packed, keep.numel()))
    monkeypatch.setattr(native, "library", lambda: None)
    assert torch.equal(dropout._unpack_mask(packed, keep.numel()), keep.reshape(-1))


def test_the_reference_mask_is_fair_in_every_lane_and_word():
    keep = dropout.reference_keep(99, 4_000_000, 0.05)
    sigma = math.sqrt(0.05 * 0.95 / 1_000_000)
    for lane in range(4):
        assert abs(1 - keep[lane::4].mean() - 0.05) < 5 * sigma
    # neighbouring words are independent: the drop rate of a pair of lanes from consecutive words is p^2
    pairs = ~keep[0::4][:-1] & ~keep[0::4][1:]
    assert abs(pairs.mean() - 0.05**2) < 5 * math.sqrt(0.05**2 / 1_000_000)


def test_the_op_gives_the_same_output_and_gradients_with_and_without_the_c_kernel(monkeypatch):
    x, weight = torch.randn(2, 33, 48, requires_grad=True), torch.randn(8, 48, requires_grad=True)
    grad = torch.randn(2, 33, 8)
    results = []
    for use_native in (True, False):
        if not use_native:
            monkeypatch.setattr(native, "library", lambda: None)
        torch.manual_seed(7)
        y = dropout.dropout_linear(x, weight, 0.3)
        results.append((y, *torch.autograd.grad(y, (x, weight), grad)))
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-5)
    torch.manual_seed(7)
    keep = dropout.keep_mask(x.shape, 0.3)
    assert torch.allclose(results[0][0], F.linear(x * keep / 0.7, weight), atol=1e-5)


def test_op_names_change_with_the_source_that_defines_them(tmp_path):
    from tunesmith.kernels.compile import op_name

    first, second = tmp_path / "a.py", tmp_path / "b.py"
    first.write_text("x = 1\n")
    second.write_text("x = 2\n")
    assert op_name("f", first).startswith("tunesmith::f_") and op_name("f", first) != op_name("f", second)
    assert op_name("f", first) == op_name("f", first)
    assert dropout._dropout_linear._opoverload.name() == op_name("dropout_linear", dropout.__file__)


needs_fused = pytest.mark.skipif(not native.has_avx512() or native.library() is None,
                                 reason="the fused LoRA-A kernels are AVX-512 code")


@needs_fused
@pytest.mark.parametrize("rows, cols, rank", [(512, 576, 16), (37, 1536, 8), (5, 128, 40), (1, 64, 1)])
def test_the_fused_lora_a_kernels_equal_the_separate_steps_with_the_same_mask(rows, cols, rank):
    lib, p, scale = native.library(), 0.1, 1 / 0.9
    x, a = torch.randn(rows, cols), torch.randn(rank, cols)
    n = rows * cols
    for threads in (1, 2):
        h, packed = torch.empty(rows, rank), torch.empty((n + 7) // 8, dtype=torch.uint8)
        assert lib.tunesmith_lora_a(x.data_ptr(), a.data_ptr(), h.data_ptr(), packed.data_ptr(), rows, cols, rank, 1234,
                                    dropout._threshold(p), scale, threads) == 0
        keep = torch.from_numpy(dropout.reference_keep(1234, n, p)).view(rows, cols)
        assert torch.equal(packed, torch.from_numpy(np.packbits(keep.numpy().view(np.uint8), bitorder="little")))
        assert torch.allclose(h, (x * keep) @ a.t() * scale, rtol=1e-4, atol=1e-4)
        dh = torch.randn(rows, rank)
        dx, da = torch.empty(rows, cols), torch.empty(rank, cols)
        assert lib.tunesmith_lora_a_dx(dh.data_ptr(), a.data_ptr(), packed.data_ptr(), dx.data_ptr(), rows, cols, rank,
                                       scale, threads) == 0
        assert torch.allclose(dx, (dh @ a) * keep * scale, rtol=1e-4, atol=1e-4)
        assert lib.tunesmith_lora_a_dw(dh.data_ptr(), x.data_ptr(), packed.data_ptr(), da.data_ptr(), rows, cols, rank,
                                       scale, threads) == 0
        assert torch.allclose(da, dh.t() @ (x * keep) * scale, rtol=1e-4, atol=1e-3)


@needs_fused
def test_the_fused_kernels_decline_rows_that_are_not_whole_mask_blocks():
    lib, x, a = native.library(), torch.randn(4, 96), torch.randn(8, 96)
    h, packed, dx = torch.empty(4, 8), torch.empty(48, dtype=torch.uint8), torch.empty(4, 96)
    assert lib.tunesmith_lora_a(x.data_ptr(), a.data_ptr(), h.data_ptr(), packed.data_ptr(), 4, 96, 8, 1, 100, 1.0, 2) == -1
    assert lib.tunesmith_lora_a_dx(h.data_ptr(), a.data_ptr(), packed.data_ptr(), dx.data_ptr(), 4, 96, 8, 1.0, 2) == -1
    assert not dropout._fused_a(x, a)


def test_the_portable_build_declines_the_fused_kernels(c_library):
    x, a = torch.randn(2, 64), torch.randn(4, 64)
    h, packed = torch.empty(2, 4), torch.empty(16, dtype=torch.uint8)
    done = c_library.tunesmith_lora_a(x.data_ptr(), a.data_ptr(), h.data_ptr(), packed.data_ptr(), 2, 64, 4, 1, 100, 1.0, 1)
    assert done == (0 if c_library is native.library() and native.has_avx512() else -1)


@needs_fused
def test_the_op_on_whole_mask_blocks_gives_the_unfused_output_and_gradients(monkeypatch):
    """dropout_linear through the fused kernels (rows of 128) and through the separate steps (AVX-512 switched off)."""
    from torch.library import opcheck

    x, weight = torch.randn(2, 33, 128, requires_grad=True), torch.randn(8, 128, requires_grad=True)
    grad = torch.randn(2, 33, 8)
    assert dropout._fused_a(x, weight)
    results = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(native, "has_avx512", lambda: False)
        torch.manual_seed(7)
        y, packed = dropout._dropout_linear(x, weight, 0.3)
        results.append((y, packed, *torch.autograd.grad(y, (x, weight), grad)))
    assert torch.equal(results[0][1], results[1][1])  # the same mask bits
    for a, b in zip(results[0], results[1]):
        assert torch.allclose(a.float(), b.float(), atol=1e-4)
    monkeypatch.undo()
    packed = results[0][1]
    for op, args in ((dropout._lora_a_grad_input, (grad, weight.detach(), packed, 1 / 0.7)),
                     (dropout._lora_a_grad_weight, (grad, x.detach(), packed, 1 / 0.7))):
        assert set(opcheck(op._opoverload, args).values()) == {"SUCCESS"}


@needs_fused
def test_when_a_fused_backward_kernel_declines_the_ops_take_the_separate_steps(monkeypatch):
    torch.manual_seed(2)
    keep = dropout.keep_mask((3, 64), 0.5)
    packed, grad, weight, x = dropout.pack_bits(keep), torch.randn(3, 4), torch.randn(4, 64), torch.randn(3, 64)
    expected = (dropout._lora_a_grad_input(grad, weight, packed, 2.0), dropout._lora_a_grad_weight(grad, x, packed, 2.0))
    lib = native.library()
    monkeypatch.setattr(lib, "tunesmith_lora_a_dx", lambda *args: -1)
    monkeypatch.setattr(lib, "tunesmith_lora_a_dw", lambda *args: -1)
    assert torch.allclose(dropout._lora_a_grad_input(grad, weight, packed, 2.0), expected[0], atol=1e-5)
    assert torch.allclose(dropout._lora_a_grad_weight(grad, x, packed, 2.0), expected[1], atol=1e-5)
    assert torch.allclose(expected[0], (grad @ weight) * keep * 2.0, atol=1e-5)
