"""SparseSGDM: SGD with momentum whose updates are restricted to a binary mask per parameter (§9)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn
from torch.optim.sgd import sgd

try:  # torch's own (private) choice of kernels for SGD: all-ones masks then match SGD bit for bit on every device
    from torch.optim.optimizer import _default_to_fused_or_foreach
except ImportError:  # a torch without it: its documented default, foreach kernels for CUDA tensors

    def _default_to_fused_or_foreach(params, differentiable, use_fused=False):
        return False, not differentiable and all(p.is_cuda for p in params)


def masks_by_parameter(model: nn.Module, masks_by_name: Mapping[str, Tensor]) -> dict[nn.Parameter, Tensor]:
    """Re-key name-keyed masks by the model's Parameter objects (the form SparseSGDM takes)."""
    params = dict(model.named_parameters())
    unknown = [n for n in masks_by_name if n not in params]
    if unknown:
        raise ValueError(f"masks: {unknown[:5]} are not parameters of the model (first of {len(unknown)})")
    return {params[n]: m for n, m in masks_by_name.items()}


class SparseSGDM(torch.optim.SGD):
    """torch.optim.SGD where masked parameters use g' = grad + wd * theta where mask is 1, and 0 where it is 0.

    g' is a select, not a product: 0 * inf would be NaN. So masked entries never move (not by weight decay,
    not by a non-finite gradient) and their momentum buffer stays 0. Parameters without a mask are dense.
    With all-ones masks the trajectory equals torch.optim.SGD bit for bit.
    Note: `step` writes g' into `p.grad` of masked parameters (in place, to avoid a copy per step).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float | Tensor,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        masks: Mapping[nn.Parameter, Tensor] | None = None,
        maximize: bool = False,
        foreach: bool | None = None,
    ) -> None:
        # No `fused`: that kernel applies weight decay internally, where it cannot be masked.
        super().__init__(
            params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
            nesterov=nesterov, maximize=maximize, foreach=foreach,
        )  # fmt: skip
        self.frozen: dict[nn.Parameter, Tensor] = {}  # True where an entry never moves (mask 0)
        self.set_masks(masks)

    @torch.no_grad()
    def set_masks(self, masks: Mapping[nn.Parameter, Tensor] | None) -> None:
        """Replace all masks (None or {} = dense); momentum at newly frozen entries is zeroed."""
        own = {id(p): p for g in self.param_groups for p in g["params"]}
        checked: dict[nn.Parameter, Tensor] = {}
        for i, (p, m) in enumerate((masks or {}).items()):
            if not isinstance(p, Tensor) or own.get(id(p)) is not p:
                raise ValueError(
                    f"masks: key #{i} ({type(p).__name__}) is not a parameter of this optimizer; "
                    "build masks with masks_by_parameter(model, masks_by_name) from the same model object"
                )
            m = torch.as_tensor(m)
            if m.shape != p.shape:
                raise ValueError(f"masks: key #{i} has shape {tuple(m.shape)}, its parameter {tuple(p.shape)}")
            if not bool(((m == 0) | (m == 1)).all()):
                raise ValueError(f"masks: key #{i} has values other than 0 and 1 (1 = trainable)")
            # Inverted once, on the parameter's device, so step() only selects.
            checked[p] = m.detach().to(p.device) == 0
        self.frozen = checked
        # A buffer that is non-zero at a frozen entry would keep moving it: zero it.
        for p, frozen in self.frozen.items():
            buf = self.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                buf.masked_fill_(frozen, 0.0)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One SGD step: dense parameters as torch.optim.SGD, masked ones on the masked gradient g'."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            dense = [p for p in group["params"] if p.grad is not None and p not in self.frozen]
            masked = [p for p in group["params"] if p.grad is not None and p in self.frozen]
            self._sgd(group, dense, group["weight_decay"], group["maximize"])
            if masked:
                self._mask_grads(group, masked)
                # Weight decay and the sign flip are already inside g'.
                self._sgd(group, masked, 0.0, False)
        return loss

    def _mask_grads(self, group: dict, params: list[Tensor]) -> None:
        """p.grad <- ±grad + wd * p where trainable, exactly 0 where frozen; in place, with the kernels SGD uses."""
        grads = [p.grad for p in params]
        if any(g.is_sparse for g in grads):
            raise RuntimeError("SparseSGDM does not support sparse gradients on masked parameters")
        # Same kernel choice as torch.optim.sgd.sgd, so all-ones masks stay bit-exact on every device.
        foreach = group["foreach"]
        if foreach is None and group["fused"] is None:
            _, foreach = _default_to_fused_or_foreach(params, differentiable=False, use_fused=False)
        wd = group["weight_decay"]
        if foreach:
            if group["maximize"]:
                torch._foreach_neg_(grads)
            if wd != 0:
                torch._foreach_add_(grads, params, alpha=wd)
        else:
            for g, p in zip(grads, params, strict=True):
                if group["maximize"]:
                    g.neg_()
                if wd != 0:
                    g.add_(p, alpha=wd)
        for g, p in zip(grads, params, strict=True):
            g.masked_fill_(self.frozen[p], 0.0)  # a select: inf or NaN at a frozen entry becomes 0, not NaN

    def _sgd(self, group: dict, params: list[Tensor], weight_decay: float, maximize: bool) -> None:
        """Run torch's functional SGD on `params` and store the momentum buffers, as SGD.step does."""
        if not params:
            return
        momentum = group["momentum"]
        bufs = [self.state[p].get("momentum_buffer") for p in params] if momentum != 0 else []
        sgd(
            params, [p.grad for p in params], bufs,
            weight_decay=weight_decay, momentum=momentum, lr=group["lr"], dampening=group["dampening"],
            nesterov=group["nesterov"], maximize=maximize, foreach=group["foreach"], fused=group["fused"],
            has_sparse_grad=any(p.grad.is_sparse for p in params),
        )  # fmt: skip
        if momentum != 0:
            for p, buf in zip(params, bufs, strict=True):
                self.state[p]["momentum_buffer"] = buf
