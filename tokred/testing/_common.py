"""What the tiny models of every family share: the language model's size and the chat templates."""

from __future__ import annotations

from typing import Any

__all__ = ["TINY_LANGUAGE_MODEL", "LLAVA_CHAT_TEMPLATE", "LLAVA_CORPUS", "chatml_template"]

#: The language model of every tiny family: 8 layers so per-layer schedules have room, 64 wide, GQA
#: (4 query / 2 KV heads) on purpose so that KV-cache and attention code cannot silently assume
#: ``num_key_value_heads == num_heads``. ``initializer_range`` is larger than the usual 0.02 so that
#: logits are not near-uniform and greedy decoding of a random model produces varied tokens.
TINY_LANGUAGE_MODEL: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 8,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "initializer_range": 0.2,
}

#: Sentences the LLaVA-style tokenizers (LLaVA-1.5, LLaVA-NeXT, LLaVA-NeXT-Video) are trained on.
LLAVA_CORPUS = (
    "The quick brown fox jumps over the lazy dog.",
    "What is shown in this image? Describe the picture in detail.",
    "A red circle, a green square and a blue triangle on a gradient background.",
    "USER: What colour is the car? ASSISTANT: The car is yellow.",
    "There are two cats sitting on a wooden table next to a window.",
    "Please answer the question with a single word or a short phrase.",
)

#: The template of llava-hf/llava-1.5-*-hf and llava-v1.6-vicuna (images first, then the text),
#: extended to accept plain-string content so text-only chats are easy to write in tests.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def chatml_template(image: str, *, default_system: bool, video: str | None = None) -> str:
    """A ChatML template (``<|im_start|>role ... <|im_end|>``, as Qwen-VL and InternVL3 use) that
    writes ``image`` for each image item and ``video`` for each video item, in place, and
    plain-string content as is.

    ``default_system``: open with "You are a helpful assistant." when the chat has no system message
    (Qwen2-VL, Qwen2.5-VL, InternVL3; Qwen3-VL has none)."""
    system = (
        "{% if loop.first and message['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    ) if default_system else ""
    return (
        "{% for message in messages %}"
        + system
        + "{{ '<|im_start|>' + message['role'] + '\n' }}"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for content in message['content'] %}"
        "{% if content['type'] == 'image' %}{{ '" + image + "' }}"
        + ("{% elif content['type'] == 'video' %}{{ '" + video + "' }}" if video is not None else "")
        + "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
        "{% endfor %}{% endif %}"
        "{{ '<|im_end|>\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
