"""One ``torch.optim.Optimizer`` over several optimizers with disjoint parameters.

Used to run Muon on block matrices and AdamW on everything else as a single object, so LR
schedulers, the smoothing wrapper, Accelerate and checkpoints see one optimizer.
"""

from __future__ import annotations

from collections import defaultdict

import torch


class CombinedOptimizer(torch.optim.Optimizer):
    """Step several optimizers as one.

    ``param_groups`` is the concatenation of the sub-optimizers' group dicts (the same objects, so
    a scheduler that sets ``group["lr"]`` reaches the optimizer that uses it), and all of them
    share one ``state`` mapping, so torch's own ``state_dict`` and ``load_state_dict`` apply.
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        if not optimizers:
            raise ValueError("CombinedOptimizer needs at least one optimizer")
        seen: set[int] = set()
        for opt in optimizers:
            for group in opt.param_groups:
                for p in group["params"]:
                    if id(p) in seen:
                        raise ValueError("a parameter belongs to more than one optimizer")
                    seen.add(id(p))

        params = [p for opt in optimizers for group in opt.param_groups for p in group["params"]]
        # Optimizer.__init__ sets up torch's hooks; its groups are then replaced by the sub-optimizers'.
        super().__init__(params, defaults={})
        self.optimizers = list(optimizers)
        self._group_counts = [len(opt.param_groups) for opt in optimizers]
        self._share()

    def _share(self) -> None:
        self.param_groups = [group for opt in self.optimizers for group in opt.param_groups]
        state = defaultdict(dict)
        for opt in self.optimizers:
            state.update(opt.state)
        self.state = state
        for opt in self.optimizers:
            opt.state = state

    def add_param_group(self, param_group: dict) -> None:
        if not hasattr(self, "optimizers"):
            super().add_param_group(param_group)
        else:
            raise NotImplementedError("add the group to one of CombinedOptimizer.optimizers instead")

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers:
            opt.step()
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # torch rebuilt the group dicts and state; hand each sub-optimizer its slice again.
        start = 0
        for opt, count in zip(self.optimizers, self._group_counts):
            opt.param_groups = self.param_groups[start : start + count]
            opt.state = self.state
            start += count
