"""Chat templates render as transformers' `apply_chat_template` does, in a sandbox."""

import json

import pytest
from transformers import PreTrainedTokenizerFast

from nitsum_jax.chat import ChatTemplate, ChatTemplateError
from nitsum_jax.tokenizer import TextTokenizer

# The shape of Llama 3's template: a system default, loop controls, raise_exception, tojson, strftime_now.
LLAMA3_LIKE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set messages = messages[1:] %}{% else %}{% set system = 'Today is ' + strftime_now('%Y') %}{% endif %}"
    "<|start_header_id|>system<|end_header_id|>\n\n{{ system }}<|eot_id|>"
    "{% for message in messages %}{% if message['role'] not in ['user', 'assistant'] %}"
    "{{ raise_exception('roles must be user or assistant, got ' + message['role']) }}{% endif %}"
    "{% if loop.index0 > 8 %}{% break %}{% endif %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    "{{ '' if true else messages | tojson }}")
MESSAGES = [{"role": "system", "content": "You route tiers."}, {"role": "user", "content": "  Which lane? "},
            {"role": "assistant", "content": "The fast one."}, {"role": "user", "content": "Why ünïcode?"}]
SPECIALS = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}


def hf_tokenizer(template: str) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=TextTokenizer.byte_level().tokenizer, chat_template=template,
                                   **SPECIALS)


@pytest.mark.parametrize("messages", [MESSAGES, MESSAGES[1:2]], ids=["with-system", "default-system"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_renders_what_transformers_renders(messages, add_generation_prompt):
    ours = ChatTemplate(LLAMA3_LIKE, special_tokens=SPECIALS).render(messages,
                                                                     add_generation_prompt=add_generation_prompt)
    theirs = hf_tokenizer(LLAMA3_LIKE).apply_chat_template(messages, tokenize=False,
                                                           add_generation_prompt=add_generation_prompt)
    assert ours == theirs
    assert ours.startswith(SPECIALS["bos_token"]) and "Which lane?<|eot_id|>" in ours


def test_a_template_that_raises_names_its_message():
    template = ChatTemplate(LLAMA3_LIKE, special_tokens=SPECIALS)
    with pytest.raises(ChatTemplateError, match="roles must be user or assistant, got tool"):
        template.render([{"role": "tool", "content": "{}"}])


def test_the_sandbox_refuses_to_mutate_its_inputs():
    template = ChatTemplate("{% set _ = messages.append({'role': 'user'}) %}{{ messages | length }}")
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(ChatTemplateError, match="refused"):
        template.render(messages)
    assert len(messages) == 1


def test_the_sandbox_hides_python_internals():
    with pytest.raises(ChatTemplateError):
        ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}").render([])


def test_invalid_jinja_is_refused_naming_the_origin():
    with pytest.raises(ChatTemplateError, match=r"my-template: chat template is not valid Jinja \(line 1"):
        ChatTemplate("{% for m in messages %}", origin="my-template")


def test_tokenizer_config_gives_the_template_and_its_special_tokens(tmp_path):
    path = tmp_path / "tokenizer_config.json"
    path.write_text(json.dumps({"chat_template": "{{ bos_token }}|{{ eos_token }}",
                                "bos_token": {"content": "<s>", "lstrip": False}, "eos_token": "</s>"}))
    assert ChatTemplate.from_tokenizer_config(path).render([]) == "<s>|</s>"


def test_named_templates_use_the_default_one(tmp_path):
    path = tmp_path / "tokenizer_config.json"
    path.write_text(json.dumps({"chat_template": [{"name": "tool_use", "template": "tools"},
                                                  {"name": "default", "template": "plain"}]}))
    assert ChatTemplate.from_tokenizer_config(path).render([]) == "plain"


def test_no_template_is_none_and_a_file_overrides_it(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    assert ChatTemplate.for_checkpoint(tmp_path) is None
    (tmp_path / "chat.jinja").write_text("{{ bos_token }}{{ messages[0]['content'] }}")
    template = ChatTemplate.for_checkpoint(tmp_path, tmp_path / "chat.jinja")
    assert template.render([{"role": "user", "content": "hi"}]) == "<s>hi"
