"""Run under torchrun by test_distributed.py: smoothed DDP steps on different data per rank.

Writes ``rank<k>.safetensors`` with this rank's parameters after the steps into the directory
given as the first argument, so the test can check that the ranks agree.
"""

import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

import gradsmooth


def main(out_dir: Path) -> None:
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = VisionTransformer(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=16, depth=3, num_heads=2)
    optimizer = gradsmooth.smooth(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1), model, window=3)
    model, optimizer = accelerator.prepare(model, optimizer)

    # Each rank draws different data; DDP averages the gradients before the smoothed step.
    generator = torch.Generator().manual_seed(100 + accelerator.process_index)
    for _ in range(3):
        images = torch.randn(4, 1, 8, 8, generator=generator)
        labels = torch.randint(0, 10, (4,), generator=generator)
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()

    state = {name: p.detach().clone() for name, p in accelerator.unwrap_model(model).named_parameters()}
    save_file(state, out_dir / f"rank{accelerator.process_index}.safetensors")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
