"""Coupling of blocks' Jacobians across depth, in the spirit of Transformer Block Coupling.

Aubry, Meng, Sugolov and Papyan (ICLR 2025) compare the top singular vectors of the Jacobians of
different blocks. Here, for a token t, ``J_l`` is the d x d Jacobian of block l's residual
branch ``f_l(x)_t - x_t`` with respect to that token's input ``x_t`` (the other tokens held at
their values). With ``U_l, S_l, V_l`` the top-k singular triplets of ``J_l``, the coupling of
block m to block l is

    c[l, m] = sum_i |u_{l,i}^T J_m v_{l,i}| / sum_i s_{m,i}        (i = 1 .. k)

so ``c[l, l] = 1`` and ``c[l, m]`` is near 1 when ``J_m`` acts on block l's top directions as
strongly as on its own, and 0 when it maps them to orthogonal directions.
NOTE: this normalization is ours; compare values within this suite, not with that paper's figures.
"""

from __future__ import annotations

import torch
from torch import nn

from gradsmooth.analysis.hooks import BlockCalls, hidden_input, hidden_output, replace_hidden


def coupling_matrix(jacobians: torch.Tensor, top_k: int) -> torch.Tensor:
    """Return the L x L coupling matrix of ``jacobians`` (shape ``(L, d, d)``) over the top ``top_k`` singular directions."""
    jacobians = jacobians.double()
    left, singular, right_h = torch.linalg.svd(jacobians)
    k = min(top_k, jacobians.shape[-1])
    u, v = left[:, :, :k], right_h[:, :k, :].transpose(1, 2)
    # gains[l, m, i] = u_{l,i}^T J_m v_{l,i}
    gains = torch.einsum("ldi,mde,lei->lmi", u, jacobians, v).abs().sum(dim=-1)
    scale = singular[:, :k].sum(dim=-1).clamp_min(1e-30)
    return (gains / scale[None, :]).float()


def token_jacobians(blocks: list[nn.Module], calls: BlockCalls, token: int) -> torch.Tensor:
    """Return ``(L, d, d)``: each block's residual-branch Jacobian at ``token`` of the first example.

    ``calls`` must come from :func:`capture_blocks` with ``keep_calls=True`` on a batch whose
    hidden states have shape ``(batch, tokens, d)``.
    """
    jacobians = []
    for block, (args, kwargs) in zip(blocks, calls.calls):
        hidden = hidden_input(args, kwargs)

        def residual_at_token(x_t: torch.Tensor, block=block, args=args, kwargs=kwargs, hidden=hidden) -> torch.Tensor:
            replaced = hidden.clone()
            replaced[0, token] = x_t
            new_args, new_kwargs = replace_hidden(args, kwargs, replaced)
            return hidden_output(block(*new_args, **new_kwargs))[0, token] - x_t

        with torch.enable_grad():
            x_t = hidden[0, token].detach().clone()
            jacobian = torch.autograd.functional.jacobian(residual_at_token, x_t, vectorize=True)
        jacobians.append(jacobian.detach())
    return torch.stack(jacobians)
