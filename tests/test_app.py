"""app.py for real: the page served on a free port with the tiny model, talked to through gradio_client."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from adapter_utils import load_chat_model
from app import AUTH_VARIABLE, GenerationSlots, cut_at_limit, message_text, parse_auth
from config import GenerationArguments, QuantizationArguments
from generation_utils import generate_reply

# The server's settings (see the chat_server fixture): greedy, 12 new tokens, 200 characters at most.
SLIDERS = (0.0, 0.9, 12)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def texts(history: list[dict]) -> list[tuple[str, str]]:
    return [(m["role"], message_text(m["content"])) for m in history]


@pytest.mark.slow
def test_two_turn_conversation_streams_the_tuned_replies(chat_server):
    client = Client(chat_server, verbose=False)
    for question in ("Is the grass green?", "And is the sea blue?"):  # one client: the page keeps the history
        job = client.submit(question, *SLIDERS, api_name="/chat")
        job.result(timeout=120)
        updates = job.outputs()
        assert updates[-1] == "Yes."
        assert len(updates) >= 2 and all("Yes.".startswith(u) for u in updates)  # it grew token by token


@pytest.mark.slow
def test_compare_answers_with_the_base_and_the_tuned_model_over_two_turns(chat_server, yes_adapter):
    client = Client(chat_server, verbose=False)
    _, base, tuned, _ = client.predict("Is the grass green?", [], [], *SLIDERS, api_name="/compare")
    _, base, tuned, status = client.predict("And the sea?", base, tuned, *SLIDERS, api_name="/compare")

    # The base side is the same model with the adapter off, and it saw its own first exchange.
    model, tokenizer = load_chat_model(yes_adapter, quant_args=QuantizationArguments(load_in_4bit=False))
    greedy = GenerationArguments(max_new_tokens=12, temperature=0)
    with model.disable_adapter():
        first = generate_reply(model, tokenizer, [user("Is the grass green?")], greedy)
        second = generate_reply(
            model, tokenizer, [user("Is the grass green?"), assistant(first), user("And the sea?")], greedy
        )
    assert texts(base) == [
        ("user", "Is the grass green?"),
        ("assistant", first),
        ("user", "And the sea?"),
        ("assistant", second),
    ]
    assert texts(tuned) == [
        ("user", "Is the grass green?"),
        ("assistant", "Yes."),
        ("user", "And the sea?"),
        ("assistant", "Yes."),
    ]
    assert first != "Yes."
    # Under the chats, whether each reply ended with EOS or ran into the token limit.
    base_end = "ended (EOS)" if second.ended else cut_at_limit(greedy.max_new_tokens)
    assert status == f"Base: {base_end} · Tuned: ended (EOS)"


@pytest.mark.slow
def test_eight_concurrent_clients_all_get_answers(chat_server):
    def ask(number: int) -> str:
        return Client(chat_server, verbose=False).predict(f"Question number {number}?", *SLIDERS, api_name="/chat")

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(ask, range(8))) == ["Yes."] * 8


@pytest.mark.slow
def test_an_overlong_message_gets_the_limit_message(chat_server):
    client = Client(chat_server, verbose=False)
    with pytest.raises(AppError, match="Your message is 201 characters long; the limit is 200. Please shorten it."):
        client.predict("a" * 201, *SLIDERS, api_name="/chat")
    assert client.predict("a" * 199 + "?", *SLIDERS, api_name="/chat") == "Yes."


def test_a_base_reply_waits_until_it_runs_alone():
    slots, release = GenerationSlots(limit=2), threading.Event()
    inside, base_started = [], threading.Event()

    def tuned_reply():
        with slots.hold():
            inside.append(1)
            release.wait(10)

    def base_reply():
        with slots.hold(alone=True):  # the adapter is off for the whole model meanwhile
            base_started.set()

    tuned = [threading.Thread(target=tuned_reply) for _ in range(2)]
    for thread in tuned:
        thread.start()
    deadline = time.monotonic() + 10
    while len(inside) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(inside) == 2  # two tuned replies run together (limit 2)
    base = threading.Thread(target=base_reply)
    base.start()
    assert not base_started.wait(0.3)  # the base reply waits for them
    release.set()
    assert base_started.wait(10)
    for thread in (*tuned, base):
        thread.join()


def test_login_comes_from_the_flag_or_the_environment(monkeypatch, capsys):
    monkeypatch.delenv(AUTH_VARIABLE, raising=False)
    assert parse_auth(None) is None  # no login by default (the page listens on 127.0.0.1 only)
    assert parse_auth("alice:se:cret") == ("alice", "se:cret")
    monkeypatch.setenv(AUTH_VARIABLE, "bob:pw")
    assert parse_auth(None) == ("bob", "pw")
    with pytest.raises(SystemExit):
        parse_auth("alice")
    assert "must look like user:password" in capsys.readouterr().err
