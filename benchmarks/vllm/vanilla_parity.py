"""Stock vLLM vs transformers: greedy tokens of the tiny checkpoints on the same prompt/image."""
import os, sys, time, json
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

def load_processor(path):
    import transformers
    from tokred.integrations.vllm._compat import image_only
    cls = transformers.AutoConfig.from_pretrained(path).model_type
    if cls.startswith("qwen"):
        return image_only(getattr(transformers, {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}[cls])).from_pretrained(path)
    return transformers.AutoProcessor.from_pretrained(path)

def hf_greedy(path, prompt_text, image, n):
    import torch, transformers
    proc = load_processor(path)
    model = transformers.AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    inputs = proc(text=[prompt_text], images=[image], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False, min_new_tokens=n)
    return inputs["input_ids"][0].tolist(), out[0, inputs["input_ids"].shape[1]:].tolist(), type(proc).__name__

def main():
    fam = sys.argv[1]; n = 16
    from tokred.integrations.vllm.checkpoints import save_tiny_checkpoint
    from tokred.testing import make_image
    # vLLM's CPU attention has no head_dim-16 kernel: 128 wide / 4 heads = 32.
    over = {"hidden_size": 128, **({"mrope_section": (4, 6, 6)} if fam.startswith("qwen") else {})}
    path = str(save_tiny_checkpoint(fam, f"/work/vllm-scratch/tiny-{fam}", **over))
    proc = load_processor(path)
    prompt = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown in this image?"}]}], add_generation_prompt=True)
    image = make_image(seed=3)
    hf_prompt, hf_out, pname = hf_greedy(path, prompt, image, n)
    from vllm import LLM, SamplingParams
    t = time.perf_counter()
    llm = LLM(model=path, dtype="float32", max_model_len=2048, gpu_memory_utilization=0.1, seed=0, limit_mm_per_prompt={"image": 1, **({"video": 0} if fam.startswith("qwen") else {})})
    load = time.perf_counter() - t
    res = llm.generate({"prompt": prompt, "multi_modal_data": {"image": image}}, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    v_prompt, v_out = list(res[0].prompt_token_ids), list(res[0].outputs[0].token_ids)
    print(json.dumps({"family": fam, "processor": pname, "load_s": round(load, 1), "prompt_equal": v_prompt == hf_prompt,
                      "prompt_len": [len(hf_prompt), len(v_prompt)], "tokens_equal": v_out == hf_out, "hf": hf_out, "vllm": v_out}))

if __name__ == "__main__":
    main()
