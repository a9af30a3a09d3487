"""A Hugging Face model with a chat template, converted by `nitsum-ckpt convert-hf` and served over
HTTP: the chat answer is transformers' own greedy continuation of its own `apply_chat_template`."""

import json

import openai
import pytest
import torch
from transformers import AutoTokenizer

from checkpoints_tools import cli as ckpt_cli
from hf_models import make_hf_llama
from nitsum_jax.chat import TOKENIZER_CONFIG_FILE, ChatTemplate
from nitsum_jax.engine import Engine
from nitsum_jax.plans import BucketGrid, parse_plans
from nitsum_jax.server.app import NitsumServer
from nitsum_jax.server.http.server import HttpServer
from nitsum_jax.source import load_model

TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
            "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
            "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
MESSAGES = [{"role": "system", "content": "Answer in bytes."}, {"role": "user", "content": "Which lane is fast?"}]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf-chat")
    hf_model = make_hf_llama(root / "hf", tie=False, seed=11)
    (root / "hf" / TOKENIZER_CONFIG_FILE).write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>", "chat_template": TEMPLATE}))
    assert ckpt_cli.main(["convert-hf", str(root / "hf"), str(root / "ours"), "--quiet"]) == 0
    assert (root / "ours" / TOKENIZER_CONFIG_FILE).is_file()  # carried over by the converter
    model = load_model(root / "ours")

    def build_engine():
        return Engine(model.cfg, model.params, parse_plans("solo: all=tp1@0"), tokenizer=model.tokenizer,
                      num_pages=32, page_size=8, grid=BucketGrid(decode_batch=(1,), prefill_len=(64,), max_seq_len=256))

    server = NitsumServer(build_engine, host="127.0.0.1", port=None)
    http = HttpServer(server, host="127.0.0.1", port=0, model_name="hf-tiny",
                      chat_template=ChatTemplate.for_checkpoint(root / "ours")).start()
    server.stop_hooks.append(http.stop)
    server.start()
    assert server.wait_ready(timeout=600)
    yield hf_model, AutoTokenizer.from_pretrained(root / "hf"), http
    server.drain(grace_s=10)


def test_greedy_chat_over_http_equals_transformers(served):
    hf_model, hf_tokenizer, http = served
    text = hf_tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    ids = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False)
    expected = out[0, len(ids):].tolist()
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{http.port}/v1", api_key="none", max_retries=0)
    reply = client.chat.completions.create(model="hf-tiny", messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0,
                                           logprobs=True)
    assert reply.usage.prompt_tokens == len(ids)  # the same template, rendered and tokenized the same
    assert reply.usage.completion_tokens == len(expected)
    assert [t.token for t in reply.choices[0].logprobs.content] == [hf_tokenizer.decode([t]) for t in expected]
    assert reply.choices[0].message.content == hf_tokenizer.decode(expected, skip_special_tokens=True)
