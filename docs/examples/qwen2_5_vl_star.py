"""Qwen2.5-VL with STAR: the visual tokens with the most visual self-attention before the language
model, then, from a quarter of the decoder's depth on, the ones the question attends to most."""

import tokred
from tokred.testing import make_image, tiny_model

# With the real checkpoint (needs the tokred-star plugin: pip install -e plugins/star):
#   from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration
#   model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
#       "Qwen/Qwen2.5-VL-7B-Instruct", dtype="auto", attn_implementation="sdpa")
#   processor = AutoProcessor.from_pretrained("Qwen/Qwen2.5-VL-7B-Instruct")
model, processor = tiny_model("qwen2_5_vl")  # stands in for the lines above: random weights, offline

messages = [{"role": "user", "content": [
    {"type": "image"},
    {"type": "text", "text": "What colour is the largest shape?"},
]}]
text = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(text=[text], images=[make_image(seed=3)], return_tensors="pt")  # 336 px: 144 tokens

# Final budget 24 tokens per image from layer K = "1/4" of the depth on; stage I keeps twice that
# (48) before the language model. Both defaults are ours (the paper publishes none) and are options:
# stage1_keep=..., gate_layer=...
method = tokred.create("star", keep=24)
with tokred.apply(model, method) as run:
    output = model.generate(**inputs, max_new_tokens=16)

print(run.report.summary())
per_layer = [layer[0] for layer in run.report.visual_tokens_per_layer]
print("visual tokens per decoder layer:", per_layer)
image = run.report.images[0]
print("kept after stage I:", len(image.kept_stage1), "after stage II:", len(image.kept_final))
# Stage II chooses among stage I's survivors; the report gives indices into the image's own tokens.
assert set(image.kept_final) <= set(image.kept_stage1)
