"""Run under torchrun by test_distributed.py: smoothing on FSDP2-sharded parameters on CPU.

Writes ``rank<k>.json`` into the directory given as the first argument with the largest
difference between the sharded run and an unsharded run of the same steps, and the messages that
the unsupported combinations raise.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
from timm.models.vision_transformer import VisionTransformer

import gradsmooth


def vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=16, depth=3, num_heads=2)


def main(out_dir: Path) -> None:
    dist.init_process_group("gloo")
    result = {}

    sharded, reference = vit(), vit()
    for block in sharded.blocks:
        fully_shard(block)
    fully_shard(sharded)
    optimizers = [
        gradsmooth.smooth(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1), model, window=3)
        for model in (sharded, reference)
    ]
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        images = torch.randn(8, 1, 8, 8, generator=generator)
        labels = torch.randint(0, 10, (8,), generator=generator)
        for model, optimizer in zip((sharded, reference), optimizers):
            torch.nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()
            optimizer.zero_grad()
    result["max_difference"] = max(
        (p.full_tensor() - q).abs().max().item() for p, q in zip(sharded.parameters(), reference.parameters())
    )

    try:
        gradsmooth.smooth(torch.optim.AdamW(sharded.parameters()), sharded, normalize="rescale")
    except NotImplementedError as error:
        result["rescale"] = str(error)

    flat = FullyShardedDataParallel(vit(), device_id=torch.device("cpu"))
    try:
        gradsmooth.smooth(torch.optim.AdamW(flat.parameters()), flat)
    except NotImplementedError as error:
        result["fsdp1"] = str(error)

    (out_dir / f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
