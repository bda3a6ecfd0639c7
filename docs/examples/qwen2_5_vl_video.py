"""Qwen2.5-VL on a video: keep 10% of the clip's visual tokens before the language model, with ToDRE's
diversity selection over all frames and with EVS, which keeps what changed since the previous frame."""

import tokred
from tokred.testing import make_video, tiny_model

# With the real checkpoint (the video processor needs torchvision; EVS needs the tokred-video plugin):
#   from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration
#   model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
#       "Qwen/Qwen2.5-VL-7B-Instruct", dtype="auto", attn_implementation="sdpa")
#   processor = AutoProcessor.from_pretrained("Qwen/Qwen2.5-VL-7B-Instruct")
#   clip = ...  # the sampled frames: a list of PIL images, or a [frames, height, width, 3] array
model, processor = tiny_model("qwen2_5_vl", max_video_pixels=224 * 224)  # random weights, offline
clip = make_video(frames=16, width=224, height=224)  # a synthetic clip of moving shapes

messages = [{"role": "user", "content": [
    {"type": "video"},
    {"type": "text", "text": "What moves in this video, and where does it go?"},
]}]
text = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(text=[text], videos=[clip], return_tensors="pt")
inputs.pop("video_metadata", None)  # what the processor used to write timestamps; not a model input

# 16 frames -> 8 temporal patches (Qwen merges 2 frames into one) of 8 x 8 tokens = 512 tokens.
t, h, w = inputs["video_grid_thw"][0].tolist()
print(f"video: {t} temporal patches of {h // 2} x {w // 2} tokens = {t * h * w // 4} visual tokens")

# ToDRE: a diverse 10% of the whole clip, its pivot taken over all frames; budgets are per video.
method = tokred.create("todre", keep_ratio=0.1)  # 51 of the clip's 512 tokens
with tokred.apply(model, method) as run:
    output = model.generate(**inputs, max_new_tokens=16)
video = run.report.images[0]
print(f"todre: the {video.kind} keeps {len(video.kept_final)} of {video.num_tokens}; per frame {video.kept_per_tile}")
print(f"  visual tokens per decoder layer: {[layer[0] for layer in run.report.visual_tokens_per_layer]}")
print(run.report.summary())

# EVS: the first frame whole, then the tokens that changed most since the frame before. With 25%
# (128 tokens) it keeps the first temporal patch's 64 and the 64 most changed of the others.
evs = tokred.create("evs", keep_ratio=0.25)
with tokred.apply(model, evs) as run:
    model.generate(**inputs, max_new_tokens=16)
print("evs: per frame", run.report.images[0].kept_per_tile)

# A per-frame budget instead: 25% of every temporal patch, each ranked against the one before.
per_frame = tokred.create("evs", keep_ratio=0.25, per_frame=True)
with tokred.apply(model, per_frame) as run:
    model.generate(**inputs, max_new_tokens=16)
print("evs, per_frame=True: per frame", run.report.images[0].kept_per_tile)
