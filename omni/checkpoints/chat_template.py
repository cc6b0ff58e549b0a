"""The chat template of the tiny checkpoint, rendering prompts exactly as Qwen2.5-Omni's does.

Layout: ChatML turns; a default system turn when the conversation doesn't start with one;
list content renders media as `<|audio_bos|><|AUDIO|><|audio_eos|>`,
`<|vision_bos|><|IMAGE|><|vision_eos|>` or `<|vision_bos|><|VIDEO|><|vision_eos|>` (the
processor expands the middle token) and text parts verbatim. `add_audio_id` /
`add_vision_id` prefix media with "Audio N: " / "Picture N: " / "Video N: ".
"""

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
# how each family writes an audio clip, an image and a video in a prompt
QWEN2_5_MEDIA = (
    "<|audio_bos|><|AUDIO|><|audio_eos|>",
    "<|vision_bos|><|IMAGE|><|vision_eos|>",
    "<|vision_bos|><|VIDEO|><|vision_eos|>",
)
QWEN3_MEDIA = (
    "<|audio_start|><|audio_pad|><|audio_end|>",
    "<|vision_start|><|image_pad|><|vision_end|>",
    "<|vision_start|><|video_pad|><|vision_end|>",
)


def chat_template(media: tuple[str, str, str], default_system: str | None) -> str:
    """The template for a family's media markers (audio, image, video); a default system turn
    comes first when `default_system` is given (Qwen2.5-Omni's template has one, Qwen3-Omni's
    not)."""
    audio, image, video = media
    opening = (
        "{% if loop.first and message['role'] != 'system' %}"
        "<|im_start|>system\n" + default_system + "<|im_end|>\n"
        "{% endif %}"
        if default_system is not None
        else ""
    )
    return (
        "{% set n = namespace(audio=0, image=0, video=0) %}"
        "{% for message in messages %}"
        + opening
        + "<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}"
        "{{ message['content'] }}"
        "{% else %}"
        "{% for part in message['content'] %}"
        "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
        "{% set n.image = n.image + 1 %}"
        "{% if add_vision_id %}Picture {{ n.image }}: {% endif %}"
        + image
        + "{% elif part['type'] == 'audio' or 'audio' in part or 'audio_url' in part %}"
        "{% set n.audio = n.audio + 1 %}"
        "{% if add_audio_id %}Audio {{ n.audio }}: {% endif %}"
        + audio
        + "{% elif part['type'] == 'video' or 'video' in part %}"
        "{% set n.video = n.video + 1 %}"
        "{% if add_vision_id %}Video {{ n.video }}: {% endif %}"
        + video
        + "{% elif 'text' in part %}"
        "{{ part['text'] }}"
        "{% endif %}"
        "{% endfor %}"
        "{% endif %}"
        "<|im_end|>\n"
        "{% endfor %}"
        "{% if add_generation_prompt %}"
        "<|im_start|>assistant\n"
        "{% endif %}"
    )


CHAT_TEMPLATE = chat_template(QWEN2_5_MEDIA, DEFAULT_SYSTEM_PROMPT)
QWEN3_CHAT_TEMPLATE = chat_template(QWEN3_MEDIA, None)
