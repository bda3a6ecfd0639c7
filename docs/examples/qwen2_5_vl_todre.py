"""Qwen2.5-VL with ToDRE: a diverse 10% of each image's visual tokens before the language model,
then, at depth 7/8, the rest of them once attention has moved on to the text."""

import tokred
from tokred.testing import make_image, tiny_model

# With the real checkpoint (needs the tokred-todre plugin: pip install -e plugins/todre):
#   from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration
#   model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
#       "Qwen/Qwen2.5-VL-7B-Instruct", dtype="auto", attn_implementation="sdpa")
#   processor = AutoProcessor.from_pretrained("Qwen/Qwen2.5-VL-7B-Instruct")
model, processor = tiny_model("qwen2_5_vl")  # stands in for the lines above: random weights, offline

messages = [{"role": "user", "content": [
    {"type": "image"}, {"type": "image"},
    {"type": "text", "text": "What differs between the two pictures?"},
]}]
text = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(text=[text], images=[make_image(seed=1), make_image(seed=2)], return_tensors="pt")

method = tokred.create("todre", keep_ratio=0.1)  # per image: 14 of the 144 tokens of a 336 px image
with tokred.apply(model, method) as run:
    output = model.generate(**inputs, max_new_tokens=16)

print(run.report.summary())
print("kept per image:", [len(image.kept_stage1) for image in run.report.images])

# Where the kept tokens are: each image is a (t, h, w) grid of patches, merged 2 x 2 into tokens
# numbered row by row, so token i sits at row i // (w / 2), column i % (w / 2).
for image, (t, h, w) in zip(run.report.images, inputs["image_grid_thw"].tolist()):
    columns = w // 2
    print(f"image {image.image}:", [divmod(i, columns) for i in image.kept_stage1][:5], "...")
