"""Image generation with a diffusers DiT: rectified flow or DDPM, with or without smoothing.

The embedded default trains a 6-block DiT (width 64, 2x2 patches) unconditionally on
scikit-learn's 8x8 handwritten digits scaled to [-1, 1] with rectified flow, on a CPU in about
10 minutes. ``data=cifar10_diffusion model=dit_cifar task.frechet_features=inception`` trains a
DiT-S/2-shaped model on CIFAR-10 through the same code and reports FID. Every evaluation reports
the held-out loss on fixed noise and timesteps (``val/loss``, ``test/loss``), a Fréchet distance
of generated samples (``sample/fd`` or ``sample/fid``, against the training images) and writes a
PNG grid of samples to ``samples/step_<step>.png`` in the run directory. Evaluation uses an EMA of
the weights, saved as ``ema.safetensors`` at the end.

Deviations from the paper (Meng, Sugolov and Papyan, arXiv 2606.30813):

1. The default data set is 8x8 digits, not CIFAR-10, so that it runs on a laptop CPU without
   downloads; sample quality is a Fréchet distance in the feature space of a small digit
   classifier, not FID, and is not comparable to the paper's numbers.
2. The model is diffusers' ``DiTTransformer2DModel`` (one stack, ``transformer_blocks``), not a
   U-ViT whose in- and out-halves are smoothed as two stacks, as in the authors' public code.
   diffusers' DiT gives every block its own timestep and label embedding, so those embeddings are
   smoothed with the blocks.
3. The Fréchet distance uses 512 samples by default (paper-scale FID uses 50,000), against the
   training split, so it is biased upwards and only comparable between runs with equal settings.
4. Unconditional training passes one class label to every image, because diffusers' DiT always
   takes labels; classifier-free guidance is off unless ``task.class_conditional=true`` and
   ``task.guidance_scale`` > 1.
5. Paper-scale CIFAR-10 uses random horizontal flips only (``data=cifar10_diffusion``), and its
   FID needs the Inception weights, which torchmetrics downloads through torch-fidelity.
"""

from gradsmooth.tasks.diffusion.config import DiffusionTaskConfig, DiTModelConfig

__all__ = ["DiffusionTask", "DiffusionTaskConfig", "DiTModelConfig"]


def __getattr__(name: str):
    # The task imports diffusers and torchmetrics; load it only when it is used.
    if name == "DiffusionTask":
        from gradsmooth.tasks.diffusion.task import DiffusionTask

        return DiffusionTask
    raise AttributeError(name)
