"""Accuracy of the SYNTHETIC PROXY on full and reduced visual inputs, measured by hand.

A *selection* maps a batch to the visual tokens each row keeps (``[B, k]`` sorted indices into the
256). The language model then sees only those, at their original positions, from its first layer
(stage I), or, with ``prune_layer=K``, all 256 in layers ``0 .. K-1`` and only the kept ones from
layer ``K`` on (stage II, as FastV does). Answers are the argmax of the first generated token's
logits over the whole vocabulary, which is what greedy ``generate`` returns first.

The selections here are reference points for this synthetic task, written for the measurement
and independent of tokred's runtime: an object-patch oracle, random, largest L2 norm, max-min
cosine diversity (k-center) and FastV-like last-token attention. Their figures rank methods on this
task only; they are not the papers' benchmarks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import transformers
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from ._inputs import NUM_VISUAL, Batch, assemble, encode_prompts, pixel_values, project, visual_features
from ._scenes import KINDS, ProxyItem

__all__ = [
    "Context", "Selection", "Scores", "evaluate", "predictions", "accuracy_by_kind", "select_oracle", "select_random",
    "select_l2", "select_kcenter", "select_last_token_attention", "last_token_attention",
]


@dataclass
class Context:
    """What a selection may read for one batch: ``items`` (``B``), ``features`` ``[B, 256, D_v]``
    (pre-projector), ``visual`` ``[B, 256, D]`` (projected), ``model``, ``full`` (the unreduced
    :class:`Batch`)."""

    items: Sequence[ProxyItem]
    features: torch.Tensor
    visual: torch.Tensor
    model: transformers.LlavaForConditionalGeneration
    full: Batch


#: ``Context -> [B, k]`` sorted kept indices.
Selection = Callable[[Context], torch.Tensor]


@dataclass
class Scores:
    """Correct answers and totals, overall and per question type."""

    correct: dict[str, int] = field(default_factory=dict)
    total: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, hit: bool) -> None:
        for key in ("all", kind):
            self.correct[key] = self.correct.get(key, 0) + int(hit)
            self.total[key] = self.total.get(key, 0) + 1

    def accuracy(self) -> dict[str, float]:
        """``{"all": ..., "colour": ..., ...}`` in [0, 1], kinds in :data:`KINDS` order."""
        keys = ["all"] + [k for k in KINDS if k in self.total]
        return {k: self.correct[k] / self.total[k] for k in keys}


def _item_generator(item: ProxyItem, salt: int) -> torch.Generator:
    # Per-item seeding: a row's random choice does not depend on its batch.
    return torch.Generator().manual_seed((item.seed * 1_000_003 + salt) % (1 << 63))


def select_random(k: int, seed: int = 0) -> Selection:
    """``k`` uniformly random tokens per image, seeded by the item and ``seed``."""

    def select(ctx: Context) -> torch.Tensor:
        return torch.stack([torch.randperm(NUM_VISUAL, generator=_item_generator(it, seed))[:k].sort().values
                            for it in ctx.items])

    return select


def select_oracle(k: int, seed: int = 0) -> Selection:
    """The asked object's patches (the ``k`` it covers most, if it covers more), filled up with
    uniformly random other tokens."""

    def select(ctx: Context) -> torch.Tensor:
        rows = []
        for it in ctx.items:
            cover = it.coverage[it.target]
            target = sorted(it.target_tokens, key=lambda t: (-int(cover[t]), t))[:k]
            rest = [int(t) for t in torch.randperm(NUM_VISUAL, generator=_item_generator(it, seed)) if int(t) not in target]
            rows.append(torch.tensor(sorted(target + rest[:k - len(target)])))
        return torch.stack(rows)

    return select


def select_l2(k: int) -> Selection:
    """The ``k`` projected visual tokens with the largest L2 norm."""

    def select(ctx: Context) -> torch.Tensor:
        return ctx.visual.norm(dim=-1).topk(k, dim=-1).indices.sort(dim=-1).values

    return select


def select_kcenter(k: int, on: str = "visual") -> Selection:
    """Greedy max-min cosine diversity (k-center, farthest point; DivPrune / ToDRE v1 style) on the
    projected tokens (``on="visual"``) or the pre-projector features (``on="features"``). Our
    choice of first token: the one with the largest summed cosine distance to all others."""

    def select(ctx: Context) -> torch.Tensor:
        x = ctx.visual if on == "visual" else ctx.features
        x = torch.nn.functional.normalize(x, dim=-1)
        dist = 1 - x @ x.transpose(1, 2)  # [B, 256, 256]
        rows = []
        for d in dist:
            chosen = [int(d.sum(dim=-1).argmax())]
            nearest = d[chosen[0]].clone()
            for _ in range(k - 1):
                nearest[chosen] = -1.0
                nxt = int(nearest.argmax())
                chosen.append(nxt)
                nearest = torch.minimum(nearest, d[nxt])
            rows.append(torch.tensor(sorted(chosen)))
        return torch.stack(rows)

    return select


def last_token_attention(model: transformers.LlavaForConditionalGeneration, batch: Batch, layer: int) -> torch.Tensor:
    """``[B, k]``: attention the last prompt token pays each visual slot of ``batch`` in decoder
    ``layer`` (0-based), softmax over all keys it sees, mean over heads."""
    lm = model.model.language_model
    h = batch.inputs_embeds
    cos, sin = lm.rotary_emb(h, batch.position_ids)
    rows = torch.arange(h.shape[0])
    for i, block in enumerate(lm.layers):
        if i == layer:
            attn = block.self_attn
            x = block.input_layernorm(h)
            shape = (*x.shape[:-1], -1, attn.head_dim)
            q = attn.q_proj(x).view(shape).transpose(1, 2)
            key = attn.k_proj(x).view(shape).transpose(1, 2)
            q, key = apply_rotary_pos_emb(q, key, cos, sin)
            key = key.repeat_interleave(attn.num_key_value_groups, dim=1)  # [B, H, L, hd]
            q_last = q[rows, :, batch.last]  # [B, H, hd]
            scores = torch.einsum("bhd,bhld->bhl", q_last, key) * attn.scaling
            positions = torch.arange(h.shape[1])
            scores = scores.masked_fill((positions[None, None, :] > batch.last[:, None, None]), float("-inf"))
            probs = scores.softmax(dim=-1).mean(dim=1)  # [B, L]
            return probs.gather(1, batch.visual_slots)
        h = block(h, attention_mask=None, position_ids=batch.position_ids, position_embeddings=(cos, sin))
    raise ValueError(f"layer {layer} out of range for {len(lm.layers)} layers")


def select_last_token_attention(k: int, layer: int = 1) -> Selection:
    """FastV-like: the ``k`` visual tokens the last prompt token attends to most in decoder
    ``layer`` (FastV with K = 2 ranks by layer 1's attention and prunes from layer 2 on), computed
    on the unreduced sequence."""

    def select(ctx: Context) -> torch.Tensor:
        return last_token_attention(ctx.model, ctx.full, layer).topk(k, dim=-1).indices.sort(dim=-1).values

    return select


def _pruned_logits(model: transformers.LlavaForConditionalGeneration, batch: Batch, keep: torch.Tensor | None = None,
                   prune_layer: int = 0) -> torch.Tensor:
    """``[B, V]`` first-token logits of ``batch`` run layer by layer; with ``keep`` (``[B, k]``
    indices into each row's visual slots), only those visual tokens go on from decoder layer
    ``prune_layer`` (rows stay right-padded; causal attention never reaches the padding, so no mask
    is needed)."""
    lm = model.model.language_model
    h = batch.inputs_embeds
    pos = batch.position_ids
    cos, sin = lm.rotary_emb(h, pos)
    last = batch.last
    for i, block in enumerate(lm.layers):
        if keep is not None and i == prune_layer:
            index_rows = []
            for b in range(h.shape[0]):
                slots = batch.visual_slots[b]
                alive = torch.ones(h.shape[1], dtype=torch.bool)
                alive[slots] = False
                alive[slots[keep[b]]] = True
                index_rows.append(torch.nonzero(alive[: int(last[b]) + 1]).flatten())
            width = max(len(r) for r in index_rows)
            index = torch.stack([torch.cat([r, r[-1:].expand(width - len(r))]) for r in index_rows])  # [B, L']
            h = h.gather(1, index[..., None].expand(-1, -1, h.shape[-1]))
            pos = pos.gather(1, index)
            cos = cos.gather(1, index[..., None].expand(-1, -1, cos.shape[-1]))
            sin = sin.gather(1, index[..., None].expand(-1, -1, sin.shape[-1]))
            last = torch.tensor([len(r) - 1 for r in index_rows])
        h = block(h, attention_mask=None, position_ids=pos, position_embeddings=(cos, sin))
    h = lm.norm(h)
    return model.lm_head(h[torch.arange(h.shape[0]), last])


def _answers(model: transformers.LlavaForConditionalGeneration, processor: transformers.LlavaProcessor,
             items: Sequence[ProxyItem], selection: Selection | None, prune_layer: int | None,
             batch_size: int) -> list[str]:
    """The predicted answer word of every item (first-token argmax over the vocabulary)."""
    tokenizer = processor.tokenizer
    words: list[str] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        feats = visual_features(model, pixel_values([it.image for it in chunk]))
        visual = project(model, feats)
        prompts = encode_prompts(processor, [it.question for it in chunk])
        full = assemble(model, prompts, visual)
        keep = None if selection is None else selection(Context(chunk, feats, visual, model, full))
        if keep is None:
            logits = _pruned_logits(model, full)
        elif prune_layer is None:
            logits = _pruned_logits(model, assemble(model, prompts, visual, keep))
        else:
            logits = _pruned_logits(model, full, keep, prune_layer)
        words += tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())
    return words


@torch.no_grad()
def predictions(model: transformers.LlavaForConditionalGeneration, processor: transformers.LlavaProcessor,
                items: Sequence[ProxyItem], selection: Selection | None = None, *, prune_layer: int | None = None,
                batch_size: int = 64) -> list[str]:
    """The answer word predicted for every item, as :func:`evaluate` scores it."""
    return _answers(model, processor, items, selection, prune_layer, batch_size)


@torch.no_grad()
def evaluate(model: transformers.LlavaForConditionalGeneration, processor: transformers.LlavaProcessor,
             items: Sequence[ProxyItem], selection: Selection | None, *, prune_layer: int | None = None,
             batch_size: int = 64) -> Scores:
    """Score ``items`` with every row keeping ``selection``'s tokens (``None``: all 256), from the
    first layer or, with ``prune_layer``, from that decoder layer on."""
    scores = Scores()
    for it, word in zip(items, _answers(model, processor, items, selection, prune_layer, batch_size)):
        scores.add(it.kind, word == it.answer)
    return scores


def accuracy_by_kind(model: transformers.LlavaForConditionalGeneration, processor: transformers.LlavaProcessor,
                     items: Sequence[ProxyItem], selection: Selection | None, **kwargs) -> dict[str, float]:
    """:func:`evaluate`'s accuracies: ``{"all": ..., "colour": ..., ...}``."""
    return evaluate(model, processor, items, selection, **kwargs).accuracy()
