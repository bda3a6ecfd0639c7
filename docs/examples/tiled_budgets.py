"""Budgets on tiled images (LLaVA-NeXT, InternVL): per image across tiles and thumbnail, relative to
the image's own token count, or spread over its tiles."""

import torch

import tokred
from tokred.testing import make_image, tiny_model

# With the real checkpoints:
#   from transformers import AutoProcessor, LlavaNextForConditionalGeneration
#   model = LlavaNextForConditionalGeneration.from_pretrained(
#       "llava-hf/llava-v1.6-vicuna-7b-hf", dtype="auto", attn_implementation="sdpa")
#   processor = AutoProcessor.from_pretrained("llava-hf/llava-v1.6-vicuna-7b-hf")
model, processor = tiny_model("llava_next")  # stands in for the lines above: smaller tiles, random weights

messages = [{"role": "user", "content": [
    {"type": "image"}, {"type": "image"},
    {"type": "text", "text": "What differs between the two pictures?"},
]}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
# A square image (2 x 2 tiles + thumbnail) and a tall one (1 x 3 tiles + thumbnail).
images = [make_image(336, 336), make_image(200, 600, seed=1)]
inputs = processor(images=images, text=[prompt], return_tensors="pt")

# keep: the same count for every image, across all of its tiles and its thumbnail.
with tokred.apply(model, tokred.create("todre", keep=64, stage2=False)) as run, torch.no_grad():
    model(**inputs)
for image in run.report.images:
    print(f"keep=64: image {image.image} keeps {len(image.kept_final)} of {image.num_tokens}")

# keep_ratio: relative to each image's own token count, so larger images keep more.
with tokred.apply(model, tokred.create("todre", keep_ratio=0.1, stage2=False)) as run, torch.no_grad():
    model(**inputs)
for image in run.report.images:
    print(f"keep_ratio=0.1: image {image.image} keeps {len(image.kept_final)} of {image.num_tokens}")

# spread="tiles": each image's budget is split over its thumbnail and tiles in proportion to their
# token counts, and the method ranks each tile on its own, so no tile is left without tokens.
with tokred.apply(model, tokred.create("todre", keep=64, stage2=False)) as run, torch.no_grad():
    model(**inputs)
print("keep=64, kept per tile (thumbnail first):", run.report.images[0].kept_per_tile)
with tokred.apply(model, tokred.create("todre", keep=64, stage2=False, spread="tiles")) as spread, torch.no_grad():
    model(**inputs)
print("keep=64 spread over tiles:              ", spread.report.images[0].kept_per_tile,
      "of", spread.report.images[0].tile_sizes)
print(spread.report.summary())

# LLaVA-NeXT's newline tokens (one after each row of the tile grid) stay by default and are not
# counted; make them candidates like any other token with an adapter option.
with tokred.apply(model, tokred.create("random", keep_ratio=0.1),
                  adapter_options={"newline_tokens": "prune"}) as run, torch.no_grad():
    model(**inputs)
print("with newline tokens as candidates:", [image.num_tokens for image in run.report.images])
