"""The conversation template: how a conversation becomes "### Human: ... ### Assistant: ..." text, written once.

Training installs CHAT_TEMPLATE on the tokenizer (model_utils.load_tokenizer) and saves PORTABLE_CHAT_TEMPLATE with
every adapter and merged model, so training, inference, the page and outside tools (`tokenizer.apply_chat_template`)
all build byte-identical prompts. The words are the original recipe's; turns are joined by one space; every assistant
turn ends with EOS. The generation prompt ends at "### Assistant:" with no trailing space: in training the reply's
first token carries the space (" Hello"), so the prompt must stop exactly where that token starts. A system message
(OpenAI-style clients send one) opens the first human turn, followed by a blank line: the model was trained on human
and assistant turns only, so it reads the system text as part of the first request. Tools, tool calls and any other
role are an error, since the model never saw them.
"""

import functools

import jinja2

# The turn markers: text lines of your own data are split on them, and a reply that writes HUMAN invented a turn.
HUMAN, ASSISTANT = "### Human:", "### Assistant:"


def _conversation_template(reply: str) -> str:
    """The template around `reply`, the Jinja that renders an assistant message's text and its EOS."""
    return (
        "{%- if tools -%}{{ raise_exception('Tools are not supported: this model was trained on plain user and "
        "assistant turns.') }}{%- endif -%}"
        "{%- set offset = 1 if messages and messages[0]['role'] == 'system' else 0 -%}"
        "{%- if offset and (messages | length < 2 or messages[1]['role'] != 'user') -%}"
        "{{ raise_exception('A system message must be followed by a user message.') }}"
        "{%- endif -%}"
        "{%- for message in messages -%}"
        "{%- if message['tool_calls'] is defined and message['tool_calls'] -%}"
        "{{ raise_exception('Tool calls are not supported: this model was trained on plain user and assistant "
        "turns.') }}"
        "{%- elif loop.index0 >= offset -%}"  # the system message itself is rendered with the first user turn
        "{%- if loop.index0 > offset %}{{ ' ' }}{% endif -%}"
        "{%- if message['role'] == 'user' -%}"
        "{{ '" + HUMAN + " ' }}"
        "{%- if offset and loop.index0 == 1 -%}{{ messages[0]['content'] + '\\n\\n' }}{%- endif -%}"
        "{{ message['content'] }}"
        "{%- elif message['role'] == 'assistant' -%}"
        "{{ '" + ASSISTANT + "' }}" + reply + "{%- else -%}"
        "{{ raise_exception('Only user and assistant messages (and a system message first) are supported, got: ' "
        "+ message['role']) }}"
        "{%- endif -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ (' ' if messages else '') + '" + ASSISTANT + "' }}{%- endif -%}"
    )


ASSISTANT_REPLY = "{{ ' ' + message['content'] + eos_token }}"
# Training: the {% generation %} block (the assistant's text and its EOS) is what the loss covers, so the model learns
# to stop. It is a transformers extension of Jinja (plain Jinja2 fails on it: "unknown tag 'generation'").
CHAT_TEMPLATE = _conversation_template("{% generation %}" + ASSISTANT_REPLY + "{% endgeneration %}")
# Everything saved (the adapter's and the merged model's tokenizer): the same text without the markers, which plain
# Jinja2 renders byte for byte as transformers renders CHAT_TEMPLATE, so engines that render templates themselves
# (llama.cpp, TGI) accept it.
PORTABLE_CHAT_TEMPLATE = _conversation_template(ASSISTANT_REPLY)


def format_text(messages: list[dict], eos_token: str = "") -> str:
    """Render the conversation as text (without special tokens by default), byte for byte as the tokenizer does:
    the portable template through plain Jinja2, as engines without transformers render it."""
    return portable_template().render(messages=messages, eos_token=eos_token)


@functools.cache
def portable_template() -> jinja2.Template:
    """PORTABLE_CHAT_TEMPLATE compiled by plain Jinja2, with the one helper every chat-template engine provides."""

    def raise_exception(message: str):
        raise jinja2.TemplateError(message)

    environment = jinja2.Environment()
    environment.globals["raise_exception"] = raise_exception
    return environment.from_string(PORTABLE_CHAT_TEMPLATE)


def first_turn(messages: list[dict]) -> list[dict]:
    """A conversation's opening request: its first user message, with the system message before it (the template
    renders the two as one human turn)."""
    return messages[: 2 if messages[0]["role"] == "system" else 1]
