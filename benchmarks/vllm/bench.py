"""Load time and throughput of 32 LLaVA requests (one image each), unreduced vs tokred random keep=64."""
import os, sys, time, json

def main():
    keep = int(sys.argv[1]); eager = sys.argv[2] == "eager"
    from tokred.testing import make_image
    from vllm import LLM, SamplingParams
    path = "/work/vllm-scratch/tiny-llava"
    t = time.perf_counter()
    kw = {"hf_overrides": {"tokred": {"method": "random", "keep": keep}}} if keep else {}
    llm = LLM(model=path, dtype="float32", max_model_len=2048, gpu_memory_utilization=0.1, seed=0, enforce_eager=eager,
              limit_mm_per_prompt={"image": 1}, **kw)
    load = time.perf_counter() - t
    prompt = "USER: <image>\nWhat is shown in this image? ASSISTANT:"
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    reqs = [{"prompt": prompt, "multi_modal_data": {"image": make_image(seed=100 + i)}} for i in range(32)]
    llm.generate(reqs[:2], sp, use_tqdm=False)  # warm-up
    reqs = [{"prompt": prompt, "multi_modal_data": {"image": make_image(seed=200 + i)}} for i in range(32)]
    t = time.perf_counter(); res = llm.generate(reqs, sp, use_tqdm=False); dt = time.perf_counter() - t
    print(json.dumps({"keep": keep, "eager": eager, "mp": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1"), "load_s": round(load, 1),
                      "requests": 32, "seconds": round(dt, 2), "req_per_s": round(32 / dt, 2),
                      "prompt_tokens": sum(len(r.prompt_token_ids) for r in res), "output_tokens": sum(len(r.outputs[0].token_ids) for r in res)}))

if __name__ == "__main__":
    main()
