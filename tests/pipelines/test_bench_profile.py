"""`bench train --profile`'s window: where a training loop's time goes, by op on a CPU,
with the matmul share the MFU counts told apart from the rest."""

from __future__ import annotations

import torch

from uniloom.pipelines.train.bench import ATTENTION, MATMUL, profile_window


class Loop:
    """The part of PlainLoop the profiler drives: a device and `steps(n)`."""

    def __init__(self, width: int, elementwise: int):
        torch.manual_seed(0)
        self.device = torch.device("cpu")
        self.layer = torch.nn.Linear(width, width)
        self.opt = torch.optim.SGD(self.layer.parameters(), lr=1e-3)
        self.x = torch.randn(1024, width)
        self.elementwise = elementwise

    def steps(self, n: int) -> None:
        for _ in range(n):
            y = self.layer(self.x)
            for _ in range(self.elementwise):  # memory-bound work the MFU does not count
                y = torch.tanh(y) * 1.0001
            y.mean().backward()
            self.opt.step()
            self.opt.zero_grad()


def test_the_profile_tells_matmuls_from_the_rest():
    mostly_matmul = profile_window(Loop(1024, 0), steps=3)
    mostly_elementwise = profile_window(Loop(64, 30), steps=3)
    for out in (mostly_matmul, mostly_elementwise):
        assert out["profile_steps"] == 3 and 0 < out["profile_busy_ms"]
        assert (
            0
            <= out["profile_attention_share"]
            <= out["profile_attention_share"] + out["profile_matmul_share"]
            <= 1
        )
        names = [name for name, _, _ in out["profile_top"]]
        assert names and all(n.startswith("aten::") for n in names) and len(names) <= 12
        shares = [share for _, _, share in out["profile_top"]]
        assert shares == sorted(shares, reverse=True) and sum(shares) <= 1.0001
        assert "profile_gpu_busy_share" not in out  # a CPU: no kernels to count
    assert mostly_matmul["profile_matmul_share"] > 0.5 > mostly_elementwise["profile_matmul_share"]
    assert "aten::tanh" in [name for name, _, _ in mostly_elementwise["profile_top"]]


def test_kernel_names_are_classified():
    for name in (
        "aten::mm",
        "aten::addmm",
        "aten::_grouped_mm",
        "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64",
        "cutlass_80_wmma_tensorop_bf16",
    ):
        assert MATMUL.search(name), name
    for name in (
        "aten::tanh",
        "aten::mul",
        "triton_rms_norm_fwd",
        "void at::native::elementwise_kernel<128, 4>",
    ):
        assert not MATMUL.search(name), name
    assert ATTENTION.search("flash_fwd_kernel") and ATTENTION.search(
        "aten::_scaled_dot_product_flash_attention_for_cpu"
    )
