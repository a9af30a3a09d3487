"""The multi-turn agent workload: conversations of calls whose prompts grow by an answer and a
tool result each, from one shared system prompt, fixed in advance by the seed."""

import pytest

from nitsum_jax.bench.workload import AgentShape, agent_workload


def conversations(workload):
    by_id: dict[str, list] = {}
    for r in workload.requests:
        by_id.setdefault(r.request_id.split("-")[0], []).append(r)
    return {c: sorted(calls, key=lambda r: r.request_id) for c, calls in by_id.items()}


def test_each_call_extends_the_previous_prompt_by_its_answer_and_a_tool_result():
    workload = agent_workload(2.0, "4:32:8", num_conversations=5, output_len="3-9", think_s=0.5, seed=3)

    chains = conversations(workload)
    assert len(chains) == 5 and all(len(calls) == 4 for calls in chains.values())
    system = workload.requests[0].prompt_ids[:32]
    for calls in chains.values():
        assert calls[0].prompt_ids[:32] == system and calls[0].prompt_len == 32 + 8
        for prev, call in zip(calls, calls[1:]):
            assert call.prompt_ids[:prev.prompt_len] == prev.prompt_ids
            assert call.prompt_len == prev.prompt_len + prev.output_len + 8
            assert call.arrival_s >= prev.arrival_s
            assert call.priority_class == prev.priority_class


def test_the_workload_is_the_same_for_the_same_seed_and_sorted_by_arrival():
    a = agent_workload(1.0, AgentShape(3, 16, 4), duration_s=10.0, seed=11)
    b = agent_workload(1.0, AgentShape(3, 16, 4), duration_s=10.0, seed=11)

    assert a.requests == b.requests
    assert [r.arrival_s for r in a.requests] == sorted(r.arrival_s for r in a.requests)
    assert a.params["kind"] == "agent" and a.params["calls"] == 3
    assert a.params["num_requests"] == 3 * a.params["conversations"]


def test_tiers_are_drawn_per_conversation():
    workload = agent_workload(5.0, "2:8:4", num_conversations=40, high_fraction=0.5, seed=5)

    tiers = {c: {r.priority_class for r in calls} for c, calls in conversations(workload).items()}

    assert all(len(t) == 1 for t in tiers.values())
    assert {next(iter(t)) for t in tiers.values()} == {"high", "low"}


@pytest.mark.parametrize("text", ["6:512", "0:16:4", "3:16:0", "a:b:c"])
def test_a_bad_agent_shape_is_refused_naming_the_form(text):
    with pytest.raises(ValueError, match="CALLS:SYSTEM_TOKENS:TOOL_TOKENS|calls must be"):
        AgentShape.parse(text)


def test_a_chain_longer_than_the_context_is_refused_up_front():
    with pytest.raises(ValueError, match="needs 94 tokens.*context limit 64"):
        agent_workload(1.0, "3:40:8", num_conversations=2, output_len="10", max_seq_len=64)
