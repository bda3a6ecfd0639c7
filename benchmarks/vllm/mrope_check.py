"""Offline check of the Qwen2-VL position path that vLLM's GPU runner takes (the CPU runner skips it):
provisional positions + recompute_mrope_positions == transformers' full-sequence positions, kept columns."""
import types, torch, transformers
import tokred.integrations.vllm as t; t.register()
from tokred.integrations.vllm.qwen_vl import TokredQwen2VLForConditionalGeneration as C, _media_positions
from tokred.integrations.vllm._compat import image_only
from tokred.testing import make_image
path = "/work/vllm-scratch/tiny-qwen2_vl"
proc = image_only(transformers.Qwen2VLProcessor).from_pretrained(path)
model = transformers.Qwen2VLForConditionalGeneration.from_pretrained(path).eval()
cfg = model.config
results = []
for size in [(336, 336), (448, 224), (224, 448)]:  # square, wide, tall
    content = [{"type": "image"}, {"type": "text", "text": "What is shown?"}, {"type": "image"}, {"type": "text", "text": "And here?"}]
    prompt = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = proc(text=[prompt], images=[make_image(*size, seed=1), make_image(*size, seed=2)], return_tensors="pt")
    ids = inputs["input_ids"][0]
    full, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"], attention_mask=inputs["attention_mask"])
    full = full[:, 0]  # [3, L]
    image_pos = (ids == cfg.image_token_id).nonzero().flatten()
    grids = inputs["image_grid_thw"]; m = cfg.vision_config.spatial_merge_size
    keep_cols, short_ids, feats, media, start, o = [], [], [], [], 0, 0
    runs = []
    n_per = [int(g.prod()) // m**2 for g in grids]
    for i, n in enumerate(n_per):
        first = int(image_pos[sum(n_per[:i])])
        k = max(1, n // 4)
        idx = torch.sort(torch.randperm(n, generator=torch.Generator().manual_seed(i))[:k]).values
        keep_cols += list(range(start, first)) + [first + int(j) for j in idx]
        runs.append((first, n, k, idx)); start = first + n
    keep_cols += list(range(start, len(ids)))
    expected = full[:, keep_cols]
    short = ids[keep_cols]
    # mm_features as the runner has them: offsets into the shortened prompt
    features, shift = [], 0
    for i, (first, n, k, idx) in enumerate(runs):
        features.append(types.SimpleNamespace(modality="image", mm_position=types.SimpleNamespace(offset=first - shift, length=k),
                                              data={"image_grid_thw": types.SimpleNamespace(data=grids[i])}))
        shift += n - k
        media.append(_media_positions(grids[i], m)[idx].permute(1, 0).long())
    fake = types.SimpleNamespace(config=cfg, tokred_choice=object())
    fake.iter_mm_grid_thw = types.MethodType(C.iter_mm_grid_thw, fake)
    provisional, _ = C.get_mrope_input_positions(fake, short.tolist(), features)
    embeds = [torch.cat([torch.zeros(mp.shape[1], 4), mp.permute(1, 0).float()], dim=1) for mp in media]
    _, positions, delta = C.recompute_mrope_positions(fake, short, embeds, provisional.clone(), 0)
    full_delta = int(full.max()) + 1 - len(ids)
    results.append({"size": size, "tokens": [len(ids), len(short)], "equal": bool(torch.equal(positions, expected)),
                    "decode_next_equal": int(positions.max()) + 1 == int(full.max()) + 1, "delta": [delta, int(full.max()) + 1 - len(short)]})
print(results)
