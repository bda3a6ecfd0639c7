"""``tokred show``: draw the image with the visual tokens a method kept (:mod:`tokred.show`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._common import DEMO_PROMPT, CommandError, add_command
from ._loading import (
    add_images,
    add_method,
    add_model_source,
    check_keep,
    check_output_file,
    create_method,
    load_images,
    method_options,
    open_source,
    preset_or_prompt_inputs,
    video_preset,
    visual_token_counts,
)

if TYPE_CHECKING:
    from ..registry import Registry
    from ._output import Output

__all__ = ["add_parser", "handle"]


def add_parser(commands: Any) -> None:
    p = add_command(
        commands, "show", help="draw the image with the visual tokens a method kept",
        description=(
            "Run one prefill of the prompt with the method and draw each image as the model saw it\n"
            "(resized and cropped by the processor; one labelled panel per tile for tiled models:\n"
            "the thumbnail and tile 1, 2, ...): tokens that enter the language model keep their\n"
            "pixels and a yellow outline, dropped tokens are darkened. For methods with gates, a\n"
            "strip shows the tokens alive from each gate layer on. Works on the presets (no\n"
            "download) and on real checkpoints. Prints how many grid cells each panel kept."
        ),
        epilog=(
            "examples:\n"
            "  tokred show --preset tiny --method todre --keep 64 -o kept.png\n"
            "  tokred show --preset tiny-llava_next --method todre --keep-ratio 0.1 -o tiles.png\n"
            "  tokred show --model llava-hf/llava-1.5-7b-hf --method todre --keep 64 --image cat.jpg \\\n"
            "      --prompt 'What is the cat doing?' -o kept.png"
        ),
    )
    add_model_source(p, required=True)
    add_method(p)
    add_images(p, "image files")
    p.add_argument("--prompt", default=DEMO_PROMPT, metavar="TEXT",
                   help=f"the question; attention-guided methods depend on it (default: {DEMO_PROMPT!r})")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="FILE", help="the PNG file to write")
    p.add_argument("--json", action="store_true",
                   help="print the figure's panels (image, tile, label, stage, box, grid) and the grid cells "
                        "each kept, as JSON")
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace, registry: Registry, output: Output) -> int:
    from ..show import show

    check_output_file(args.output, "--output")
    options = method_options(args)
    method = create_method(registry, args.method, options)
    video_preset(args)  # before any file is read: a video preset takes no --image
    images, _ = load_images(args.image, output)
    source = open_source(args, registry, output)
    inputs, pictures = preset_or_prompt_inputs(args, source.processor, images, args.prompt)
    check_keep(options.get("keep"), visual_token_counts(inputs, source.image_token_id, len(images)))
    model = source.load_model()
    inputs = inputs.to(device=source.device, dtype=model.dtype)
    budget = next((f"{k}={v:g}" for k, v in (("keep", args.keep), ("keep_ratio", args.keep_ratio)) if v is not None),
                  "default budget")
    figure = show(model, source.processor, inputs, method, pictures, title=f"{args.method} ({budget}) on {source.name}",
                  registry=registry)
    try:
        figure.image.save(args.output, format="PNG")
    except OSError as exc:
        raise CommandError(f"cannot write {str(args.output)!r}: {exc}") from None
    output.note(f"wrote {args.output} ({figure.image.width} x {figure.image.height})")
    if args.json:
        output.json({
            "output": str(args.output), "size": list(figure.image.size), "method": args.method,
            "options": method.model_dump(mode="json"),
            "panels": [{"image": p.image, "tile": p.tile, "label": p.label, "stage": p.stage, "box": list(p.box),
                        "grid": list(p.grid), "kept": p.kept} for p in figure.panels],
        })
        return 0
    rows = [[str(p.image + 1), p.label or "-", p.stage, str(p.kept), str(p.grid[0] * p.grid[1])] for p in figure.panels]
    if any(p.label for p in figure.panels):
        output.print(output.table(["image", "panel", "stage", "kept", "of grid cells"], rows, right={0, 3, 4}))
    else:  # untiled images: no tile column
        output.print(output.table(["image", "stage", "kept", "of grid cells"],
                                  [[r[0], r[2], r[3], r[4]] for r in rows], right={0, 2, 3}))
    return 0
