"""Loads the compiled ops (torch.ops.mas_ext.*) and registers their fake kernels.

Importing this module never fails: where the extension is not built, `error` says why
and every caller takes the pure-PyTorch reference path.
"""
import os

import torch

try:
    from . import _C  # noqa: F401  (loading the library registers the ops)

    error = None
except ImportError as e:  # not built, or built against another torch
    error = f"{e} (build with `pip install --no-build-isolation -e .`)"


def available(name):
    """True when the compiled op ``torch.ops.mas_ext.<name>`` exists."""
    return error is None and hasattr(torch.ops.mas_ext, name)


def cuda_kernels_enabled():
    """Whether CUDA tensors may take the compiled CUDA kernels (where a build registers them).

    No CUDA kernel path runs before it passed on a GPU: until the first green ``make gpu-check``
    this is a test-only opt-in, True only with the environment variable MAS_EXT_CUDA_KERNELS=1;
    otherwise CUDA tensors take the reference path. The one switch every caller consults."""
    return os.environ.get("MAS_EXT_CUDA_KERNELS", "").strip() == "1"


if error is None:
    # Every op only mutates its inputs (accumulators, gradients, parameters, optimizer state) and returns
    # nothing: the fake kernels do nothing.
    @torch.library.register_fake("mas_ext::linear_importance_")
    def _linear_importance_fake(omega_w, omega_b, input, grad_out):
        return None

    @torch.library.register_fake("mas_ext::conv_importance_")
    def _conv_importance_fake(omega_w, omega_b, input, grad_out, kernel_size, stride, padding, dilation, groups):
        return None

    @torch.library.register_fake("mas_ext::tied_embedding_importance_")
    def _tied_embedding_importance_fake(omega, input, grad_out, indices, rows):
        return None

    @torch.library.register_fake("mas_ext::norm_affine_importance_")
    def _norm_affine_importance_fake(omega_w, omega_b, input, grad_out, eps, rms):
        return None

    @torch.library.register_fake("mas_ext::add_penalty_grad_")
    def _add_penalty_grad_fake(grads, params, omegas, stars, scale):
        return None

    @torch.library.register_fake("mas_ext::fused_sgd_mas_")
    def _fused_sgd_mas_fake(params, grads, momentum_buffers, omegas, stars, **kwargs):
        return None

    @torch.library.register_fake("mas_ext::fused_adam_mas_")
    def _fused_adam_mas_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, omegas, stars,
                             **kwargs):
        return None
