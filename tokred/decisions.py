"""What to keep, engine-neutral: stage I for one image, and one gate's choice for one sample.

These functions know nothing about hooks, caches or ``transformers``: they take the tokens of one
image (:class:`~tokred.VisualTokens`) or one sample's state at a layer (:class:`~tokred.GateState`)
and a stage of a :class:`~tokred.Schedule`, and return what stays, with every contract check of
:mod:`tokred.components` applied. tokred's ``transformers`` runtime calls them from its hooks;
another engine (the vLLM integration) calls the same functions, so that a method keeps the same
tokens wherever it runs.

* :func:`select_image_tokens`: the budget resolved for the image (``Budget.tokens_for``), split over
  tiles with ``spread="tiles"`` (the selector then runs on every tile as an image of its own), the
  Selector called, its result checked, replacement features kept aligned, spatial order restored.
* :func:`gate_budget` and :func:`decide_gate`: a gate's per-image (and per-tile) budget at a layer,
  and its checked choice.
* :func:`check_image_budgets`: every stage's budget for an image of ``N`` tokens, in order, and the
  selector's own option checks (:meth:`Selector.validate`).
* :func:`image_record`: the report's record of one image after stage I.

Errors a component causes are :class:`~tokred.errors.MethodContractError`; their messages name the
component through ``describe`` (the registry's :meth:`~tokred.Registry.describe` in a run: the
registered name, the plugin and its distribution).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

from .budget import Budget, split_proportionally
from .components import Gate, Selector
from .errors import BudgetError, MethodContractError
from .report import ImageRecord
from .tokens import GateState, ImageLayout, Selection, VisualTokens

if TYPE_CHECKING:
    import torch

    from .schedule import Schedule, SelectorStage

__all__ = [
    "select_image_tokens", "check_selection", "gate_budget", "decide_gate", "check_gate_choice",
    "check_image_budgets", "image_record", "Describe",
]

#: ``describe(component) -> str``: how error messages name a selector or gate.
Describe = Callable[[object], str]


def _class_name(component: object) -> str:
    return type(component).__name__


def _integer_tensor(value: object) -> bool:
    import torch

    return isinstance(value, torch.Tensor) and value.dim() == 1 and value.dtype in (torch.long, torch.int32, torch.int64)


# ------------------------------------------------------------------------------- stage I


def select_image_tokens(stage: SelectorStage, tokens: VisualTokens, *, describe: Describe = _class_name) -> Selection:
    """Stage I for one image: the tokens to keep, in spatial order.

    Args:
        stage: the schedule's selector and its budget.
        tokens: the image's ``N`` visual tokens.
        describe: names the selector in error messages.

    Returns:
        A :class:`~tokred.Selection` of ``k = stage.budget.tokens_for(N)`` increasing indices; its
        ``features`` (``[k, D]``, aligned with the indices) are the selector's replacement features,
        or ``None`` when it merged nothing.
    """
    n = tokens.num_tokens
    k = stage.budget.tokens_for(n)
    if stage.budget.spread == "tiles" and tokens.layout.num_tiles > 1:
        return _select_per_tile(stage.selector, tokens, k, describe)
    return check_selection(describe(stage.selector), _call_select(stage.selector, tokens, k, describe), n, k,
                           int(tokens.features.shape[-1]))


def _call_select(selector: Selector, tokens: VisualTokens, k: int, describe: Describe) -> object:
    try:
        return selector.select(tokens, k)
    except MethodContractError as exc:  # raised by the base class's checks of score(): name the selector
        raise MethodContractError(f"{describe(selector)}: {exc}") from None


def _select_per_tile(selector: Selector, tokens: VisualTokens, k: int, describe: Describe) -> Selection:
    """``Budget(spread="tiles")``: ``k`` split over the tiles in proportion to their token counts,
    and the selector run on every tile as if it were an image of its own."""
    import torch

    layout = tokens.layout
    views = [layout.tile_view(tile) for tile in range(layout.num_tiles)]
    shares = split_proportionally(k, [index.numel() for index, _ in views])
    kept: list[torch.Tensor] = []
    features: list[torch.Tensor] = []
    merged = False
    dim = int(tokens.features.shape[-1])
    for (index, tile_layout), share in zip(views, shares):
        if share == 0:
            continue
        device_index = index.to(tokens.features.device)
        part = VisualTokens(
            features=tokens.features[device_index],
            layout=tile_layout,
            pre_projector=None if tokens.pre_projector is None else tokens.pre_projector[index.to(tokens.pre_projector.device)],
            cls_attention=None if tokens.cls_attention is None else tokens.cls_attention[index.to(tokens.cls_attention.device)],
            sample_index=tokens.sample_index,
            image_index=tokens.image_index,
            instruction_embeddings=tokens.instruction_embeddings,
            vision_keys=None if tokens.vision_keys is None else tokens.vision_keys[index.to(tokens.vision_keys.device)],
            project=tokens.project,
        )
        chosen = check_selection(describe(selector), _call_select(selector, part, share, describe), index.numel(), share, dim)
        kept.append(index[chosen.indices])
        merged |= chosen.features is not None
        features.append(chosen.features if chosen.features is not None else part.features[chosen.indices.to(device_index.device)])
    indices = torch.cat(kept)
    order = torch.argsort(indices)
    return Selection(indices[order], torch.cat(features)[order.to(tokens.features.device)] if merged else None)


def check_selection(name: str, result: object, n: int, k: int, dim: int) -> Selection:
    """A selector's result (indices ``[k]`` or a :class:`~tokred.Selection`) validated and sorted
    into spatial order: exactly ``k`` unique indices in ``0..n-1``, features ``[k, dim]`` if any.
    ``name`` names the selector in the :class:`~tokred.errors.MethodContractError`."""
    import torch

    selection = result if isinstance(result, Selection) else Selection(result)  # type: ignore[arg-type]
    indices = selection.indices
    if not _integer_tensor(indices):
        raise MethodContractError(f"{name}: select() must return a 1-D integer tensor of indices, got {indices!r:.80}")
    indices = indices.detach().long().cpu()
    if indices.numel() != k:
        raise MethodContractError(f"{name}: select() returned {indices.numel()} indices; the budget is exactly {k}")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= n):
        raise MethodContractError(f"{name}: select() returned indices outside 0..{n - 1}")
    if torch.unique(indices).numel() != indices.numel():
        raise MethodContractError(f"{name}: select() returned duplicate indices")
    order = torch.argsort(indices)
    features = selection.features
    if features is not None:
        if features.shape != (k, dim):
            raise MethodContractError(f"{name}: select() returned features of shape {tuple(features.shape)}, expected ({k}, {dim})")
        features = features[order.to(features.device)]
    return Selection(indices[order], features)


def check_image_budgets(schedule: Schedule, gate_layers: Sequence[int], num_tokens: int, what: str) -> None:
    """Every stage's budget for an image of ``num_tokens`` candidates, each within what the stage
    before keeps, and the selector's own checks (:meth:`Selector.validate`; per tile with
    ``spread="tiles"``, which the caller checks where tiles are known). Raises
    :class:`~tokred.errors.BudgetError` / :class:`~tokred.errors.OptionsError` naming ``what``."""
    stages: list[tuple[str, Budget | None]] = []
    if schedule.selector is not None:
        stages.append(("selector", schedule.selector.budget))
        if schedule.selector.budget.spread != "tiles":
            schedule.selector.selector.validate(num_tokens)
    stages += [(f"gate at layer {layer}", g.budget) for layer, g in zip(gate_layers, schedule.gates)]
    alive = num_tokens
    for stage, budget in stages:
        if budget is None:
            continue
        k = budget.tokens_for(num_tokens, what=f"image ({stage}; {what})")
        if k > alive:
            raise BudgetError(f"the {stage} keeps {k} visual tokens per image but only {alive} survive the stage before ({what})")
        alive = k


def image_record(sample: int, image: int, layout: ImageLayout, kept: torch.Tensor) -> ImageRecord:
    """The report's record of one image or video after stage I (``kept``: ``[k]`` increasing
    indices)."""
    import torch

    tiles = layout.tile
    return ImageRecord(
        sample, image, layout.num_tokens, kept.tolist(), kept.tolist(),
        tile_sizes=torch.bincount(tiles, minlength=layout.num_tiles).tolist(),
        thumbnail_tile=layout.thumbnail_tile if layout.num_tiles > 1 else None,
        kept_per_tile=torch.bincount(tiles[kept], minlength=layout.num_tiles).tolist(),
        kind="video" if layout.is_video else "image",
    )


# ------------------------------------------------------------------------------- stage II


def gate_budget(budget: Budget | None, image_sizes: Sequence[int], visual_image: torch.Tensor,
                visual_tile: torch.Tensor, tile_counts: Sequence[int], *, layer: int,
                sample: int) -> tuple[list[int] | None, list[list[int]] | None]:
    """``(keep_per_image, keep_per_tile)`` of a gate at ``layer`` for one sample.

    ``image_sizes``: each image's token count ``N_i`` (budgets are relative to it);
    ``visual_image`` / ``visual_tile`` ``[V]``: image and tile of each alive visual token;
    ``tile_counts``: tiles per image. With ``spread="tiles"`` an image's budget is split in
    proportion to the tokens each tile still has at this layer, so that no tile is asked for more
    than earlier stages left it. ``(None, None)`` for a gate without a budget."""
    import torch

    if budget is None:
        return None, None
    keep_per_image = []
    for image, size in enumerate(image_sizes):
        k = budget.tokens_for(size)
        alive = int((visual_image == image).sum())
        if k > alive:
            raise BudgetError(
                f"gate at layer {layer} keeps {k} tokens of image {image} (sample {sample}) but only "
                f"{alive} are alive there after earlier stages"
            )
        keep_per_image.append(k)
    if budget.spread != "tiles":
        return keep_per_image, None
    keep_per_tile = [
        split_proportionally(k, torch.bincount(visual_tile[visual_image == image], minlength=tiles).tolist())
        for image, (k, tiles) in enumerate(zip(keep_per_image, tile_counts))
    ]
    return keep_per_image, keep_per_tile


def decide_gate(gate: Gate, state: GateState, *, describe: Describe = _class_name) -> torch.Tensor:
    """The alive-relative indices (``[k]``, increasing) of the visual tokens ``gate`` keeps for
    one sample, checked (:func:`check_gate_choice`). Runs without autograd: a decision never builds
    a graph on attention."""
    import torch

    with torch.no_grad():
        try:
            chosen = gate.select(state)
        except MethodContractError as exc:  # the base class's checks of score(): name the gate
            raise MethodContractError(f"{describe(gate)}: {exc}") from None
        return check_gate_choice(describe(gate), chosen, state)


def check_gate_choice(name: str, chosen: object, state: GateState) -> torch.Tensor:
    """A gate's choice validated: unique alive-relative indices in range, exactly
    ``state.keep_per_image`` per image (and ``keep_per_tile`` per tile) when the gate has a budget;
    returned sorted. ``name`` names the gate in the :class:`~tokred.errors.MethodContractError`."""
    import torch

    if not _integer_tensor(chosen):
        raise MethodContractError(f"{name}: select() must return a 1-D integer tensor of indices, got {chosen!r:.80}")
    chosen = chosen.detach().long().cpu()  # type: ignore[union-attr]
    v = state.num_visual
    if chosen.numel() and (int(chosen.min()) < 0 or int(chosen.max()) >= v):
        raise MethodContractError(f"{name}: select() returned indices outside 0..{v - 1}")
    if torch.unique(chosen).numel() != chosen.numel():
        raise MethodContractError(f"{name}: select() returned duplicate indices")
    if state.keep_per_image is not None:
        counts = torch.bincount(state.visual_image[chosen], minlength=len(state.keep_per_image)).tolist()
        if counts != list(state.keep_per_image):
            raise MethodContractError(f"{name}: select() kept {counts} tokens per image; the budget is exactly {state.keep_per_image}")
    if state.keep_per_tile is not None and state.visual_tile is not None:
        for image, wanted in enumerate(state.keep_per_tile):
            tiles = state.visual_tile[chosen][state.visual_image[chosen] == image]
            counts = torch.bincount(tiles, minlength=len(wanted)).tolist()
            if counts != list(wanted):
                raise MethodContractError(
                    f"{name}: select() kept {counts} tokens per tile of image {image}; the budget spread over tiles is "
                    f"exactly {wanted} (a gate that overrides select() must honour state.keep_per_tile)"
                )
    return torch.sort(chosen).values
