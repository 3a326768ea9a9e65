"""Draw the bundle's network as a block diagram, from the network itself (forward hooks give every shape).

    python tools/architecture_diagram.py --output bundle/docs/architecture.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import fire
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

BUNDLE = Path(__file__).resolve().parents[1] / "bundle"
sys.path.insert(0, str(BUNDLE))

from monai.bundle import ConfigParser  # noqa: E402


def traced_shapes(network: torch.nn.Module, size: int) -> dict[str, list[tuple[int, ...]]]:
    """Output shape of every encoder stage, decoder block and head for one ``(1, 1, size, size)`` input."""
    shapes: dict[str, list[tuple[int, ...]]] = {"encoder": [], "decoder": []}
    hooks = [
        stage.register_forward_hook(lambda m, i, o: shapes["encoder"].append(tuple(o.shape[1:])))
        for stage in network.encoder.stages
    ]
    hooks += [
        block.register_forward_hook(lambda m, i, o: shapes["decoder"].append(tuple(o.shape[1:])))
        for block in network.decoder.blocks
    ]
    network.eval()
    with torch.no_grad():
        outputs = network(torch.zeros(1, 1, size, size))
    for hook in hooks:
        hook.remove()
    shapes["pred"] = [tuple(outputs["pred"].shape[1:])]
    shapes["cls"] = [tuple(outputs["cls"].shape[1:])]
    return shapes


def _box(ax, x: float, y: float, text: str, colour: str, width: float = 1.7, height: float = 0.62) -> None:
    ax.add_patch(
        FancyBboxPatch((x - width / 2, y - height / 2), width, height, boxstyle="round,pad=0.03", fc=colour, ec="k")
    )
    ax.text(x, y, text, ha="center", va="center", fontsize=7.5)


def _arrow(ax, start: tuple[float, float], end: tuple[float, float], style: str = "-|>", **kwargs) -> None:
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=9, lw=0.9, **kwargs))


def draw(config: str = str(BUNDLE / "configs" / "train.json"), output: str = str(BUNDLE / "docs" / "architecture.png"),
         size: int = 256) -> str:
    """Build ``network_def`` from a bundle config and draw it.

    Args:
        config: bundle config holding ``network_def``.
        output: PNG file to write.
        size: input side in pixels.

    Returns:
        The output path.
    """
    parser = ConfigParser()
    parser.read_config(config)
    network = parser.get_parsed_content("network_def")
    shapes = traced_shapes(network, size)
    parameters = sum(p.numel() for p in network.parameters())
    encoder, decoder = shapes["encoder"], shapes["decoder"]
    levels = len(encoder)
    fig, ax = plt.subplots(figsize=(11, 1.15 * levels + 1.6))
    ax.set_xlim(-0.5, 10.8)
    ax.set_ylim(-levels - 1.2, 1.6)
    ax.axis("off")
    _box(ax, 0.9, 1.0, f"image\n1 x {size} x {size}", "#dddddd")
    for level, shape in enumerate(encoder):
        y = -level
        _box(ax, 2.9, y, f"residual unit, stride 2\n{shape[0]} x {shape[1]} x {shape[2]}", "#a6cee3")
        _arrow(ax, (0.9 + 0.85, 1.0) if level == 0 else (2.9, y + 0.69), (2.9, y + 0.31))
    for index, shape in enumerate(decoder):
        level = levels - 2 - index
        y = -level if level >= 0 else 1.0
        kind = "up-conv + skip, 2 convs" if level >= 0 else "up-conv, 2 convs (no skip)"
        _box(ax, 6.5, y, f"{kind}\n{shape[0]} x {shape[1]} x {shape[2]}", "#b2df8a")
        source = (2.9 + 0.85, -(levels - 1)) if index == 0 else (6.5, -(level + 1) + 0.31)
        _arrow(ax, source, (6.5 - 0.85 if index == 0 else 6.5, y - 0.31 if index else y))
        if level >= 0:
            _arrow(ax, (2.9 + 0.85, y), (6.5 - 0.85, y), style="-|>", linestyle="--", color="grey")
    pred = shapes["pred"][0]
    _box(ax, 9.2, 1.0, f"segmentation head\n'pred': {pred[0]} x {pred[1]} x {pred[2]}\nbackground/benign/malignant",
         "#fb9a99", height=0.8)
    _arrow(ax, (6.5 + 0.85, 1.0), (9.2 - 0.85, 1.0))
    _box(ax, 6.5, -levels - 0.35, f"classification head: global avg pool -> FC -> dropout -> FC\n'cls': "
         f"{shapes['cls'][0][0]} logits (normal/benign/malignant)", "#fdbf6f", width=4.6, height=0.75)
    _arrow(ax, (2.9, -(levels - 1) - 0.31), (6.5 - 2.3, -levels - 0.35))
    caption = f"MultiTaskResUNet, {parameters / 1e6:.2f} M parameters (drawn from {Path(config).name})"
    ax.text(0.0, -levels - 1.05, caption, fontsize=8, style="italic")
    ax.text(4.1, 0.45, "dashed: skip connections", fontsize=7.5, color="grey")
    fig.tight_layout()
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=120)
    print(json.dumps({"output": output, "parameters": parameters}))
    return output


if __name__ == "__main__":
    fire.Fire(draw)
