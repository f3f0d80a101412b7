"""qwenvl.chat against transformers' apply_chat_template(tokenize=False), with the real Qwen templates."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
from PIL import Image

from qwenvl.chat import default_template, media_items, normalize_messages, render_chat
from qwenvl.errors import RequestError
from qwenvl.tokenizer import Tokenizer

DATA = Path(__file__).parent / "data"
QWEN2_VL = (DATA / "qwen2_vl_chat_template.jinja").read_text(encoding="utf-8")  # Qwen2-VL-2B-Instruct
QWEN2_5 = (DATA / "qwen2_5_chat_template.jinja").read_text(encoding="utf-8")  # Qwen2.5-Coder-0.5B-Instruct

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city — «quoted» <b>html</b> & ünïcode",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["C", "F"]}},
                "required": ["city"],
            },
        },
    },
    {"type": "function", "function": {"name": "now", "description": "Time", "parameters": {"type": "object"}}},
]


def text(value: str) -> dict:
    return {"type": "text", "text": value}


def image(source, **options) -> dict:
    return {"type": "image", "image": source, **options}


def video(source) -> dict:
    return {"type": "video", "video": source}


def user(content) -> dict:
    return {"role": "user", "content": content}


TEXT_CHATS = {
    "system+user": [{"role": "system", "content": "You are terse."}, user("Hi <there> & 你好")],
    "no system": [{"role": "user", "content": "What is 2+2?"}],
    "multi-turn": [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi! How can I help?"},
        {"role": "user", "content": "Tell me a joke.\nA short one."},
    ],
    "tool calls": [
        {"role": "user", "content": "Weather in Zürich and the time?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"function": {"name": "get_weather", "arguments": {"city": "Zürich", "unit": "C"}}},
                {"name": "now", "arguments": {}},
            ],
        },
        {"role": "tool", "content": '{"temp": 21}', "tool_call_id": "1"},
        {"role": "tool", "content": "12:00"},
        {"role": "assistant", "content": "21 °C at noon."},
        {"role": "user", "content": "Thanks"},
    ],
}

VL_CHATS = {
    "system+user": TEXT_CHATS["system+user"],
    "text+image": [user([image("file:///a.jpg"), text("Describe.")])],
    "two images, two turns": [
        {"role": "system", "content": "You see images."},
        {"role": "user", "content": [{"type": "text", "text": "Compare "}, {"type": "image", "image": "a.png"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Send the other."}]},
        {"role": "user", "content": [{"type": "image", "url": "http://x/b.png"}, {"type": "text", "text": "now"}]},
    ],
    "image_url (OpenAI)": [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "high"}},
                {"type": "image_url", "image_url": "http://x/c.png"},
            ],
        }
    ],
    "video": [user([video("clip.mp4"), text("Summarize")])],
    "PIL image": [user([image(Image.new("RGB", (4, 4))), text("?")])],
}


@pytest.fixture(scope="module")
def hf(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def special_tokens(tokenizer_dir) -> dict[str, str]:
    """The special tokens that are set, by name: what transformers passes to chat templates."""
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    names = {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token, "pad_token": tokenizer.pad_token}
    return {name: token for name, token in names.items() if token is not None}


def hf_render(hf, template, messages, add_generation_prompt, **kwargs) -> str:
    return hf.apply_chat_template(
        copy.deepcopy(messages),
        chat_template=template,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        **kwargs,
    )


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", TEXT_CHATS)
def test_qwen2_5_template_matches_transformers(hf, special_tokens, name, add_generation_prompt):
    messages = TEXT_CHATS[name]
    ours = render_chat(QWEN2_5, messages, add_generation_prompt=add_generation_prompt, **special_tokens)
    assert ours == hf_render(hf, QWEN2_5, messages, add_generation_prompt)


@pytest.mark.parametrize("name", TEXT_CHATS)
def test_qwen2_5_template_with_tools_matches_transformers(hf, special_tokens, name):
    messages = TEXT_CHATS[name]
    ours = render_chat(QWEN2_5, messages, tools=TOOLS, **special_tokens)
    assert ours == hf_render(hf, QWEN2_5, messages, True, tools=TOOLS)
    assert "<tools>" in ours and "ünïcode" in ours and "<b>html</b>" in ours  # tojson: no escaping


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", VL_CHATS)
def test_qwen2_vl_template_matches_transformers(hf, special_tokens, name, add_generation_prompt):
    messages = VL_CHATS[name]
    ours = render_chat(QWEN2_VL, messages, add_generation_prompt=add_generation_prompt, **special_tokens)
    assert ours == hf_render(hf, QWEN2_VL, messages, add_generation_prompt)
    assert ours == render_chat(QWEN2_VL, normalize_messages(messages), add_generation_prompt=add_generation_prompt)


def test_qwen2_vl_add_vision_id_matches_transformers(hf):
    messages = VL_CHATS["two images, two turns"] + [
        {"role": "user", "content": [{"type": "video", "video": "v.mp4"}, {"type": "image", "image": "c.png"}]}
    ]
    ours = render_chat(QWEN2_VL, messages, add_vision_id=True)
    assert ours == hf_render(hf, QWEN2_VL, messages, True, add_vision_id=True)
    assert "Picture 3: " in ours and "Video 1: " in ours


def test_video_url_renders_like_the_hf_video_form(hf):
    # transformers has no OpenAI video_url form: the reference is the same chat in its {"type": "video"} form
    openai = [user([{"type": "video_url", "video_url": {"url": "v.mp4"}}, text("?")])]
    hf_form = [user([video("v.mp4"), text("?")])]
    assert render_chat(QWEN2_VL, openai) == hf_render(hf, QWEN2_VL, hf_form, True)
    assert "<|vision_start|><|video_pad|><|vision_end|>" in render_chat(QWEN2_VL, openai)


def test_default_template_is_plain_chatml(hf):
    messages = TEXT_CHATS["multi-turn"] + [{"role": "assistant", "content": [text("Why"), text("?")]}]
    ours = render_chat(None, messages)
    assert ours == hf_render(hf, default_template(), messages, True)

    def flat(content):
        return content if isinstance(content, str) else "".join(part["text"] for part in content)

    # llama.cpp's ChatML: "<|im_start|>{role}\n{content}<|im_end|>\n" per message, then the assistant header
    chatml = "".join(f"<|im_start|>{m['role']}\n{flat(m['content'])}<|im_end|>\n" for m in messages)
    assert ours == chatml + "<|im_start|>assistant\n"
    with pytest.raises(RequestError, match="text only"):
        render_chat(None, VL_CHATS["text+image"])


def test_template_features_match_transformers(hf):
    template = (
        "{% set ns = namespace(count=0) %}"
        "{% for message in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
        "{% set ns.count = ns.count + 1 %}{{ message | tojson }}\n{% endfor %}"
        "{{ ns.count }} {{ dict(a=1, b=[2, 'é']) | tojson(indent=2, sort_keys=true) }}"
        "{{ strftime_now('%Y') }}|{{ eos_token }}|{{ custom }}|{{ tools | tojson }}|{{ documents }}"
        "{% generation %}{{ ' assistant part' }}{% endgeneration %}"
    )
    messages = TEXT_CHATS["multi-turn"]
    kwargs = {"custom": ("x", 1), "eos_token": "<|im_end|>"}
    ours = render_chat(template, messages, tools=TOOLS, **kwargs)
    assert ours == hf_render(hf, template, messages, True, tools=TOOLS, **kwargs)


def test_reasoning_fields_are_aliased_like_transformers(hf):
    template = "{% for m in messages %}[{{ m.reasoning_content }}|{{ m.thinking }}]{% endfor %}"
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning": "because"}]
    assert render_chat(template, messages) == hf_render(hf, template, messages, True)


@pytest.mark.parametrize(
    "template, match",
    [
        ("{{ raise_exception('System role not supported') }}", "System role not supported"),
        ("{% for m in messages %}{{ m.content", "syntax error"),
        ("{{ messages.append(1) }}", "chat template"),  # the sandbox is immutable
        ("{% set ns = namespace(_secret=1) %}", "_secret"),
        ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "chat template"),
    ],
)
def test_template_errors_are_one_line_request_errors(template, match):
    with pytest.raises(RequestError, match=match) as error:
        render_chat(template, TEXT_CHATS["no system"])
    assert "\n" not in str(error.value)


def test_tools_must_be_json_schemas():
    with pytest.raises(RequestError, match="tools"):
        render_chat(QWEN2_5, TEXT_CHATS["no system"], tools=[print])


def test_text_template_rejects_content_lists_like_transformers(hf):
    messages = VL_CHATS["text+image"]
    with pytest.raises(TypeError):
        hf_render(hf, QWEN2_5, messages, True)
    with pytest.raises(RequestError, match="chat template"):
        render_chat(QWEN2_5, messages)


# ---- normalize_messages / media_items ----


@pytest.mark.parametrize(
    "messages, match",
    [
        ({"role": "user", "content": "hi"}, "messages: expected a non-empty list"),
        ([], "messages: expected a non-empty list"),
        (["hi"], r"messages\[0\]: expected an object"),
        ([{"role": "robot", "content": "hi"}], r"messages\[0\]\.role"),
        ([{"content": "hi"}], r"messages\[0\]\.role"),
        ([{"role": "user", "content": 5}], r"messages\[0\]\.content"),
        ([{"role": "user", "content": ["hi"]}], r"messages\[0\]\.content\[0\]: expected an object"),
        ([{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]}], r"content\[0\]\.type.*'audio'"),
        ([{"role": "user", "content": [{"type": "text", "text": 3}]}], r"content\[0\]\.text"),
        ([{"role": "user", "content": [{"type": "image"}]}], r"content\[0\]: image item has no source"),
        ([{"role": "user", "content": [{"type": "video", "video": " "}]}], "video item has no source"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"detail": "low"}}]}], r"\.image_url"),
        ([{"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "video_url"}]}], r"messages\[1\]"),
    ],
)
def test_normalize_messages_rejects_bad_input(messages, match):
    with pytest.raises(RequestError, match=match):
        normalize_messages(messages)


def test_normalize_messages_rewrites_media_parts_without_touching_input():
    pil = Image.new("RGB", (2, 2))
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "http://x/a.png"}},
                {"type": "image_url", "image_url": "http://x/b.png"},
                {"type": "image", "url": "http://x/c.png"},
                {"type": "image", "path": "/tmp/d.png", "max_pixels": 1024},
                {"image": pil},
                {"type": "video_url", "video_url": {"url": "v.mp4"}},
                {"type": "video", "path": "w.mp4", "fps": 2.0},
                {"type": "text", "text": "hi"},
            ],
        },
        {"role": "assistant", "content": None, "tool_calls": [{"name": "f", "arguments": {}}]},
    ]
    original = copy.deepcopy(messages)
    normalized = normalize_messages(messages)
    assert normalized[0]["content"] == [
        {"type": "image", "image": "http://x/a.png"},
        {"type": "image", "image": "http://x/b.png"},
        {"type": "image", "image": "http://x/c.png"},
        {"type": "image", "image": "/tmp/d.png", "max_pixels": 1024},
        {"type": "image", "image": pil},
        {"type": "video", "video": "v.mp4"},
        {"type": "video", "video": "w.mp4", "fps": 2.0},
        {"type": "text", "text": "hi"},
    ]
    assert normalized[1] == original[1]
    assert messages == original
    assert normalize_messages(normalized) == normalized


def test_media_items_follow_the_pad_order_of_the_rendered_prompt(hf):
    pil = Image.new("RGB", (2, 2))
    messages = [
        {"role": "system", "content": [text("sys"), image("s.png")]},
        user([video("v1.mp4"), text("a"), {"type": "image_url", "image_url": {"url": "u1"}}]),
        {"role": "assistant", "content": "ok"},
        user([image(pil), {"type": "video_url", "video_url": "v2.mp4"}, {"type": "image", "path": "p.png"}]),
    ]
    items = media_items(messages)
    sources = ["s.png", "v1.mp4", "u1", pil, "v2.mp4", "p.png"]
    assert items == list(zip(["image", "video", "image", "image", "video", "image"], sources))
    prompt = hf_render(hf, QWEN2_VL, normalize_messages(messages), True)
    pads = re.findall(r"<\|(image|video)_pad\|>", prompt)
    assert pads == [kind for kind, _ in items]
    assert render_chat(QWEN2_VL, messages) == prompt
    assert media_items(TEXT_CHATS["multi-turn"]) == []
