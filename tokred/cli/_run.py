"""``tokred run``: answer one prompt about images with a reduced model."""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING, Any

from ._common import DEMO_PROMPT, add_command, positive_int
from ._loading import (
    add_images,
    add_method,
    add_model_source,
    check_keep,
    create_method,
    load_images,
    method_options,
    open_source,
    prompt_inputs,
    visual_token_counts,
)

if TYPE_CHECKING:
    from ..registry import Registry
    from ._output import Output

__all__ = ["add_parser", "handle"]


def add_parser(commands: Any) -> None:
    p = add_command(
        commands, "run", help="answer a prompt about images with a reduced model",
        description=(
            "Load a vision-language model with transformers (AutoProcessor and\n"
            "AutoModelForImageTextToText), or build a random-weight preset offline, apply a tokred\n"
            "method, answer one prompt about the given images with greedy decoding, and print the\n"
            "answer and the run report (visual tokens per decoder layer, time spent selecting).\n"
            "Method options, the checkpoint's configuration and processor, and --keep against each\n"
            "image's visual tokens are checked before the weights are loaded. Budgets are per image:\n"
            "--keep 64 on two images keeps 64 of each. A random-weight preset answers noise: run warns\n"
            "so on stderr."
        ),
        epilog=(
            "examples:\n"
            "  tokred run --preset tiny --method todre --keep 64\n"
            "  tokred run --model llava-hf/llava-1.5-7b-hf --method fastv --keep-ratio 0.25 \\\n"
            "      --image cat.png --prompt 'What is the cat doing?'\n"
            "  tokred run --model ./my-model --method random --keep 64 --option seed=3 \\\n"
            "      --image a.png b.png --prompt 'Compare the two pictures.' --json\n\n"
            "'tokred list' shows the methods; 'tokred list --json' also shows their options."
        ),
    )
    add_model_source(p, required=True)
    add_method(p)
    add_images(p, "image files, in prompt order (before the text)")
    p.add_argument("--prompt", default=DEMO_PROMPT, metavar="TEXT",
                   help=f"the question or instruction (default: {DEMO_PROMPT!r})")
    p.add_argument("--max-new-tokens", type=positive_int, default=32, metavar="N",
                   help="maximum number of tokens to generate (default: 32)")
    p.add_argument("--json", action="store_true", help="print a JSON object with the answer and the full report")
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace, registry: Registry, output: Output) -> int:
    import torch

    from ..runtime import apply

    # Everything checkable without the weights comes first, so a typo does not cost a model load.
    options = method_options(args)
    method = create_method(registry, args.method, options)
    images, image_names = load_images(args.image, output)
    source = open_source(args, registry, output)
    inputs = prompt_inputs(source.processor, images, args.prompt)
    check_keep(options.get("keep"), visual_token_counts(inputs, source.image_token_id, len(images)))

    model = source.load_model()
    inputs = inputs.to(device=source.device, dtype=model.dtype)
    prompt_length = inputs["input_ids"].shape[1]
    output.note(f"generating up to {args.max_new_tokens} new tokens with {args.method} ...")
    started = time.perf_counter()
    with torch.no_grad(), apply(model, method, registry=registry) as run:
        generated = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    output.note(f"generated {generated.shape[1] - prompt_length} tokens in {time.perf_counter() - started:.1f} s")

    answer = source.processor.batch_decode(generated[:, prompt_length:], skip_special_tokens=True)[0].strip()
    if args.preset:
        _warn_if_random(args.preset, output)
    if args.json:
        output.json({
            "model": source.name, "preset": bool(args.preset), "method": args.method,
            "options": method.model_dump(mode="json"), "prompt": args.prompt, "images": image_names,
            "answer": answer, "report": run.report.to_dict(),
        })
    else:
        output.print(f"{answer}\n\n{run.report.summary()}")
    return 0


def _warn_if_random(name: str, output: Output) -> None:
    """One warning, just above the answer, when the preset ``name`` has random weights
    (:attr:`tokred.bench.Preset.trained` is false): its answer is noise, not a bug of the method."""
    from ..bench import PRESETS

    preset = PRESETS[name]
    if preset.trained:
        return
    trained = [p.name for p in PRESETS.values() if p.trained]
    alternative = f", or --preset {' or '.join(trained)} (trained weights)" if trained else ""
    output.warn(f"preset {name!r} has random weights, so its answer is meaningless (it is for trying the commands "
                f"and timing them); for real answers give --model with a trained checkpoint, such as "
                f"--model llava-hf/llava-1.5-7b-hf{alternative}")
