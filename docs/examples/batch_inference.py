"""Batch inference: two prompts of different lengths, left-padded, one generate call. Budgets are per
image and decisions per sample, so each answer is the one the prompt gets alone."""

import torch

import tokred
from tokred.testing import make_image, tiny_model

# With the real checkpoint:
#   from transformers import AutoProcessor, LlavaForConditionalGeneration
#   model = LlavaForConditionalGeneration.from_pretrained(
#       "llava-hf/llava-1.5-7b-hf", dtype="auto", attn_implementation="sdpa")
#   processor = AutoProcessor.from_pretrained("llava-hf/llava-1.5-7b-hf")
model, processor = tiny_model("llava")  # stands in for the lines above: random weights, offline

# Decoder-only models generate after the last position of each row: pad on the left.
processor.tokenizer.padding_side = "left"

questions = ["What is shown?", "Describe the picture in detail, with the colour of every shape."]
images = [make_image(seed=1), make_image(seed=2)]
prompts = [
    processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        add_generation_prompt=True,
    )
    for question in questions
]
batch = processor(images=images, text=prompts, padding=True, return_tensors="pt")
print("padded batch:", tuple(batch["input_ids"].shape), "real tokens per row:", batch["attention_mask"].sum(1).tolist())

method = tokred.create("fastv", keep=64)  # 64 of each image's 576 tokens from layer 2 on
with tokred.apply(model, method) as run:
    batched = model.generate(**batch, max_new_tokens=8, do_sample=False)
    answers = batched[:, batch["input_ids"].shape[1]:]
    print(run.report.summary())
    batched_layers = run.report.visual_tokens_per_layer  # [layer][sample]

    # The same prompts one at a time give the same tokens.
    for row, (prompt, image) in enumerate(zip(prompts, images)):
        alone = processor(images=[image], text=[prompt], return_tensors="pt")
        single = model.generate(**alone, max_new_tokens=8, do_sample=False)[:, alone["input_ids"].shape[1]:]
        assert torch.equal(single[0], answers[row]), f"row {row} differs from its prompt alone"

for row, tokens in enumerate(answers):
    print(f"answer {row}:", repr(processor.decode(tokens, skip_special_tokens=True)))
