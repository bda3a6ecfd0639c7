"""``cdpruner``: CDPruner, instruction-conditioned diversity by a conditional DPP (Zhang et al., NeurIPS 2025).

Stage I, before the language model: the kept tokens maximise the determinant of a DPP kernel that
combines the tokens' feature similarity with their relevance to the instruction. Code:
``Theia-4869/CDPruner@9541616c40fcd5625de1cdb8ea6c33c129eb7864``, ``llava/model/llava_arch.py``
``encode_images`` 140-187 (kernel and greedy), ``llava/model/multimodal_encoder/clip_encoder.py``
38-97 (the CLIP embeddings of the relevance). What the code does, which we follow:

* **similarity** (148-153): the projected features (after the projector), rows L2-normalised, in
  float32, ``S = X_n X_n^T``;
* **relevance** (155-160): ``rel_i = mean_m(-cos(image_i, text_m))`` over the instruction's
  embeddings, the **negative** cosine, then ``(rel - min + 1e-6) / (max - min)`` over the whole image;
* **kernel** (167): ``L = diag(rel) S diag(rel)``; the theta-weighted ``exp(alpha rel)`` is commented
  out in the code (163-166), so the default uses ``rel`` as is (option ``theta`` switches it on);
* **greedy MAP** (169-181, Chen et al. 2018's fast greedy): ``T`` steps, each taking ``argmax`` of
  the remaining marginal gains ``d^2`` (the first on ties) and updating them by the Cholesky row;
* the kept tokens in sequence order (183-185).

Where tokred's contract or model differ:

* **the relevance space** (**ours**): the code embeds the question with CLIP's text tower and the
  patches with CLIP's ``visual_projection``; Hugging Face LLaVA checkpoints hold neither. tokred
  uses what every model has: the cosine between the projected visual tokens and the language
  model's input embeddings of the instruction text (``tokens.instruction_embeddings``, one row per
  token where the code has one per 77-token CLIP segment). :func:`cdpruner_relevance` computes the
  code's relevance from whatever embeddings it is given, so it reproduces the code on CLIP
  embeddings (tested against the authors' fixtures);
* **exhausted kernels** (**ours**): the code has no stopping rule; when the kernel's rank is below
  ``T`` its gains reach zero (up to rounding), ``sqrt`` gives NaN and indices repeat. The greedy
  here stops adding by gain once the largest remaining gain is at most ``1e-6`` of the largest
  initial one (or not finite) and takes the remaining tokens by decreasing relevance (ties to the
  lower index), so exactly ``T`` distinct tokens are kept;
* a sample without instruction text, or an image whose relevance is constant, gets relevance 1 for
  every token (**ours**: the code would divide by zero), i.e. plain DPP diversity;
* LLaVA-NeXT: the code keeps ``T`` per crop (base and tiles) with the relevance normalised over all
  crops together, and always keeps the newline tokens. ``spread="tiles"`` (default) keeps a share
  of the budget per tile, each tile normalised on its own (**ours**); with tokred's default
  ``newline_tokens="keep"`` newline tokens always stay, as in the code.

The selector lists ``"instruction_embeddings"`` among its inputs: its choice depends on the prompt's
text, so a cache-free ``generate`` (every step a new prefill on a longer text) may choose differently
at each step.

Cost: the ``N x N`` kernel, ``O(N^2 D)`` time and ``O(N^2)`` memory, then ``O(T^2 N)`` for the greedy.
"""

from __future__ import annotations

from typing import ClassVar, Literal, TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: `tokred list` starts without it
    import torch
from pydantic import Field
from tokred import BudgetOptions, Method, Schedule, Selector, SelectorStage, VisualTokens
from tokred.components import top_k_indices
from tokred.options import Number

from ._common import PositionsOption

__all__ = ["cdpruner_relevance", "cdpruner_kernel", "dpp_greedy", "CDPrunerSelector", "CDPrunerMethod"]


def cdpruner_relevance(image_embeds: torch.Tensor, text_embeds: torch.Tensor, *, theta: float | None = None) -> torch.Tensor:
    """The code's relevance (``llava_arch.py`` 155-166) of every token to the instruction.

    Args:
        image_embeds: ``[N, C]`` or ``[B, N, C]`` (the crops of one image) token embeddings.
        text_embeds: ``[M, C]`` instruction embeddings (CLIP text segments in the code).
        theta: ``None`` (the code's default) or the commented-out trade-off in ``(0, 1)``:
            ``exp(theta / (2 (1 - theta)) * rel)``.

    Returns:
        ``image_embeds.shape[:-1]`` float32: ``mean_m(-cos)``, min-max normalised over every token
        given (all crops together) as ``(rel - min + 1e-6) / (max - min)``. Constant relevance (or
        ``M = 0``) gives ones (ours).
    """
    import torch

    image = image_embeds.detach().float()
    text = text_embeds.detach().float().to(image.device)
    if text.shape[0] == 0:
        return torch.ones(image.shape[:-1], dtype=torch.float32, device=image.device)
    image = image / image.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    text = text / text.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    relevance = (-(image @ text.T)).mean(dim=-1)                               # [..., N]
    spread = relevance.max() - relevance.min()
    if not bool(spread > 0):
        return torch.ones_like(relevance)
    relevance = (relevance - relevance.min() + 1e-6) / spread
    if theta is not None:
        relevance = torch.exp(theta / (2 * (1 - theta)) * relevance)
    return relevance


def cdpruner_kernel(features: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """``[N, N]`` float32 kernel ``diag(rel) S diag(rel)`` with ``S`` the cosine similarities of
    ``features`` ``[N, D]`` (``llava_arch.py`` 148-153 and 167)."""
    x = features.detach()
    x = (x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)).float()
    similarity = x @ x.T
    rel = relevance.float().to(similarity.device)
    return rel[:, None] * similarity * rel[None, :]


def dpp_greedy(kernel: torch.Tensor, k: int, *, fallback: torch.Tensor | None = None) -> torch.Tensor:
    """Fast greedy MAP inference of a DPP (Chen et al. 2018; ``llava_arch.py`` 169-181).

    Args:
        kernel: ``[N, N]`` positive semi-definite kernel.
        k: tokens to choose, ``0 <= k <= N``.
        fallback: ``[N]`` scores used once no gain above ``1e-6`` of the largest initial gain is
            left, or the gains are not finite (ours: the code has no such guard and, on a kernel of
            rank below ``k``, divides by square roots of rounding noise, then produces NaN and
            repeated indices); default the kernel's diagonal.

    Returns:
        ``[k]`` long, in the order chosen, distinct.
    """
    import torch

    n = int(kernel.shape[0])
    if not 0 <= k <= n:
        raise ValueError(f"k must lie in 0..{n}, got {k}")
    kernel = kernel.float()
    chosen = torch.empty(k, dtype=torch.long, device=kernel.device)
    cis = torch.zeros(k, n, dtype=kernel.dtype, device=kernel.device)        # [T, N]
    gains = torch.diagonal(kernel).clone()                                    # [N]
    floor = 1e-6 * float(gains.max()) if n else 0.0
    taken = torch.zeros(n, dtype=torch.bool, device=kernel.device)
    for i in range(k):
        j = int(torch.argmax(gains))
        best = gains[j]
        if not bool(torch.isfinite(best)) or not bool(best > floor):
            rest = (torch.diagonal(kernel) if fallback is None else fallback.float().to(kernel.device)).clone().cpu()
            rest[taken.cpu()] = float("-inf")
            chosen[i:] = top_k_indices(rest, k - i).to(chosen.device)
            break
        chosen[i] = j
        taken[j] = True
        e = (kernel[j] - torch.einsum("t,tn->n", cis[:i, j], cis[:i])) / torch.sqrt(best)
        cis[i] = e
        gains -= e.square()
        gains[j] = float("-inf")
    return chosen


class CDPrunerSelector(Selector):
    """CDPruner (Zhang et al., NeurIPS 2025): keep the ``k`` tokens the greedy conditional DPP
    chooses from the projected features and their relevance to the instruction.

    ``select(tokens, k)``: relevance :func:`cdpruner_relevance` of ``tokens.features`` ``[N, D]`` to
    ``tokens.instruction_embeddings`` ``[T, D]`` (``relevance="instruction"``) or ones
    (``relevance="none"``), kernel :func:`cdpruner_kernel`, :func:`dpp_greedy`; the runtime restores
    spatial order.
    """

    inputs: ClassVar[frozenset[str]] = frozenset({"instruction_embeddings"})

    relevance: Literal["instruction", "none"] = Field(
        "instruction",
        description="'instruction': relevance to the language model's embeddings of the instruction text (ours, in "
        "place of the code's CLIP text embeddings); 'none': plain DPP diversity.",
    )
    theta: Number | None = Field(
        None, gt=0.0, lt=1.0,
        description="None (the code's default) or the commented-out trade-off theta in (0, 1): relevance "
        "exp(theta / (2 (1 - theta)) * rel).",
    )

    def select(self, tokens: VisualTokens, k: int) -> torch.Tensor:
        import torch

        if k == tokens.num_tokens:
            return torch.arange(k)
        instruction = tokens.instruction_embeddings
        if self.relevance == "none" or instruction is None:
            instruction = tokens.features[:0]
        relevance = cdpruner_relevance(tokens.features, instruction, theta=self.theta)     # [N]
        return dpp_greedy(cdpruner_kernel(tokens.features, relevance), k, fallback=relevance).cpu()


class CDPrunerMethod(PositionsOption, BudgetOptions, Method):
    """CDPruner: a conditional DPP over the projected visual tokens, weighted by relevance to the instruction, before the LLM (Zhang et al., NeurIPS 2025).

    Options: ``keep`` / ``keep_ratio`` (default ``keep_ratio=0.111``, 64 of 576: the paper's
    headline setting), ``relevance`` (``"instruction"``), ``theta`` (``None``), ``spread``
    (``"tiles"``: a share per tile, as the code keeps ``T`` per crop) and ``positions``.
    """

    default_keep_ratio = 0.111

    spread: Literal["image", "tiles"] = Field(
        "tiles",
        description="'tiles' (default: each tile and the thumbnail reduced on its own with a proportional share, as the "
        "code keeps T tokens per crop) or 'image' (one DPP over all of an image's tokens).",
    )
    relevance: Literal["instruction", "none"] = Field(
        "instruction", description="'instruction' (relevance to the instruction embeddings; ours) or 'none' (no relevance)."
    )
    theta: Number | None = Field(None, gt=0.0, lt=1.0, description="None (the code's default) or the trade-off theta in (0, 1).")

    def schedule(self) -> Schedule:
        selector = CDPrunerSelector(relevance=self.relevance, theta=self.theta)
        return Schedule(selector=SelectorStage(selector=selector, budget=self.budget), positions=self.positions)
