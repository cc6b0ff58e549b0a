"""The chat template of the tiny checkpoint, rendering prompts exactly as Qwen2.5-Omni's does.

Layout: ChatML turns; a default system turn when the conversation doesn't start with one;
list content renders media as `<|audio_bos|><|AUDIO|><|audio_eos|>`,
`<|vision_bos|><|IMAGE|><|vision_eos|>` or `<|vision_bos|><|VIDEO|><|vision_eos|>` (the
processor expands the middle token) and text parts verbatim. `add_audio_id` /
`add_vision_id` prefix media with "Audio N: " / "Picture N: " / "Video N: ".
"""

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

CHAT_TEMPLATE = (
    "{% set n = namespace(audio=0, image=0, video=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "{% set n.image = n.image + 1 %}"
    "{% if add_vision_id %}Picture {{ n.image }}: {% endif %}"
    "<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif part['type'] == 'audio' or 'audio' in part or 'audio_url' in part %}"
    "{% set n.audio = n.audio + 1 %}"
    "{% if add_audio_id %}Audio {{ n.audio }}: {% endif %}"
    "<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif part['type'] == 'video' or 'video' in part %}"
    "{% set n.video = n.video + 1 %}"
    "{% if add_vision_id %}Video {{ n.video }}: {% endif %}"
    "<|vision_bos|><|VIDEO|><|vision_eos|>"
    "{% elif 'text' in part %}"
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
