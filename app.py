"""A chat page for the fine-tuned model, with a side-by-side comparison against the base model.

    python app.py                                    # adapter from model/, on http://127.0.0.1:7860
    python app.py --adapter model/checkpoint-100 --port 8080
    python app.py --auth alice:secret                # or QLORA_CHAT_AUTH=alice:secret python app.py
    python app.py --host 0.0.0.0                     # reachable from other machines: set --auth too
    python app.py --share                            # a public *.gradio.live link through Gradio's relay

Chat: a multi-turn conversation with the tuned model; replies stream token by token, the stop button ends one.
Compare: the same message answered by the base model (the adapter switched off) and by the tuned model, side by
side, each with its own conversation. There is one model in memory: the base reply borrows it with the adapter off.

Safe by default: the page listens on 127.0.0.1 only; a public link only with --share; generations run one at a time
(--concurrency) behind a queue of bounded size (--queue-size); a message longer than --max-input-chars is refused
with a message that says so; when a conversation outgrows the model's context, its oldest turns are left out.
"""

import contextlib
import logging
import math
import os
import socket
import sys
import threading
from dataclasses import dataclass, field

from cli_utils import argument_parser, fail, quiet_known_noise, use_model_decoding_defaults
from config import ChatModelArguments, GenerationArguments, QuantizationArguments, UserError, require

logger = logging.getLogger(__name__)

# gradio, torch, transformers and this kit's modules that load them are imported inside the functions that use them,
# once the arguments are parsed and the address is checked: --help and a mistake in the flags answer at once.

AUTH_VARIABLE = "QLORA_CHAT_AUTH"
EXAMPLES = [
    "What is a good way to learn Python?",
    "Explain what a large language model is, in two sentences.",
    "Write a short poem about autumn.",
]


@dataclass
class AppArguments:
    host: str = field(
        default="127.0.0.1", metadata={"help": "Address to listen on: 127.0.0.1 this machine, 0.0.0.0 the network."}
    )
    port: int = field(default=7860, metadata={"help": "Port to listen on."})
    share: bool = field(default=False, metadata={"help": "Also open a public *.gradio.live link (anyone can chat)."})
    auth: str | None = field(
        default=None, metadata={"help": f"Require a login, as user:password (or set ${AUTH_VARIABLE})."}
    )
    concurrency: int = field(default=1, metadata={"help": "Generations at once; others wait in the queue."})
    queue_size: int = field(default=16, metadata={"help": "Requests that may wait in the queue before refusals."})
    max_input_chars: int = field(default=4000, metadata={"help": "Longest message accepted, in characters."})
    stream_timeout: float = field(
        default=120.0, metadata={"help": "Seconds to wait for the next token before a generation counts as failed."}
    )

    def __post_init__(self):
        require(1 <= self.port <= 65535, f"--port must be in 1..65535, got {self.port}.")
        for name in ("concurrency", "queue_size", "max_input_chars"):
            require(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be at least 1.")
        require(
            0 < self.stream_timeout < math.inf, f"--stream-timeout must be above 0 seconds, got {self.stream_timeout}."
        )


@dataclass
class PageSettings:
    """What build_ui needs besides the model: generation defaults and the limits."""

    generation: GenerationArguments = field(default_factory=GenerationArguments)
    title: str = "Chat"
    compare: bool = True  # whether the model has an adapter to switch off
    max_input_chars: int = 4000
    context_length: int = 2048
    concurrency: int = 1
    stream_timeout: float = 120.0
    model_settings: bool = False  # the generation settings start from the adapter's generation_config.json


class GenerationSlots:
    """At most `limit` generations at once, page-wide (the Chat and Compare events each have their own queue
    limit). A base-model reply switches the adapter off for the whole model, so it runs alone."""

    def __init__(self, limit: int):
        self.limit, self.active, self.alone = limit, 0, False
        self.changed = threading.Condition()

    @contextlib.contextmanager
    def hold(self, alone: bool = False):
        with self.changed:
            self.changed.wait_for(lambda: not self.alone and (self.active == 0 if alone else self.active < self.limit))
            self.active += 1
            self.alone = alone
        try:
            yield
        finally:
            with self.changed:
                self.active -= 1
                self.alone = False
                self.changed.notify_all()


def message_text(content) -> str:
    """The text of a chat message as Gradio hands it over: a string, or a list of parts ({"type": "text", ...})."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text") or ""
    if isinstance(content, list):
        return "".join(message_text(part) for part in content)
    return ""


def to_messages(history: list[dict]) -> list[dict]:
    """Gradio's chat history as the plain role/content messages of the chat template."""
    return [
        {"role": m["role"], "content": message_text(m["content"])}
        for m in history
        if m.get("role") in ("user", "assistant") and not (m.get("metadata") or {}).get("title")
    ]


def shown(messages: list[dict]) -> list[dict]:
    """Chatbot values with each text as a text part: Gradio re-indents plain strings (inspect.cleandoc), and what is
    shown is what the model is given back as history on the next turn."""
    return [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in messages]


def page_handlers(model, tokenizer, settings: PageSettings):
    """The page's two event handlers, (chat, compare): each streams its replies, one generation at a time per slot,
    and turns a message that cannot be answered into the page's error message."""
    import gradio as gr

    from generation_utils import history_that_fits, prompt_length, stream_reply

    slots = GenerationSlots(settings.concurrency)
    gen = settings.generation

    def stream(messages: list[dict], temperature: float, top_p: float, max_new_tokens: int, base: bool = False):
        """Yield the reply as it grows; the oldest turns are left out when the conversation outgrows the context.
        Returns whether the reply ended with EOS (not at the token limit)."""
        args = GenerationArguments(
            max_new_tokens=int(max_new_tokens),
            temperature=float(temperature),
            top_p=float(top_p),
            top_k=gen.top_k,
            repetition_penalty=gen.repetition_penalty,
            seed=gen.seed,
        )
        budget = settings.context_length - args.max_new_tokens
        messages, dropped = history_that_fits(tokenizer, messages, budget)
        if prompt_length(tokenizer, messages) > budget:
            raise gr.Error(f"This message is too long for the model's context ({budget} tokens). Please shorten it.")
        if dropped:
            gr.Warning(f"The conversation outgrew the context: the oldest {dropped} exchange(s) were left out.")
        with slots.hold(alone=base), model.disable_adapter() if base else contextlib.nullcontext():
            try:
                return (yield from stream_reply(model, tokenizer, messages, args, timeout=settings.stream_timeout))
            except TimeoutError as e:
                raise gr.Error(f"The generation failed: {e} Please try again.") from None

    def check_length(message: str) -> str:
        message = message_text(message).strip()
        if not message:
            raise gr.Error("The message is empty.")
        if len(message) > settings.max_input_chars:
            raise gr.Error(
                f"Your message is {len(message):,} characters long; the limit is {settings.max_input_chars:,}. "
                "Please shorten it."
            )
        return message

    def chat(message, history, temperature, top_p, max_new_tokens):
        message = check_length(message)
        messages = [*to_messages(history), {"role": "user", "content": message}]
        if not (yield from stream(messages, temperature, top_p, max_new_tokens)):
            gr.Warning(cut_at_limit(max_new_tokens))

    def compare(message, base_history, tuned_history, temperature, top_p, max_new_tokens):
        user = {"role": "user", "content": check_length(message)}
        base_history, tuned_history = [*to_messages(base_history), user], [*to_messages(tuned_history), user]
        ended = {}

        def answer(history: list[dict], side: str):
            ended[side] = yield from stream(history, temperature, top_p, max_new_tokens, base=side == "Base")

        yield "", shown(base_history), shown(tuned_history), ""
        reply = ""
        for reply in answer(base_history, "Base"):
            yield "", shown([*base_history, {"role": "assistant", "content": reply}]), shown(tuned_history), ""
        base_history.append({"role": "assistant", "content": reply})
        for reply in answer(tuned_history, "Tuned"):
            yield "", shown(base_history), shown([*tuned_history, {"role": "assistant", "content": reply}]), ""
        tuned_history.append({"role": "assistant", "content": reply})
        status = " · ".join(
            f"{side}: {'ended (EOS)' if done else cut_at_limit(max_new_tokens)}" for side, done in ended.items()
        )
        yield "", shown(base_history), shown(tuned_history), status

    return chat, compare


def build_ui(model, tokenizer, settings: PageSettings):
    """The page: a Chat tab and, when the model has an adapter, a Compare tab. Launch it with .queue().launch()."""
    import gradio as gr

    chat, compare = page_handlers(model, tokenizer, settings)
    gen = settings.generation
    max_reply = max(16, settings.context_length // 2)
    with gr.Blocks(title="QLoRA chat", analytics_enabled=False, fill_height=True) as page:
        gr.Markdown(f"### {settings.title}")
        origin = (
            "the model's own, from its generation_config.json (what its report measured)"
            if settings.model_settings
            else "this page's defaults (the model documents none)"
        )
        gr.Markdown(f"Decoding: {gen.describe()}; {origin}. The sliders below override them.")
        with gr.Accordion("Generation settings", open=False):
            with gr.Row():
                temperature = gr.Slider(0, 2, value=gen.temperature, step=0.05, label="Temperature (0: greedy)")
                top_p = gr.Slider(0.05, 1, value=gen.top_p, step=0.05, label="Top-p")
                max_new_tokens = gr.Slider(
                    1, max_reply, value=min(gen.max_new_tokens, max_reply), step=1, label="Max new tokens"
                )
        sliders = [temperature, top_p, max_new_tokens]
        with gr.Tab("Chat"):
            gr.ChatInterface(
                chat,
                additional_inputs=sliders,
                examples=[[example, None, None, None] for example in EXAMPLES],
                chatbot=gr.Chatbot(label="Tuned model" if settings.compare else "Base model", scale=1, elem_id="chat"),
                api_name="chat",
                analytics_enabled=False,
                fill_height=True,
            )
        if settings.compare:
            with gr.Tab("Compare with the base model"):
                with gr.Row():
                    base_chat = gr.Chatbot(label="Base model (adapter off)", height=420, elem_id="base-chat")
                    tuned_chat = gr.Chatbot(label="Tuned model", height=420, elem_id="tuned-chat")
                status = gr.Markdown(elem_id="compare-status")  # did each reply end, or run into the limit?
                box = gr.Textbox(label="Message", placeholder="One message, two answers", show_label=False)
                with gr.Row():
                    send = gr.Button("Send", variant="primary")
                    stop = gr.Button("Stop", variant="stop")
                    clear = gr.Button("Clear", elem_id="compare-clear")
                gr.Examples(EXAMPLES, inputs=box)
                inputs, outputs = [box, base_chat, tuned_chat, *sliders], [box, base_chat, tuned_chat, status]
                sent = gr.on([send.click, box.submit], compare, inputs, outputs, api_name="compare")
                stop.click(None, cancels=[sent])
                clear.click(lambda: ("", [], [], ""), None, outputs, api_visibility="private")
    return page


def cut_at_limit(max_new_tokens) -> str:
    return f"cut at the {int(max_new_tokens)}-token limit (raise Max new tokens to let it finish)"


def parse_auth(value: str | None) -> tuple[str, str] | None:
    value = value or os.environ.get(AUTH_VARIABLE)
    if not value:
        return None
    user, _, password = value.partition(":")
    if not user or not password:
        fail(f"--auth (or ${AUTH_VARIABLE}) must look like user:password.")
    return user, password


def check_address(host: str, port: int) -> None:
    """Bind the page's address once, as Gradio will (SO_REUSEADDR, like its own probe): a port in use, one that needs
    root, or a host that is not this machine's fails here in one line."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as e:  # socket.gaierror for an unknown host is an OSError too
        hint = " (ports below 1024 need root)" if isinstance(e, PermissionError) and port < 1024 else ""
        fail(
            f"cannot listen on {host}:{port}: {e.strerror or e}{hint}; choose another --port, or a --host of this "
            "machine (127.0.0.1, or 0.0.0.0 for every network)."
        )


def main(args: list[str] | None = None):
    parser = argument_parser((ChatModelArguments, AppArguments, GenerationArguments, QuantizationArguments), __doc__)
    model_defaults = use_model_decoding_defaults(parser, args)
    try:
        model_args, app_args, gen_args, quant_args = parser.parse_args_into_dataclasses(args)
    except ValueError as e:
        fail(str(e))
    auth = parse_auth(app_args.auth)
    check_address(app_args.host, app_args.port)  # before minutes of model loading
    if app_args.host not in ("127.0.0.1", "localhost", "::1") and auth is None:
        logger.warning("Listening on %s without --auth: anyone who can reach this port can chat.", app_args.host)

    from adapter_utils import load_chat_model
    from model_utils import context_length

    # The model is loaded once, here; every request shares it.
    try:
        model, tokenizer = load_chat_model(
            None if model_args.no_adapter else model_args.adapter, model_args.base, quant_args
        )
    except UserError as e:
        fail(str(e))
    base = model.config.name_or_path
    adapter = getattr(model, "peft_config", {}).get("default")
    settings = PageSettings(
        generation=gen_args,
        title=f"`{base}` + adapter `{model_args.adapter}`" if adapter else f"`{base}` (no adapter)",
        compare=not model_args.no_adapter,
        max_input_chars=app_args.max_input_chars,
        context_length=context_length(model),
        concurrency=app_args.concurrency,
        stream_timeout=app_args.stream_timeout,
        model_settings=bool(model_defaults),
    )
    import gradio as gr

    page = build_ui(model, tokenizer, settings)
    page.queue(default_concurrency_limit=app_args.concurrency, max_size=app_args.queue_size)
    # System fonts: the default theme fetches Google Fonts, a request to a third party from every visitor's browser.
    theme = gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )
    try:
        page.launch(
            server_name=app_args.host,
            server_port=app_args.port,
            share=app_args.share,
            auth=auth,
            theme=theme,
            show_error=True,
            quiet=True,  # Gradio's own banner points at launch(share=True); ours names the flags
            prevent_thread_lock=True,
        )
    except OSError as e:  # the port was taken while the model loaded
        fail(f"cannot listen on {app_args.host}:{app_args.port} ({e}); choose another --port.")
    print(f"Chat page: {page.local_url}" + (" (login required)" if auth else ""), flush=True)
    if page.share_url:
        print(f"Public link (anyone who has it can chat): {page.share_url}", flush=True)
    else:
        print(
            "Only this machine can open it; --host 0.0.0.0 (with --auth) or --share to open it to others.", flush=True
        )
    print("Ctrl-C stops the server.", flush=True)
    page.block_thread()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own startup requests, one line each
    quiet_known_noise()
    main()
