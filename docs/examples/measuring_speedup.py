"""Measuring the speed-up of methods on a model with tokred.bench: every method the same way, in one
process, interleaved, as ratios against the unreduced model and (for stage-I-only methods) against
the ideal, the model fed only the kept tokens."""

import torch

import tokred
from tokred.bench import Bench, Contender, format_markdown
from tokred.testing import make_image, tiny_model

# With your own checkpoint:
#   from transformers import AutoProcessor, LlavaForConditionalGeneration
#   model = LlavaForConditionalGeneration.from_pretrained(
#       "llava-hf/llava-1.5-7b-hf", dtype="auto", attn_implementation="sdpa").eval()
#   processor = AutoProcessor.from_pretrained("llava-hf/llava-1.5-7b-hf")
model, processor = tiny_model("llava")  # stands in for the lines above: random weights, offline

messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=[make_image(seed=1)], text=[prompt], return_tensors="pt")  # one prompt
inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)  # on a GPU: .to(model.device) too

registry = tokred.default_registry()
contenders = [
    Contender(name, "keep=64", method=registry.create(name, keep=64), budget_value=64)
    for name in ("random", "fastv")
]
bench = Bench(model, inputs, contenders, registry=registry, new_tokens=4, repeats=3, memory=False,
              model_name="tiny llava")
with torch.no_grad():
    result = bench.run()  # a JSON-ready dict; "unreduced" is always the first row

print(format_markdown(result))
rows = {row["method"]: row for row in result["rows"]}
speedup, vs_ideal = rows["random"]["prefill_speedup"]["median"], rows["random"]["prefill_vs_ideal"]["median"]
print(f"random keep=64: prefill {speedup:.2f}x faster than unreduced, {vs_ideal:.2f}x the ideal's time")
