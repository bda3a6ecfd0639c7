"""LLaVA-1.5 with ToDRE: a diverse 10% of each image's 576 visual tokens before the language model,
then, at depth 7/8, none of them once attention has moved on to the text."""

import tokred
from tokred.testing import make_image, tiny_model

# With the real checkpoint (needs the tokred-todre plugin: pip install -e plugins/todre):
#   from transformers import AutoProcessor, LlavaForConditionalGeneration
#   model = LlavaForConditionalGeneration.from_pretrained(
#       "llava-hf/llava-1.5-7b-hf", dtype="auto", attn_implementation="sdpa")
#   processor = AutoProcessor.from_pretrained("llava-hf/llava-1.5-7b-hf")
model, processor = tiny_model("llava")  # stands in for the lines above: random weights, offline

messages = [{"role": "user", "content": [
    {"type": "image"},
    {"type": "text", "text": "What is shown in this image?"},
]}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=[make_image(seed=1)], text=[prompt], return_tensors="pt")

# ToDRE's defaults are the paper's: keep_ratio=0.1 (58 of 576 tokens), tau=0.1, gate at depth 7/8.
method = tokred.create("todre", keep_ratio=0.1)
with tokred.apply(model, method) as run:
    output = model.generate(**inputs, max_new_tokens=16)
answer = processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

print(run.report.summary())
image = run.report.images[0]
print("entered the LLM:", len(image.kept_stage1), "of", image.num_tokens)
# LLaVA-1.5's tokens are a 24 x 24 grid in row-major order: token i sits at row i // 24, column i % 24.
print("first kept cells (row, column):", [divmod(i, 24) for i in image.kept_stage1[:6]])

# Whether stage II fired is decided per sample. On the random-weight stand-in the text still
# attends to the image at depth 7/8, so it does not fire at tau=0.1; tau=1.0 forces it, to show
# what firing looks like: no visual token in the last layer, for the prefill and every decoding step.
with tokred.apply(model, tokred.create("todre", keep_ratio=0.1, tau=1.0)) as forced:
    model.generate(**inputs, max_new_tokens=4)
print("visual tokens per layer, gate fired:", [layer[0] for layer in forced.report.visual_tokens_per_layer])
