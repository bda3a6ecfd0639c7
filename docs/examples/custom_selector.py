"""A Selector of your own: keep the tokens whose projected features have the largest norm."""

import torch

import tokred
from tokred.testing import tiny_inputs, tiny_model


class LargestNormSelector(tokred.Selector):
    """Keeps the visual tokens whose features have the largest L2 norm."""

    def score(self, tokens: tokred.VisualTokens) -> torch.Tensor:
        return tokens.features.float().norm(dim=-1)  # [N]: higher is kept


schedule = tokred.Schedule(
    selector=tokred.SelectorStage(selector=LargestNormSelector(), budget=tokred.Budget(keep=32)),
)

model, processor = tiny_model("llava")  # stands in for LlavaForConditionalGeneration.from_pretrained(...)
inputs = tiny_inputs(processor, ["What is shown?"])
with tokred.apply(model, schedule) as run:
    model.generate(**inputs, max_new_tokens=4)
print(run.report.visual_tokens_per_layer[0])  # [32]
