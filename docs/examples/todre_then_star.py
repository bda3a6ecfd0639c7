"""ToDRE's diversity selector as stage I, STAR's cross-attention gate as stage II: a Schedule built
from components that two different plugins registered, addressed by their registered names."""

import json

import tokred
from tokred import Budget, GateStage, Schedule, SelectorStage
from tokred.testing import make_image, tiny_model

# With the real checkpoint (needs both plugins: pip install -e plugins/todre -e plugins/star):
#   from transformers import AutoProcessor, LlavaForConditionalGeneration
#   model = LlavaForConditionalGeneration.from_pretrained(
#       "llava-hf/llava-1.5-7b-hf", dtype="auto", attn_implementation="sdpa")
#   processor = AutoProcessor.from_pretrained("llava-hf/llava-1.5-7b-hf")
model, processor = tiny_model("llava")  # stands in for the lines above: random weights, offline

registry = tokred.default_registry()
schedule = Schedule(
    # Stage I (ToDRE, arXiv 2505.18757): 128 diverse tokens of each image's 576 enter the LLM.
    selector=SelectorStage(selector=registry.selector("todre.diversity"), budget=Budget(keep=128)),
    # Stage II (STAR, arXiv 2505.12359): from a quarter of the depth on, the 64 of them that the
    # instruction text attends to most.
    gates=(GateStage(layer="1/4", gate=registry.gate("star.cross_attention"), budget=Budget(keep=64)),),
)

# A Schedule is a value: it serialises with the components' registered names and options.
saved = json.dumps(schedule.to_dict())
assert Schedule.from_dict(json.loads(saved)) == schedule
print(saved)

messages = [{"role": "user", "content": [
    {"type": "image"},
    {"type": "text", "text": "How many shapes are there?"},
]}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=[make_image(seed=4)], text=[prompt], return_tensors="pt")

with tokred.apply(model, schedule) as run:
    output = model.generate(**inputs, max_new_tokens=16)

print(run.report.summary())
per_layer = [layer[0] for layer in run.report.visual_tokens_per_layer]
print("visual tokens per decoder layer:", per_layer)  # 128 before the gate layer, 64 from it on
