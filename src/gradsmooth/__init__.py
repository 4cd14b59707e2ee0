"""gradsmooth: Gradient Smoothing for any torch optimizer, and a suite that reproduces the paper.

    import gradsmooth
    optimizer = gradsmooth.smooth(torch.optim.AdamW(model.parameters()), model, window=3, alpha=0.2)
"""

from gradsmooth.smoothing import SmoothedOptimizer, SmoothingConfig, find_stacks, smooth

__all__ = ["SmoothedOptimizer", "SmoothingConfig", "find_stacks", "smooth"]
__version__ = "0.1.0"
