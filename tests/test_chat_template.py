"""One conversation template everywhere: training text, tokenizer chat_template, inference prompt, loss masks, and
the portable copy that is saved with the model (plain Jinja2, a system message, clear errors)."""

import jinja2
import pytest
from datasets import Dataset

from adapter_utils import build_lora_config
from chat_template import CHAT_TEMPLATE, PORTABLE_CHAT_TEMPLATE, format_text, portable_template
from config import LoraArguments, ModelArguments, QuantizationArguments
from data_utils import SAMPLE, Conversations, load_conversations
from model_utils import load_model
from train_settings import TrainingConfig
from trainer_setup import build_trainer
from training_examples import to_training_records

EOS = "<|endoftext|>"
CONVERSATION = [
    {"role": "user", "content": "How do I boil an egg?"},
    {"role": "assistant", "content": "Put it in boiling water for 9 minutes."},
    {"role": "user", "content": "And a soft one?"},
    {"role": "assistant", "content": "About 6 minutes."},
]
OTHER = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello! What can I do for you today?"},
]


def test_chat_template_is_the_original_format_byte_for_byte(tokenizer):
    expected = (
        "### Human: How do I boil an egg? ### Assistant: Put it in boiling water for 9 minutes."
        + EOS
        + " ### Human: And a soft one? ### Assistant: About 6 minutes."
        + EOS
    )
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False) == expected
    assert format_text(CONVERSATION, eos_token=EOS) == expected
    assert format_text(CONVERSATION) == expected.replace(EOS, "")


def test_inference_prompt_is_a_prefix_of_the_training_text(tokenizer):
    full_text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    full_ids = tokenizer.apply_chat_template(CONVERSATION, return_dict=True)["input_ids"]
    for turn in (1, 3):
        prompt = tokenizer.apply_chat_template(CONVERSATION[:turn], tokenize=False, add_generation_prompt=True)
        assert prompt.endswith("### Assistant:")
        assert full_text.startswith(prompt)
        prompt_ids = tokenizer.apply_chat_template(CONVERSATION[:turn], add_generation_prompt=True, return_dict=True)[
            "input_ids"
        ]
        assert full_ids[: len(prompt_ids)] == prompt_ids  # also a prefix token by token


def segments(tokenizer, conversation, trained_turns):
    """Expected (ids, labels), built piece by piece: template markers and human turns masked, assistant text and
    its EOS trained (only the assistant turns whose index is in trained_turns)."""
    ids, labels = [], []
    for index, message in enumerate(conversation):
        separator = "" if index == 0 else " "
        if message["role"] == "user":
            pieces = [(separator + "### Human: " + message["content"], False)]
        else:
            pieces = [(separator + "### Assistant:", False), (" " + message["content"], index in trained_turns)]
        for text, trained in pieces:
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            labels += piece if trained else [-100] * len(piece)
        if message["role"] == "assistant":
            ids.append(tokenizer.eos_token_id)
            labels.append(tokenizer.eos_token_id if index in trained_turns else -100)
    return ids, labels


@pytest.fixture
def model(tiny_phi):
    return load_model(ModelArguments(model_name_or_path=str(tiny_phi)), QuantizationArguments(load_in_4bit=True))


def prepared_batch(model, tokenizer, tmp_path, loss_on):
    args = TrainingConfig(output_dir=str(tmp_path), max_length=512, report_to="none", max_steps=1, packing=False)
    records = to_training_records(Conversations([{"messages": CONVERSATION}, {"messages": OTHER}], loss_on))
    lora = build_lora_config(LoraArguments(lora_r=8), model.config.model_type)
    trainer = build_trainer(model, tokenizer, args, Dataset.from_list(records), peft_config=lora)
    dataset = trainer.train_dataset
    return trainer.data_collator([dataset[0], dataset[1]])


def test_labels_mask_human_turns_and_train_every_assistant_turn_with_eos(model, tokenizer, tmp_path):
    batch = prepared_batch(model, tokenizer, tmp_path, loss_on="all")
    for row, (conversation, trained) in enumerate([(CONVERSATION, {1, 3}), (OTHER, {1})]):
        ids, labels = segments(tokenizer, conversation, trained)
        n = len(ids)
        assert batch["input_ids"][row, :n].tolist() == ids
        assert batch["labels"][row, :n].tolist() == labels
        # Padding (the pad token is EOS here) is masked, the EOS that ends each reply is not.
        assert (batch["labels"][row, n:] == -100).all()
        eos_positions = [i for i, t in enumerate(ids) if t == tokenizer.eos_token_id]
        assert len(eos_positions) == len(trained)
        assert all(batch["labels"][row, i] == tokenizer.eos_token_id for i in eos_positions)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id


def test_replies_policy_trains_the_final_reply_only(model, tokenizer, tmp_path):
    batch = prepared_batch(model, tokenizer, tmp_path, loss_on="last")
    ids, labels = segments(tokenizer, CONVERSATION, {3})
    assert batch["input_ids"][0, : len(ids)].tolist() == ids
    assert batch["labels"][0, : len(ids)].tolist() == labels
    trained = [t for t in labels if t != -100]
    assert tokenizer.decode(trained) == " About 6 minutes." + EOS


def test_drop_long_examples_keeps_those_that_fit_with_their_eos(tokenizer):
    from config import DataError
    from training_examples import drop_long_examples

    lengths = [len(tokenizer.apply_chat_template(c, return_dict=True)["input_ids"]) for c in (CONVERSATION, OTHER)]
    conversations = Conversations([{"messages": CONVERSATION}, {"messages": OTHER}], "all")
    limit = min(lengths)
    kept = drop_long_examples(conversations, tokenizer, limit)
    assert [e["messages"] for e in kept.examples] == [OTHER if lengths[1] <= lengths[0] else CONVERSATION]
    assert kept.counts["too_long"] == 1
    assert len(drop_long_examples(conversations, tokenizer, max(lengths)).examples) == 2
    with pytest.raises(DataError, match="every example is longer"):
        drop_long_examples(conversations, tokenizer, limit - 1)


# ---------------------------------------------------------------------------------------------------------------
# The portable template: what the saved tokenizer carries, for engines that render templates without transformers.

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


PLAIN_JINJA2 = jinja2.Environment().from_string(PORTABLE_CHAT_TEMPLATE)  # no transformers extension, no helper


def plain_jinja2(**variables) -> str:
    return PLAIN_JINJA2.render(eos_token=EOS, **variables)


def test_the_portable_template_is_the_training_template_without_its_markers():
    with pytest.raises(jinja2.TemplateSyntaxError, match="Encountered unknown tag 'generation'"):
        jinja2.Environment().from_string(CHAT_TEMPLATE)
    assert "{% generation %}" not in PORTABLE_CHAT_TEMPLATE and "endgeneration" not in PORTABLE_CHAT_TEMPLATE
    unmarked = CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    assert unmarked == PORTABLE_CHAT_TEMPLATE


def test_plain_jinja2_renders_every_bundled_conversation_as_training_does(tokenizer):
    """Every conversation of data/oasst1/ (both policies), whole and as the prompt before each of its replies, with
    and without a system message: transformers with the training template and plain Jinja2 with the portable one
    give the same text, byte for byte."""
    conversations = [
        e["messages"]
        for policy in ("best", "replies")
        for e in load_conversations(str(SAMPLE), policy=policy).examples
    ]
    assert len(conversations) > 200
    checked = 0
    for messages in conversations:
        for system in ([], [SYSTEM]):
            cases = [(system + messages, False)]
            cases += [(system + messages[:turn], True) for turn, m in enumerate(messages) if m["role"] == "assistant"]
            for case, prompt in cases:
                expected = tokenizer.apply_chat_template(case, tokenize=False, add_generation_prompt=prompt)
                assert plain_jinja2(messages=case, add_generation_prompt=prompt) == expected
                checked += 1
    assert tokenizer.chat_template == CHAT_TEMPLATE and checked > 1000


def test_a_system_message_opens_the_first_human_turn(tokenizer):
    messages = [SYSTEM, *CONVERSATION[:3]]
    expected = (
        "### Human: You are a helpful assistant.\n\nHow do I boil an egg? ### Assistant: Put it in boiling water for 9"
        " minutes." + EOS + " ### Human: And a soft one? ### Assistant:"
    )
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == expected
    assert plain_jinja2(messages=messages, add_generation_prompt=True) == expected
    # The same prompt as the user asking with the system text first: what inference.py is given in the serving test.
    folded = [{"role": "user", "content": SYSTEM["content"] + "\n\n" + CONVERSATION[0]["content"]}, *CONVERSATION[1:3]]
    assert tokenizer.apply_chat_template(folded, tokenize=False, add_generation_prompt=True) == expected
    assert format_text([SYSTEM, *CONVERSATION], EOS) == format_text(folded + CONVERSATION[3:], EOS)


TOOL_CALL = {"type": "function", "function": {"name": "clock", "arguments": {}}}
TOOL = {"type": "function", "function": {"name": "clock", "description": "The time.", "parameters": {}}}


@pytest.mark.parametrize(
    "messages, tools, error",
    [
        ([CONVERSATION[0], {"role": "tool", "content": "12:00"}], None, "got: tool"),
        ([CONVERSATION[0], SYSTEM], None, "got: system"),
        ([SYSTEM, CONVERSATION[1]], None, "A system message must be followed by a user message"),
        ([SYSTEM], None, "A system message must be followed by a user message"),
        (
            [CONVERSATION[0], {"role": "assistant", "content": "", "tool_calls": [TOOL_CALL]}],
            None,
            "Tool calls are not",
        ),
        ([CONVERSATION[0]], [TOOL], "Tools are not supported"),
    ],
)
def test_tools_tool_calls_and_other_roles_are_a_clear_error(tokenizer, messages, tools, error):
    with pytest.raises(jinja2.TemplateError, match=error):
        tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    with pytest.raises(jinja2.TemplateError, match=error):  # llama.cpp and TGI provide raise_exception too
        portable_template().render(messages=messages, tools=tools, eos_token=EOS, add_generation_prompt=True)
