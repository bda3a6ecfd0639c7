"""vLLM + tokred (random, keep=K) vs transformers + tokred.apply on the same kept tokens: greedy tokens."""
import os, sys, time, json
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
from vanilla_parity import load_processor

def hf_tokred(path, prompt, images, n, k, positions):
    import torch, transformers, tokred
    proc = load_processor(path)
    model = transformers.AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    inputs = proc(text=[prompt], images=images, return_tensors="pt")
    schedule = tokred.create("random", keep=k).schedule().model_copy(update={"positions": positions})
    with torch.no_grad(), tokred.apply(model, schedule) as run:
        out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()

def main():
    fam, k, n = sys.argv[1], int(sys.argv[2]), 16
    path = f"/work/vllm-scratch/tiny-{fam}"
    from tokred.testing import make_image
    proc = load_processor(path)
    nimg = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    content = [{"type": "image"}] * nimg + [{"type": "text", "text": "What is shown in this image?"}]
    prompt = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    images = [make_image(seed=3 + i) for i in range(nimg)]
    ref = {p: hf_tokred(path, prompt, images, n, k, p) for p in (("original",) if fam.startswith("qwen") else ("original", "renumber"))}; ref.setdefault("renumber", None)
    from vllm import LLM, SamplingParams
    extra = {"video_pruning_rate": 0.5, "limit_mm_per_prompt": {"image": nimg, "video": 0}} if fam.startswith("qwen") else {"limit_mm_per_prompt": {"image": nimg}}
    t = time.perf_counter()
    llm = LLM(model=path, dtype="float32", max_model_len=4096, gpu_memory_utilization=0.1, seed=0, enforce_eager=True,
              hf_overrides={"tokred": {"method": "random", "keep": k}}, **extra)
    load = time.perf_counter() - t
    sp = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    res = llm.generate({"prompt": prompt, "multi_modal_data": {"image": images if nimg > 1 else images[0]}}, sp)
    got = list(res[0].outputs[0].token_ids)
    # per-request budget override: keep=2k via mm_processor_kwargs, and keep_ratio=1.0 (all)
    res2 = llm.generate([{"prompt": prompt, "multi_modal_data": {"image": images if nimg > 1 else images[0]}, "mm_processor_kwargs": {"tokred_keep": 2 * k}},
                         {"prompt": prompt, "multi_modal_data": {"image": images if nimg > 1 else images[0]}}], sp)
    ref2 = hf_tokred(path, prompt, images, n, 2 * k, "original" if fam.startswith("qwen") else "renumber")
    print(json.dumps({"family": fam, "keep": k, "images": nimg, "load_s": round(load, 1), "vllm_prompt_len": len(res[0].prompt_token_ids),
                      "equal_original": got == ref["original"], "equal_renumber": got == ref["renumber"],
                      "per_request_2k_prompt_len": len(res2[0].prompt_token_ids), "per_request_2k_equal": list(res2[0].outputs[0].token_ids) == ref2,
                      "default_again_equal": list(res2[1].outputs[0].token_ids) == got,
                      "vllm": got, "hf_original": ref["original"], "hf_renumber": ref["renumber"]}))

if __name__ == "__main__":
    main()
