"""oneDNN's packed linears on CPU in float32 (`layers.pack_linears` / `layers.linear`): the same products as
F.linear to float32 rounding, only the matrices wide enough to gain, off with LLMSTACK_CPU_KERNELS=0, and a
model wide enough to be packed decodes greedily token for token as transformers' `generate` does.

The default tiny model (128 wide) is not packed: its tests keep F.linear. A 384-wide one is built here.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import torch.nn.functional as F  # noqa: E402

from llmstack.models.tiny import Shape, ensure_tiny_model  # noqa: E402
from llmstack.workers.backends import cpu_kernels  # noqa: E402
from llmstack.workers.backends.layers import Layer, linear, pack_linears  # noqa: E402
from llmstack.workers.backends.loader import load  # noqa: E402
from llmstack.workers.protocol import WorkerOptions  # noqa: E402
from llmstack.workers.sampling import SamplingParams  # noqa: E402
from tests.test_lightweight_scheduler import generate, prompt, run  # noqa: E402

WIDE = Shape(hidden_size=384, intermediate_size=768, num_hidden_layers=2, num_attention_heads=6,
             num_key_value_heads=2)  # fmt: skip


def layer(hidden: int, intermediate: int, bias: bool = False) -> Layer:
    g = torch.Generator().manual_seed(hidden)

    def w(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, generator=g) * 0.05

    b = (lambda n: torch.randn(n, generator=g)) if bias else (lambda n: None)
    return Layer(ln1=torch.ones(hidden), ln1_eps=1e-5, w_qkv=w(3 * hidden, hidden), b_qkv=b(3 * hidden),
                 w_o=w(hidden, hidden), b_o=b(hidden), ln2=torch.ones(hidden), ln2_eps=1e-5,
                 w_gate_up=w(2 * intermediate, hidden), b_gate_up=b(2 * intermediate),
                 w_down=w(hidden, intermediate), b_down=b(hidden), act=F.silu,
                 intermediate=intermediate)  # fmt: skip


@pytest.mark.parametrize("rows", [1, 7, 64])
def test_a_packed_linear_computes_what_f_linear_does(rows: int) -> None:
    plain = layer(512, 1024, bias=True)
    packed = layer(512, 1024, bias=True)
    assert pack_linears([packed])
    for name in ("w_qkv", "w_o", "w_gate_up", "w_down"):
        assert getattr(packed, name).is_mkldnn and not getattr(plain, name).is_mkldnn
    x = torch.randn(rows, 512)
    want, got = F.linear(x, plain.w_qkv, plain.b_qkv), linear(x, packed.w_qkv, packed.b_qkv)
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    batched = torch.randn(2, rows, 512)  # [batch, tokens, hidden]
    want = F.linear(batched, plain.w_o, plain.b_o)
    torch.testing.assert_close(linear(batched, packed.w_o, packed.b_o), want, rtol=1e-5, atol=1e-5)


def test_small_matrices_and_the_switch_keep_f_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    tiny = layer(128, 256)
    assert not pack_linears([tiny]) and not tiny.w_qkv.is_mkldnn  # the default tiny model's widths
    monkeypatch.setenv(cpu_kernels.DISABLE_ENV, "0")
    wide = layer(512, 1024)
    assert not pack_linears([wide]) and not wide.w_down.is_mkldnn


@pytest.mark.integration
def test_a_packed_model_decodes_as_generate_does() -> None:
    from transformers import AutoModelForCausalLM

    path = ensure_tiny_model(shape=WIDE)
    options = WorkerOptions(model=str(path), served_model_name="wide", model_impl="fused", max_batch_size=4,
                            max_model_len=96, torch_threads=1)  # fmt: skip
    loaded = load(options)
    assert loaded.backend.info().extra["linear"] == "onednn-packed"
    reference = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    jobs = [(prompt(i, 5 + 9 * i), SamplingParams(max_tokens=12, temperature=0.0)) for i in range(6)]
    outcomes, _, _ = run(loaded, jobs)
    for (ids, params), outcome in zip(jobs, outcomes, strict=True):
        assert outcome.tokens == generate(reference, ids, params.max_tokens)
